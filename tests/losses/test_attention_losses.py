"""The attention loss modules use the fused ops: each stage read once (MAD/SAD), the LGAD label
teacher's maps without autograd, and the same numbers on every backend."""
import pytest
import torch

import kdops
from kdops import losses
from tests.utils import backend_params, relative_error

BACKENDS = [pytest.param("cpu", "reference", id="reference")] + [
    p for p in backend_params("attention_map") if p.id == "cpu-cpu"
]


def _stages(grad=False):
    sizes = [(3, 9, 11), (5, 5, 6), (4, 5, 6), (6, 3, 3)]
    out = []
    for i, (c, h, w) in enumerate(sizes):
        g = torch.Generator().manual_seed(30 + i)
        out.append((torch.randn(2, c, h, w, generator=g) / c**0.5).requires_grad_(grad))
    return out


def _counting_attention_map(monkeypatch):
    calls = []
    original = kdops.attention_map

    def counting(x, *args, **kwargs):
        calls.append(x)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(kdops, "attention_map", counting)
    return calls


@pytest.mark.parametrize("pairs", ["consecutive", "all"], ids=["sad", "mad"])
def test_each_stage_is_reduced_once(pairs, monkeypatch):
    calls = _counting_attention_map(monkeypatch)
    stages = _stages()
    losses.SelfAttentionDistillation(pairs=pairs)(stages)
    assert len(calls) == len(stages)
    assert all(any(call is stage for call in calls) for stage in stages)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["consecutive", "all"], ids=["sad", "mad"])
def test_self_attention_distillation_equals_pairwise_attention_loss(device, backend, pairs):
    module = losses.SelfAttentionDistillation(pairs=pairs, backend=backend)
    stages = _stages(grad=True)
    value = module(stages)
    grads = torch.autograd.grad(value, stages)
    stages_ref = [s.detach().double().requires_grad_(True) for s in stages]
    expected = sum(kdops.attention_loss(stages_ref[i], stages_ref[j], backend="reference")
                   for i, j in module.stage_pairs(len(stages)))
    grads_ref = torch.autograd.grad(expected, stages_ref)
    assert relative_error(value, expected) <= 1e-5
    for grad, grad_ref in zip(grads, grads_ref):
        assert relative_error(grad, grad_ref) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_label_guided_teacher_maps_have_no_graph(device, backend):
    student = [s for s in _stages(grad=True)[:2]]
    teacher = [t for t in _stages(grad=True)[2:]]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        value = losses.LabelGuidedAttention(backend=backend)(student, teacher)
    value.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    teacher_ptrs = {t.data_ptr() for t in teacher}
    assert not any(x.data_ptr() in teacher_ptrs for x in saved), "a teacher feature was saved for backward"
    expected = sum(kdops.attention_loss(s.detach().double(), t.detach().double(), backend="reference")
                   for s, t in zip(student, teacher))
    assert relative_error(value, expected) <= 1e-5
