"""kdops.compat.mmrazor against mmrazor's losses written from their formulas
(open-mmlab/mmrazor, mmrazor/models/losses/{cwd,kl_divergence,at_loss}.py): values and
student/teacher gradients in float32 and float64, mmrazor's signatures, ``register()`` with a
fake registry, and the fused backends against the reference."""
from __future__ import annotations

import builtins

import pytest
import torch

from kdops.compat import mmrazor
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, defaults, parameter_names,
                                  randn)


def cwd_formula(s, t, tau, loss_weight):
    """loss_weight · τ² · Σ_{n,c} KL(softmax_HW(t/τ) ‖ softmax_HW(s/τ)) / (N·C); no detach."""
    n, c = s.shape[:2]
    log_p = torch.log_softmax(t.flatten(2) / tau, dim=2)
    log_q = torch.log_softmax(s.flatten(2) / tau, dim=2)
    return loss_weight * tau**2 * (log_p.exp() * (log_p - log_q)).sum() / (n * c)


def kl_formula(s, t, tau, reduction, loss_weight, teacher_detach):
    """loss_weight · τ² · reduce(p_t · (log p_t − log q_s)), softmax over dim 1."""
    if teacher_detach:
        t = t.detach()
    log_p, log_q = torch.log_softmax(t / tau, dim=1), torch.log_softmax(s / tau, dim=1)
    terms = log_p.exp() * (log_p - log_q)
    reduced = {"none": terms, "sum": terms.sum(), "mean": terms.sum() / terms.numel(),
               "batchmean": terms.sum() / s.shape[0]}[reduction]
    return loss_weight * tau**2 * reduced


def at_formula(s, t, loss_weight):
    def at(x):
        a = (x**2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)
    return loss_weight * ((at(s) - at(t)) ** 2).mean()


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("tau,loss_weight", [(1.0, 1.0), (4.0, 3.0)])
def test_channel_wise_divergence(dtype, tol, tau, loss_weight):
    inputs = [randn(2, 4, 5, 6, seed=1), randn(2, 4, 5, 6, seed=2)]
    assert_matches(mmrazor.ChannelWiseDivergence(tau, loss_weight),
                   lambda s, t: cwd_formula(s, t, tau, loss_weight), inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("teacher_detach", [pytest.param(True, id="detach"), pytest.param(False, id="no-detach")])
@pytest.mark.parametrize("shape", [pytest.param((3, 7), id="NC"), pytest.param((2, 5, 3, 4), id="NCHW")])
def test_kl_divergence(dtype, tol, reduction, teacher_detach, shape):
    inputs = [randn(*shape, seed=1), randn(*shape, seed=2)]
    module = mmrazor.KLDivergence(tau=2.0, reduction=reduction, loss_weight=0.5, teacher_detach=teacher_detach)
    assert_matches(module, lambda s, t: kl_formula(s, t, 2.0, reduction, 0.5, teacher_detach), inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
def test_at_loss(dtype, tol):
    inputs = [randn(2, 3, 5, 6, seed=1), randn(2, 8, 5, 6, seed=2)]
    assert_matches(mmrazor.ATLoss(2.5), lambda s, t: at_formula(s, t, 2.5), inputs, dtype, tol)


def test_signatures_are_mmrazors():
    assert parameter_names(mmrazor.ChannelWiseDivergence) == ["tau", "loss_weight"]
    assert defaults(mmrazor.ChannelWiseDivergence) == {"tau": 1.0, "loss_weight": 1.0}
    assert parameter_names(mmrazor.ChannelWiseDivergence.forward) == ["preds_S", "preds_T"]
    assert parameter_names(mmrazor.KLDivergence) == ["tau", "reduction", "loss_weight", "teacher_detach"]
    assert defaults(mmrazor.KLDivergence) == {"tau": 1.0, "reduction": "batchmean", "loss_weight": 1.0,
                                              "teacher_detach": True}
    assert parameter_names(mmrazor.KLDivergence.forward) == ["preds_S", "preds_T"]
    assert parameter_names(mmrazor.ATLoss) == ["loss_weight"]
    assert defaults(mmrazor.ATLoss) == {"loss_weight": 1.0}
    assert parameter_names(mmrazor.ATLoss.forward) == ["s_feature", "t_feature"]


def test_positional_and_keyword_calls_agree():
    s, t = randn(2, 4, 3, 5, seed=1).float(), randn(2, 4, 3, 5, seed=2).float()
    # mmrazor configs: dict(type='ChannelWiseDivergence', tau=1, loss_weight=3)
    assert torch.equal(mmrazor.ChannelWiseDivergence(tau=1, loss_weight=3)(preds_S=s, preds_T=t),
                       mmrazor.ChannelWiseDivergence(1, 3)(s, t))
    assert torch.equal(mmrazor.KLDivergence(tau=4, loss_weight=1, reduction="mean")(preds_S=s, preds_T=t),
                       mmrazor.KLDivergence(4, "mean", 1)(s, t))
    assert torch.equal(mmrazor.ATLoss(loss_weight=2.0)(s_feature=s, t_feature=t), mmrazor.ATLoss(2.0)(s, t))


class FakeRegistry:
    """mmengine's Registry.register_module(name=, force=, module=)."""

    def __init__(self):
        self.modules = {}

    def register_module(self, name=None, force=False, module=None):
        if name in self.modules and not force:
            raise KeyError(f"{name} is already registered")
        self.modules[name] = module


def test_register_adds_the_classes_under_mmrazors_names():
    registry = FakeRegistry()
    registry.modules["ChannelWiseDivergence"] = object  # mmrazor's own, replaced (force=True)
    added = mmrazor.register(registry)
    assert registry.modules == {"ATLoss": mmrazor.ATLoss, "ChannelWiseDivergence": mmrazor.ChannelWiseDivergence,
                                "KLDivergence": mmrazor.KLDivergence}
    assert added == registry.modules
    built = registry.modules["ChannelWiseDivergence"](tau=1, loss_weight=3)  # as a config builds it
    assert isinstance(built, mmrazor.ChannelWiseDivergence) and built.loss_weight == 3


def test_register_with_prefix_keeps_the_upstream_classes():
    registry = FakeRegistry()
    registry.modules["ATLoss"] = object
    mmrazor.register(registry, prefix="Kdops", force=False)
    assert registry.modules["ATLoss"] is object
    assert registry.modules["KdopsATLoss"] is mmrazor.ATLoss


def test_register_without_mmrazor_says_so(monkeypatch):
    real_import = builtins.__import__

    def no_mmrazor(name, *args, **kwargs):
        if name.startswith("mmrazor"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mmrazor)
    with pytest.raises(ImportError, match="mmrazor is not installed"):
        mmrazor.register()
    with pytest.raises(TypeError, match="register_module"):
        mmrazor.register(object())


def _with_backend(module):
    def make(backend):
        module.backend = backend
        return module
    return make


@pytest.mark.parametrize("module,shape", [
    pytest.param(mmrazor.ChannelWiseDivergence(4.0, 3.0), (2, 4, 5, 6), id="cwd"),
    pytest.param(mmrazor.KLDivergence(2.0, "batchmean"), (2, 5, 3, 4), id="kl-batchmean"),
    pytest.param(mmrazor.KLDivergence(2.0, "mean", teacher_detach=False), (6, 5), id="kl-mean-NC"),
    pytest.param(mmrazor.ATLoss(), (2, 4, 5, 6), id="at"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(module, shape, device):
    assert_backends_agree(_with_backend(module), [randn(*shape, seed=1), randn(*shape, seed=2)], device)


def test_bad_reduction_names_the_argument():
    with pytest.raises(ValueError, match="reduction"):
        mmrazor.KLDivergence(reduction="avg")
