"""The fused backends of prototype_pool, prototype_kl and class_variation_loss against the float64
reference.

Every fused backend that implements the ops runs here (``backend_params``): the C++ CPU kernels,
the Triton kernels (under TRITON_INTERPRET=1 on machines without a GPU: small shapes) and the
CUDA kernels on GPU machines. The extension's ops live in ``torch.ops.kdops``, the Triton ones in
``torch.ops.kdops_triton``, with the same schemas.
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kdops
from kdops import backend as kd_backend
from kdops.reference import prototypes as ref
from tests.utils import TOLERANCES, OpCalls, backend_params, make_layout

POOL_BACKENDS = backend_params("prototype_pool")
KL_BACKENDS = backend_params("prototype_kl")
VARIATION_BACKENDS = backend_params("class_variation_loss")
CPU_ONLY = [p for p in POOL_BACKENDS if p.id == "cpu-cpu"]
EXTENSION_BACKENDS = [p for p in POOL_BACKENDS if p.id in ("cpu-cpu", "cuda-cuda")]

# (N, C, H, W), K, label map (H_l, W_l): equal, larger (downsampled by nearest), smaller
# (upsampled, 2× exactly and not), one pixel; small enough for the Triton interpreter.
CASES = [
    pytest.param((2, 3, 5, 7), 4, (5, 7), id="odd-5x7-K4"),
    pytest.param((2, 6, 4, 6), 5, (9, 13), id="labels-larger"),
    pytest.param((2, 5, 6, 8), 3, (3, 4), id="labels-half"),
    pytest.param((1, 4, 7, 5), 6, (3, 2), id="labels-smaller-N1"),
    pytest.param((3, 2, 1, 1), 2, (1, 1), id="L1"),
    pytest.param((2, 9, 3, 11), 1, (6, 11), id="K1"),
    pytest.param((2, 7, 6, 6), 150, (12, 12), id="K150"),
]
# The C++ kernels (CPU and CUDA; too large for the Triton interpreter): several tiles, work
# chunks and class-sum units per image, channel blocks with a ragged end, more present classes
# than one 32-class group of the CUDA prototype_kl kernels.
LARGE_CASES = [
    pytest.param((2, 37, 23, 29), 19, (46, 58), id="37ch-23x29-K19"),
    pytest.param((1, 64, 48, 70), 8, (24, 35), id="64ch-48x70"),
    pytest.param((2, 45, 30, 41), 150, (60, 82), id="45ch-30x41-K150"),
]
LAYOUTS = ("contiguous", "channels_last", "strided")
TAUS = [pytest.param(0.1, id="tau0.1"), pytest.param(1.0, id="tau1")]


@pytest.fixture(autouse=True)
def poisoned_triton_outputs(monkeypatch):
    """Every buffer the Triton launchers allocate starts as NaN: a passing case proves each
    output element is written."""
    if importlib.util.find_spec("triton") is not None:
        triton_prototypes = importlib.import_module("kdops.triton.prototypes")
        monkeypatch.setattr("kdops.triton._launch.POISON_OUTPUTS", True)


def ops(backend):
    """The op namespace of a fused backend (same schemas in both)."""
    if backend == "triton":
        importlib.import_module("kdops.triton.prototypes")
        return torch.ops.kdops_triton
    return torch.ops.kdops


def make_features(shape, dtype, layout, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g)).to(dtype)
    return make_layout(x.to(device), layout)


def make_labels(n, size, num_classes, device, ignored=0.2, seed=1, ignore_index=255):
    """Blocky labels (neighbouring pixels share classes, as in segmentation maps), some ignored."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randint(0, num_classes, (n, (h + 1) // 2, (w + 1) // 2), generator=g)
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :h, :w].contiguous()
    noise = torch.randint(0, num_classes, (n, h, w), generator=g)
    labels = torch.where(torch.rand(n, h, w, generator=g) < 0.3, noise, labels)
    labels[torch.rand(n, h, w, generator=g) < ignored] = ignore_index
    return labels.to(device)


def as_float64(*tensors):
    return [t.detach().double().cpu().requires_grad_(True) for t in tensors]


def out_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# DESIGN.md's gradient tolerance of each dtype: a gradient is returned rounded to its input's dtype.
GRAD_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_close(got, expected, tol, name, unit=0.0):
    """Relative-norm error within tol, and every element within tol of the largest magnitude
    (no element left unwritten or wrong where the norm would hide it). ``unit``: the natural
    scale of an element (a gradient of a mean over N·L pixels: 1/(N·L)), the floor of both
    scales where the exact values vanish and only rounding noise is left."""
    assert got is not None, f"no {name}"
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    norm_floor = unit * expected64.numel() ** 0.5
    error = (got64 - expected64).norm().item() / max(expected64.norm().item(), norm_floor, 1e-300)
    assert error <= tol, f"{name}: relative error {error:.3g} > {tol}"
    scale = max(expected64.abs().max().item(), unit, 1e-300)
    worst = (got64 - expected64).abs().max().item()
    assert worst <= tol * scale, f"{name}: max element error {worst:.3g} vs scale {scale:.3g}"


def pixel_unit(x):
    """1/(N·L): the scale of a gradient element of a mean over the pixels."""
    return 1.0 / (x.shape[0] * x.shape[2] * x.shape[3])


# ---------------------------------------------------------------------------------------------
# prototype_pool


def check_pool(backend, x, labels, num_classes, tol, grad_tol, per_image, ignore_index=255, normalize=False):
    x = x.detach().requires_grad_(True)
    protos, counts = kdops.prototype_pool(x, labels, num_classes, ignore_index, per_image, normalize,
                                          backend=backend)
    (x64,) = as_float64(x)
    expected, expected_counts = ref.prototype_pool(x64, labels.cpu(), num_classes, ignore_index, per_image,
                                                   normalize)
    assert protos.dtype == out_dtype(x) and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), expected_counts)
    assert_close(protos, expected, tol, "protos")
    # A class with count 0 has an exactly zero prototype.
    assert not protos[counts == 0].any()
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (grad,) = torch.autograd.grad((protos * weights.to(protos)).sum(), x)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x64)
    assert grad.dtype == x.dtype
    assert_close(grad, grad_expected, grad_tol, "grad x")


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", CASES)
@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_prototype_pool_matches_reference(device, backend, dtype, tol, grad_tol, shape, num_classes,
                                          label_size, per_image, normalize):
    labels = make_labels(shape[0], label_size, num_classes, device)
    for layout in LAYOUTS:
        x = make_features(shape, dtype, layout, device)
        check_pool(backend, x, labels, num_classes, tol, grad_tol, per_image, normalize=normalize)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_prototype_pool_normalized_zero_pixels(device, backend):
    """All-zero feature pixels (‖x‖ < eps, F.normalize's clamp) in a normalised pooling."""
    labels = make_labels(2, (4, 5), 3, device)
    x = make_features((2, 3, 4, 5), torch.float32, "contiguous", device).clone()
    x[:, :, 1, 2] = 0
    check_pool(backend, x, labels, 3, 1e-5, 1e-5, True, normalize=True)


@pytest.mark.parametrize("device,backend", EXTENSION_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", LARGE_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_prototype_pool_large(device, backend, dtype, tol, grad_tol, shape, num_classes,
                                  label_size, layout):
    labels = make_labels(shape[0], label_size, num_classes, device)
    x = make_features(shape, dtype, layout, device)
    for per_image in (True, False):
        check_pool(backend, x, labels, num_classes, tol, grad_tol, per_image)
    check_pool(backend, x, labels, num_classes, tol, grad_tol, False, normalize=True)


# ---------------------------------------------------------------------------------------------
# prototype_kl


def kl_inputs(shape, teacher_channels, num_classes, label_size, dtype, layout, device, per_image,
              seed=0, protos_dtype=None):
    """Student/teacher features, their prototypes (pooled by the reference, in protos_dtype) and
    the counts."""
    s = make_features(shape, dtype, layout, device, seed=seed)
    t = make_features((shape[0], teacher_channels, *shape[2:]), dtype, layout, device, seed=seed + 1)
    labels = make_labels(shape[0], label_size, num_classes, device, seed=seed + 2)
    s_protos, counts = ref.prototype_pool(s.float(), labels, num_classes, 255, per_image)
    t_protos, _ = ref.prototype_pool(t.float(), labels, num_classes, 255, per_image)
    protos_dtype = protos_dtype or out_dtype(s)
    return s, t, s_protos.to(protos_dtype), t_protos.to(protos_dtype), counts


def check_kl(backend, s, t, s_protos, t_protos, counts, tau, tol, grad_tol):
    inputs = [v.detach().requires_grad_(True) for v in (s, t, s_protos, t_protos)]
    loss = kdops.prototype_kl(*inputs, counts, tau, backend=backend)
    inputs64 = as_float64(*inputs)
    expected = ref.prototype_kl(*inputs64, counts.cpu(), tau)
    assert loss.dim() == 0 and loss.dtype == out_dtype(s)
    assert abs(loss.item() - expected.item()) <= tol * max(abs(expected.item()), 1e-6), (
        loss.item(), expected.item())
    grads = torch.autograd.grad(loss, inputs)
    expected_grads = torch.autograd.grad(expected, inputs64)
    names = ("student", "teacher", "student_protos", "teacher_protos")
    for name, x, grad, grad_expected in zip(names, inputs, grads, expected_grads):
        assert grad.dtype == x.dtype, name
        if grad_expected.abs().max() == 0:
            assert not grad.any(), f"{name}: gradient should be exactly 0"
        else:
            assert_close(grad, grad_expected, max(grad_tol, GRAD_TOLERANCE[x.dtype]), f"grad {name}",
                         unit=pixel_unit(s))


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", CASES)
@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_kl_matches_reference(device, backend, dtype, tol, grad_tol, shape, num_classes,
                                        label_size, per_image):
    for layout in LAYOUTS:
        inputs = kl_inputs(shape, shape[1] + 2, num_classes, label_size, dtype, layout, device, per_image)
        check_kl(backend, *inputs, 0.1, tol, grad_tol)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("protos_dtype", [torch.float64, torch.bfloat16], ids=["protos-fp64", "protos-bf16"])
def test_prototype_kl_tau_and_protos_dtype(device, backend, tau, protos_dtype):
    inputs = kl_inputs((2, 5, 4, 6), 3, 5, (4, 6), torch.float32, "contiguous", device, True,
                       seed=3, protos_dtype=protos_dtype)
    check_kl(backend, *inputs, tau, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", EXTENSION_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", LARGE_CASES)
@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_kl_large(device, backend, dtype, tol, grad_tol, shape, num_classes,
                                label_size, per_image):
    inputs = kl_inputs(shape, 2 * shape[1], num_classes, label_size, dtype, "channels_last", device,
                       per_image, seed=4)
    check_kl(backend, *inputs, 0.1, tol, grad_tol)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_prototype_kl_absent_classes_and_empty_images(device, backend):
    """Absent classes (count 0, zero prototype) are left out of the softmax and get zero
    gradient; an image with no present class contributes 0 and gets zero gradient."""
    s, t, s_protos, t_protos, counts = kl_inputs((3, 4, 5, 6), 3, 6, (5, 6), torch.float32,
                                                 "contiguous", device, True, seed=6)
    counts = counts.clone()
    counts[0, 1:4] = 0
    counts[1] = 0  # image 1: nothing present
    s_protos, t_protos = s_protos.clone(), t_protos.clone()
    s_protos[counts == 0] = 0
    t_protos[counts == 0] = 0
    check_kl(backend, s, t, s_protos, t_protos, counts, 0.1, 1e-5, 1e-5)
    a, b, ps, pt = [v.detach().requires_grad_(True) for v in (s, t, s_protos, t_protos)]
    grads = torch.autograd.grad(kdops.prototype_kl(a, b, ps, pt, counts, backend=backend), (a, b, ps, pt))
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert not grads[0][1].any() and not grads[1][1].any()
    assert not grads[2][counts == 0].any() and not grads[3][counts == 0].any()


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_prototype_kl_nothing_present_gives_zero(device, backend):
    s, t, s_protos, t_protos, counts = kl_inputs((2, 4, 3, 5), 4, 3, (3, 5), torch.float32,
                                                 "contiguous", device, False)
    zero_counts = torch.zeros_like(counts)
    inputs = [v.detach().requires_grad_(True) for v in (s, t, s_protos, t_protos)]
    loss = kdops.prototype_kl(*inputs, zero_counts, backend=backend)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, inputs):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_prototype_kl_identical_sides_give_zero(device, backend):
    s, _, s_protos, _, counts = kl_inputs((2, 4, 5, 6), 4, 5, (5, 6), torch.float32, "contiguous",
                                          device, True)
    assert kdops.prototype_kl(s, s.clone(), s_protos, s_protos.clone(), counts, 0.05,
                              backend=backend).item() == 0.0


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
def test_prototype_kl_zero_feature_pixels(device, backend):
    """Pixels of all-zero features (‖x‖ < eps: F.normalize's clamp) and a zero prototype of a
    present class: finite values and the reference's gradients."""
    s, t, s_protos, t_protos, counts = kl_inputs((2, 3, 4, 5), 3, 4, (4, 5), torch.float32,
                                                 "contiguous", device, True, seed=8)
    s, s_protos = s.clone(), s_protos.clone()
    s[:, :, 1, 2] = 0
    s_protos[0, int(counts[0].argmax())] = 0
    check_kl(backend, s, t, s_protos, t_protos, counts, 0.1, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# class_variation_loss


def check_variation(backend, s, t, labels, num_classes, tol, grad_tol, ignore_index=255):
    a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    loss = kdops.class_variation_loss(a, b, labels, num_classes, ignore_index, backend=backend)
    a64, b64 = as_float64(a, b)
    expected = ref.class_variation_loss(a64, b64, labels.cpu(), num_classes, ignore_index)
    assert loss.dim() == 0 and loss.dtype == out_dtype(s)
    assert abs(loss.item() - expected.item()) <= tol * max(abs(expected.item()), 1e-6), (
        loss.item(), expected.item())
    grads = torch.autograd.grad(loss, (a, b))
    expected_grads = torch.autograd.grad(expected, (a64, b64))
    for name, x, grad, grad_expected in zip(("student", "teacher"), (a, b), grads, expected_grads):
        assert grad.dtype == x.dtype
        if grad_expected.abs().max() == 0:
            assert not grad.any(), f"{name}: gradient should be exactly 0"
        else:
            assert_close(grad, grad_expected, grad_tol, f"grad {name}", unit=pixel_unit(s))


@pytest.mark.parametrize("device,backend", VARIATION_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", CASES)
def test_class_variation_loss_matches_reference(device, backend, dtype, tol, grad_tol, shape,
                                                num_classes, label_size):
    labels = make_labels(shape[0], label_size, num_classes, device, seed=2)
    for layout in LAYOUTS:
        s = make_features(shape, dtype, layout, device, seed=3)
        t = make_features((shape[0], shape[1] + 3, *shape[2:]), dtype, layout, device, seed=4)
        check_variation(backend, s, t, labels, num_classes, tol, grad_tol)


@pytest.mark.parametrize("device,backend", EXTENSION_BACKENDS)
@pytest.mark.parametrize("dtype,tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,num_classes,label_size", LARGE_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_class_variation_loss_large(device, backend, dtype, tol, grad_tol, shape, num_classes,
                                        label_size, layout):
    labels = make_labels(shape[0], label_size, num_classes, device, seed=5)
    s = make_features(shape, dtype, layout, device, seed=6)
    t = make_features((shape[0], 2 * shape[1], *shape[2:]), dtype, layout, device, seed=7)
    check_variation(backend, s, t, labels, num_classes, tol, grad_tol)


@pytest.mark.parametrize("device,backend", VARIATION_BACKENDS)
def test_class_variation_loss_ignore_index_other_than_255(device, backend):
    labels = make_labels(2, (5, 7), 4, device, ignore_index=-1)
    s = make_features((2, 3, 5, 7), torch.float32, "contiguous", device, seed=1)
    t = make_features((2, 5, 5, 7), torch.float32, "contiguous", device, seed=2)
    check_variation(backend, s, t, labels, 4, 1e-5, 1e-5, ignore_index=-1)


@pytest.mark.parametrize("device,backend", VARIATION_BACKENDS)
def test_class_variation_loss_zero_feature_pixels(device, backend):
    labels = make_labels(2, (4, 5), 3, device, seed=3)
    s = make_features((2, 3, 4, 5), torch.float32, "contiguous", device, seed=4).clone()
    t = make_features((2, 4, 4, 5), torch.float32, "contiguous", device, seed=5)
    s[:, :, 2, 1] = 0
    check_variation(backend, s, t, labels, 3, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# Every op: all pixels ignored, ignored pixels never read, label dtypes


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_all_pixels_ignored(device, backend):
    x = make_features((2, 3, 4, 5), torch.float32, "contiguous", device).requires_grad_(True)
    t = make_features((2, 4, 4, 5), torch.float32, "contiguous", device, seed=1).requires_grad_(True)
    labels = torch.full((2, 6, 3), 255, device=device)
    for per_image in (True, False):
        protos, counts = kdops.prototype_pool(x, labels, 3, per_image=per_image, backend=backend)
        assert not counts.any() and torch.equal(protos, torch.zeros_like(protos))
        (grad,) = torch.autograd.grad(protos.sum(), x)
        assert torch.equal(grad, torch.zeros_like(grad))
        t_protos, _ = kdops.prototype_pool(t, labels, 3, per_image=per_image, backend=backend)
        loss = kdops.prototype_kl(x, t, protos.detach(), t_protos, counts, backend=backend)
        assert loss.item() == 0.0
        for grad in torch.autograd.grad(loss, (x, t)):
            assert torch.equal(grad, torch.zeros_like(grad))
    loss = kdops.class_variation_loss(x, t, labels, 3, backend=backend)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, (x, t)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_ignored_pixels_are_never_read(device, backend):
    """NaN and inf features at ignored pixels reach neither the prototypes, the loss nor the
    gradients (pool and class variation)."""
    labels = make_labels(2, (5, 7), 4, device, ignored=0.3, seed=9)
    s = make_features((2, 3, 5, 7), torch.float32, "contiguous", device, seed=1)
    t = make_features((2, 4, 5, 7), torch.float32, "contiguous", device, seed=2)
    ignored = (labels == 255).unsqueeze(1)
    poisoned_s = s.masked_fill(ignored, float("nan")).requires_grad_(True)
    poisoned_t = t.masked_fill(ignored, float("inf")).requires_grad_(True)
    protos, _ = kdops.prototype_pool(poisoned_s, labels, 4, backend=backend)
    assert_close(protos, ref.prototype_pool(s, labels, 4)[0], 1e-5, "protos")
    (grad,) = torch.autograd.grad(protos.sum(), poisoned_s)
    assert torch.isfinite(grad).all() and not grad[ignored.expand_as(grad)].any()
    loss = kdops.class_variation_loss(poisoned_s, poisoned_t, labels, 4, backend=backend)
    expected = ref.class_variation_loss(s, t, labels, 4)
    assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
    for grad in torch.autograd.grad(loss, (poisoned_s, poisoned_t)):
        assert torch.isfinite(grad).all() and not grad[ignored.expand_as(grad)].any()


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32, torch.int64], ids=["uint8", "int32", "int64"])
def test_label_dtypes(device, backend, label_dtype):
    labels = make_labels(2, (7, 9), 5, device)
    x = make_features((2, 3, 5, 6), torch.float32, "contiguous", device)
    t = make_features((2, 4, 5, 6), torch.float32, "contiguous", device, seed=1)
    check_pool(backend, x, labels.to(label_dtype), 5, 1e-5, 1e-5, True)
    check_variation(backend, x, t, labels.to(label_dtype), 5, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_labels_on_strided_views(device, backend):
    """Labels that are a non-contiguous view (every other column of a wider map)."""
    wide = make_labels(2, (6, 14), 4, device)
    labels = wide[:, :, ::2]
    x = make_features((2, 3, 6, 7), torch.float32, "contiguous", device)
    check_pool(backend, x, labels, 4, 1e-5, 1e-5, True)


# ---------------------------------------------------------------------------------------------
# Determinism, gradients not requested, what autograd saves


def all_results(backend, s, t, labels, num_classes):
    """Every output and gradient of the three ops on these inputs."""
    a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    ps, counts = kdops.prototype_pool(a, labels, num_classes, backend=backend)
    pt, _ = kdops.prototype_pool(b, labels, num_classes, backend=backend)
    kl = kdops.prototype_kl(a, b, ps, pt, counts, backend=backend)
    batch_ps, batch_counts = kdops.prototype_pool(a, labels, num_classes, per_image=False, backend=backend)
    batch_pt, _ = kdops.prototype_pool(b, labels, num_classes, per_image=False, backend=backend)
    batch_kl = kdops.prototype_kl(a, b, batch_ps, batch_pt, batch_counts, backend=backend)
    variation = kdops.class_variation_loss(a, b, labels, num_classes, backend=backend)
    grads = torch.autograd.grad(kl + batch_kl + variation + ps.square().sum(), (a, b))
    return (ps, counts, kl, batch_ps, batch_kl, variation) + grads


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_bitwise_deterministic(device, backend):
    shape = (2, 6, 9, 13) if backend == "triton" else (2, 40, 33, 45)
    labels = make_labels(2, (shape[2] + 3, shape[3] - 2), 7, device)
    s = make_features(shape, torch.float32, "contiguous", device)
    t = make_features(shape, torch.float32, "channels_last", device, seed=1)
    first = all_results(backend, s, t, labels, 7)
    second = all_results(backend, s, t, labels, 7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_same_result_for_any_thread_count(device, backend):
    labels = make_labels(2, (33, 45), 7, device)
    s = make_features((2, 40, 33, 45), torch.float32, "contiguous", device)
    t = make_features((2, 40, 33, 45), torch.float32, "contiguous", device, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(all_results(backend, s, t, labels, 7))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", KL_BACKENDS)
@pytest.mark.parametrize("wanted", range(4), ids=["student", "teacher", "student_protos", "teacher_protos"])
def test_prototype_kl_one_gradient_requested(device, backend, wanted):
    inputs = kl_inputs((2, 3, 4, 5), 4, 4, (4, 5), torch.float32, "contiguous", device, True)
    tensors = [v.detach().requires_grad_(i == wanted) for i, v in enumerate(inputs[:4])]
    loss = kdops.prototype_kl(*tensors, inputs[4], backend=backend)
    with OpCalls("prototype_kl_backward", "class_variation_loss_backward", "prototype_pool_backward") as mode:
        loss.backward()
    ((args, grads),) = mode.calls
    assert tuple(args[-4:]) == tuple(i == wanted for i in range(4))
    for i, grad in enumerate(grads):
        assert (grad.numel() > 0) == (i == wanted)
    tensors64 = as_float64(*tensors)
    expected = torch.autograd.grad(ref.prototype_kl(*tensors64, inputs[4].cpu(), 0.1), tensors64[wanted])[0]
    assert_close(tensors[wanted].grad, expected, 1e-5, "gradient")


@pytest.mark.parametrize("device,backend", VARIATION_BACKENDS)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_class_variation_one_gradient_requested(device, backend, wanted):
    labels = make_labels(2, (4, 5), 3, device)
    s = make_features((2, 3, 4, 5), torch.float32, "contiguous", device).requires_grad_(wanted == "student")
    t = make_features((2, 2, 4, 5), torch.float32, "contiguous", device, seed=1).requires_grad_(wanted == "teacher")
    loss = kdops.class_variation_loss(s, t, labels, 3, backend=backend)
    with OpCalls("prototype_kl_backward", "class_variation_loss_backward", "prototype_pool_backward") as mode:
        loss.backward()
    ((args, (grad_s, grad_t)),) = mode.calls
    assert tuple(args[-2:]) == (wanted == "student", wanted == "teacher")
    assert (grad_s.numel() > 0) == (wanted == "student") and (grad_t.numel() > 0) == (wanted == "teacher")


def saved_tensors(fn, inputs):
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, [x for x in saved if not any(x.data_ptr() == i.data_ptr() for i in inputs)]


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
def test_saves_only_inputs_and_small_statistics(device, backend):
    """Beyond the inputs: the counts, and for class_variation_loss the (N, K, C) prototypes;
    never a (K × L) observation tensor or a tensor of the features' size."""
    n, c, h, w, k = 2, 6, 9, 10, 3
    labels = make_labels(n, (h, w), k, device)
    s = make_features((n, c, h, w), torch.float32, "contiguous", device).requires_grad_(True)
    t = make_features((n, c + 1, h, w), torch.float32, "contiguous", device, seed=1).requires_grad_(True)
    (protos, counts), extra = saved_tensors(lambda: kdops.prototype_pool(s, labels, k, backend=backend), [s, labels])
    assert [tuple(x.shape) for x in extra] == [(n, k)]  # the counts
    t_protos, _ = kdops.prototype_pool(t, labels, k, backend=backend)
    inputs = [s, t, protos, t_protos, counts]
    loss, extra = saved_tensors(lambda: kdops.prototype_kl(*inputs, backend=backend), inputs)
    assert extra == []
    loss, extra = saved_tensors(lambda: kdops.class_variation_loss(s, t, labels, k, backend=backend),
                                [s, t, labels])
    assert sorted(tuple(x.shape) for x in extra) == sorted([(n, k, c), (n, k, c + 1), (n, k)])


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, gradcheck, errors


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(device, backend, layout):
    namespace = ops(backend)
    labels = make_labels(2, (7, 4), 4, device)
    s = make_features((2, 3, 5, 6), torch.float32, layout, device)
    t = make_features((2, 4, 5, 6), torch.float32, layout, device, seed=1)
    s_protos, counts = namespace.prototype_pool(s, labels, 4, 255, True, False)
    t_protos, _ = namespace.prototype_pool(t, labels, 4, 255, True, False)
    b_ps, b_counts = namespace.prototype_pool(s, labels, 4, 255, False, False)
    b_pt, _ = namespace.prototype_pool(t, labels, 4, 255, False, False)
    _, vs, vt, vcounts = namespace.class_variation_loss(s, t, labels, 4, 255)
    grad = torch.tensor(1.5, device=device)
    sg, tg = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    cases = [
        (namespace.prototype_pool.default, (sg, labels, 4, 255, True, False)),
        (namespace.prototype_pool.default, (sg, labels, 4, 255, False, False)),
        (namespace.prototype_pool.default, (sg, labels, 4, 255, False, True)),
        (namespace.prototype_pool_backward.default, (torch.randn_like(s_protos), s, labels, counts, 255, False)),
        (namespace.prototype_pool_backward.default, (torch.randn_like(b_ps), s, labels, b_counts, 255, False)),
        (namespace.prototype_pool_backward.default, (torch.randn_like(s_protos), s, labels, counts, 255, True)),
        (namespace.prototype_kl.default,
         (sg, tg, s_protos.requires_grad_(True), t_protos.requires_grad_(True), counts, 0.1)),
        (namespace.prototype_kl.default, (sg, t, b_ps, b_pt, b_counts, 0.5)),
        (namespace.class_variation_loss.default, (sg, tg, labels, 4, 255)),
    ]
    for flags in [(True, True, True, True), (True, False, False, True), (False, True, True, False)]:
        cases.append((namespace.prototype_kl_backward.default,
                      (grad, s, t, s_protos.detach(), t_protos.detach(), counts, 0.1, *flags)))
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((namespace.class_variation_loss_backward.default,
                      (grad, s, t, labels, vs, vt, vcounts, 255, *flags)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", POOL_BACKENDS)
@pytest.mark.parametrize("op", ["prototype_pool", "prototype_kl", "class_variation_loss"])
def test_compile_fullgraph(device, backend, op):
    labels = make_labels(2, (7, 4), 4, device)
    s = make_features((2, 3, 5, 6), torch.float32, "contiguous", device)
    t = make_features((2, 4, 5, 6), torch.float32, "contiguous", device, seed=1)

    def loss_fn(a, b):
        if op == "prototype_pool":
            protos, counts = kdops.prototype_pool(a, labels, 4, per_image=False, backend=backend)
            return protos.square().sum() + counts.sum()
        if op == "class_variation_loss":
            return 2.0 * kdops.class_variation_loss(a, b, labels, 4, backend=backend)
        ps, counts = kdops.prototype_pool(a, labels, 4, backend=backend)
        pt, _ = kdops.prototype_pool(b, labels, 4, backend=backend)
        return 2.0 * kdops.prototype_kl(a, b, ps, pt, counts, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    results = []
    for fn in (loss_fn, compiled):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        loss = fn(a, b)
        results.append((loss,) + torch.autograd.grad(loss, (a, b), allow_unused=True, materialize_grads=True))
    assert counter.frame_count == 1
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(device, backend, layout):
    labels = make_labels(2, (5, 3), 3, device, seed=4)
    s = make_features((2, 3, 4, 5), torch.float64, layout, device).requires_grad_(True)
    t = make_features((2, 2, 4, 5), torch.float64, layout, device, seed=1).requires_grad_(True)
    for per_image in (True, False):
        assert torch.autograd.gradcheck(
            lambda a: kdops.prototype_pool(a, labels, 3, per_image=per_image, backend=backend)[0], (s,))
        assert torch.autograd.gradcheck(
            lambda a: kdops.prototype_pool(a, labels, 3, per_image=per_image, normalize_features=True,
                                           backend=backend)[0], (s,))
        protos, counts = ref.prototype_pool(s.detach(), labels, 3, per_image=per_image)
        t_protos, _ = ref.prototype_pool(t.detach(), labels, 3, per_image=per_image)
        protos.requires_grad_(True)
        t_protos.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b, pa, pb: kdops.prototype_kl(a, b, pa, pb, counts, 0.3, backend=backend),
            (s, t, protos, t_protos))
    assert torch.autograd.gradcheck(
        lambda a, b: kdops.class_variation_loss(a, b, labels, 3, backend=backend), (s, t))
    # APD's chain: prototypes pooled from the features they are compared with.
    assert torch.autograd.gradcheck(
        lambda a, b: kdops.prototype_kl(
            a, b, kdops.prototype_pool(a, labels, 3, per_image=False, backend=backend)[0],
            kdops.prototype_pool(b, labels, 3, per_image=False, backend=backend)[0],
            ref.prototype_pool(a.detach(), labels, 3, per_image=False)[1], 0.5, backend=backend),
        (s, t))


def assert_op_argument_errors(s, t, labels):
    """The argument errors every device's ops raise, each naming its argument (s: (2, 3, 4, 5),
    t: (2, 2, 4, 5), labels of 3 classes)."""
    namespace = torch.ops.kdops
    with pytest.raises(TypeError, match="^labels"):
        namespace.prototype_pool(s, labels.float(), 3, 255, True, False)
    with pytest.raises(ValueError, match="^labels"):
        namespace.prototype_pool(s, labels[:1], 3, 255, True, False)
    with pytest.raises(ValueError, match="^num_classes"):
        namespace.prototype_pool(s, labels, 0, 255, True, False)
    with pytest.raises(ValueError, match="^teacher"):
        namespace.class_variation_loss(s, t[..., :3], labels, 3, 255)
    protos, counts = namespace.prototype_pool(s, labels, 3, 255, True, False)
    t_protos, _ = namespace.prototype_pool(t, labels, 3, 255, True, False)
    with pytest.raises(ValueError, match="^teacher_protos"):
        namespace.prototype_kl(s, t, protos, protos, counts, 0.1)
    with pytest.raises(ValueError, match="^counts"):
        namespace.prototype_kl(s, t, protos, t_protos, counts[:, :2], 0.1)
    with pytest.raises(TypeError, match="^counts"):
        namespace.prototype_kl(s, t, protos, t_protos, counts.float(), 0.1)
    with pytest.raises(ValueError, match="^tau"):
        namespace.prototype_kl(s, t, protos, t_protos, counts, 0.0)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_op_errors_name_the_argument(device, backend):
    """The ops themselves check their arguments (direct torch.ops calls, compiled graphs where
    the public API's label check is skipped): out-of-range labels raise at once."""
    s = make_features((2, 3, 4, 5), torch.float32, "contiguous", device)
    t = make_features((2, 2, 4, 5), torch.float32, "contiguous", device, seed=1)
    labels = make_labels(2, (4, 5), 3, device)
    bad = labels.clone()
    bad[1, 2, 3] = 3
    namespace = torch.ops.kdops
    with pytest.raises(ValueError, match=r"^labels hold 3, outside \[0, num_classes=3\)"):
        namespace.prototype_pool(s, bad, 3, 255, True, False)
    with pytest.raises(ValueError, match="^labels hold -2"):
        namespace.class_variation_loss(s, t, bad.masked_fill(bad == 0, -2), 3, 255)
    assert_op_argument_errors(s, t, labels)

    compiled = torch.compile(lambda a, y: kdops.prototype_pool(a, y, 3, backend=backend)[0].sum(),
                             fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    # The compiled graph's first check is the public API's device-side assert (or, past it, the
    # op's own): either names the labels.
    with pytest.raises(Exception, match="labels hold"):
        compiled(s, bad)


@pytest.mark.parametrize("op", ["prototype_pool", "prototype_kl", "class_variation_loss"])
def test_cuda_backend_on_cpu_tensors_says_why(op):
    s = make_features((2, 3, 4, 5), torch.float32, "contiguous", "cpu")
    labels = make_labels(2, (4, 5), 3, "cpu")
    protos, counts = ref.prototype_pool(s, labels, 3)
    args = {
        "prototype_pool": (s, labels, 3),
        "prototype_kl": (s, s, protos, protos, counts),
        "class_variation_loss": (s, s, labels, 3),
    }[op]
    with pytest.raises(kd_backend.BackendUnavailableError, match="cuda"):
        getattr(kdops, op)(*args, backend="cuda")


# ---------------------------------------------------------------------------------------------
# The CUDA kernels: what only they have


def skip_without_cuda_kernels(op="prototype_pool"):
    reason = kd_backend.unavailable_reason(op, "cuda", "cuda", torch.float32)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_cuda_float64_kernels_gradcheck(per_image):
    """The CUDA kernels' float64 path (float64 accumulation), through the ops directly (the public
    API sends float64 CUDA tensors to the reference): gradcheck and the CPU kernels' values."""
    skip_without_cuda_kernels()
    ops_ = torch.ops.kdops
    labels = make_labels(2, (5, 3), 3, "cuda", seed=4)
    s = make_features((2, 3, 4, 5), torch.float64, "contiguous", "cuda").requires_grad_(True)
    t = make_features((2, 2, 4, 5), torch.float64, "channels_last", "cuda", seed=1).requires_grad_(True)
    for normalize in (False, True):
        assert torch.autograd.gradcheck(
            lambda a: ops_.prototype_pool(a, labels, 3, 255, per_image, normalize)[0], (s,))
        got = ops_.prototype_pool(s, labels, 3, 255, per_image, normalize)
        expected = ops_.prototype_pool(s.detach().cpu(), labels.cpu(), 3, 255, per_image, normalize)
        torch.testing.assert_close(got[0].cpu(), expected[0], rtol=1e-12, atol=1e-14)
        assert torch.equal(got[1].cpu(), expected[1])
    protos, counts = ops_.prototype_pool(s.detach(), labels, 3, 255, per_image, False)
    t_protos, _ = ops_.prototype_pool(t.detach(), labels, 3, 255, per_image, False)
    protos.requires_grad_(True)
    t_protos.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b, pa, pb: ops_.prototype_kl(a, b, pa, pb, counts, 0.3), (s, t, protos, t_protos))
    loss = ops_.prototype_kl(s, t, protos, t_protos, counts, 0.3)
    expected = ops_.prototype_kl(*(v.detach().cpu() for v in (s, t, protos, t_protos)), counts.cpu(), 0.3)
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-12, atol=1e-14)
    if per_image:
        assert torch.autograd.gradcheck(
            lambda a, b: ops_.class_variation_loss(a, b, labels, 3, 255)[0], (s, t))


@pytest.mark.needs_cuda
def test_cuda_matches_cpu_kernels_on_a_large_case():
    """A realistic shape (several class-sum units, prototype_kl chunks and 32-class groups)
    against the CPU kernels, float32, every output and gradient."""
    skip_without_cuda_kernels()
    labels = make_labels(2, (96, 128), 40, "cpu", ignored=0.1, seed=11)
    s = make_features((2, 64, 48, 64), torch.float32, "contiguous", "cpu", seed=12)
    t = make_features((2, 96, 48, 64), torch.float32, "contiguous", "cpu", seed=13)
    cpu = all_results("cpu", s, t, labels, 40)
    cuda = all_results("cuda", s.cuda(), t.cuda(), labels.cuda(), 40)
    names = ("protos", "counts", "kl", "batch protos", "batch kl", "variation", "grad s", "grad t")
    for name, a, b in zip(names, cuda, cpu):
        assert a.dtype == b.dtype, name
        if not a.dtype.is_floating_point:
            assert torch.equal(a.cpu(), b), name
        else:
            assert_close(a, b, 2e-5, name, unit=pixel_unit(s) if name.startswith("grad") else 0.0)


@pytest.mark.needs_cuda
def test_cuda_label_outside_the_classes_is_a_device_side_error():
    """The ops themselves (no public-API check) flag a bad label; the flag is a device-side
    assert, which ends its CUDA context, so it runs in a process of its own."""
    skip_without_cuda_kernels()
    script = textwrap.dedent("""
        import torch, kdops
        x = torch.randn(2, 3, 4, 5, device="cuda")
        labels = torch.zeros(2, 4, 5, dtype=torch.uint8, device="cuda")
        labels[1, 2, 3] = 7
        try:
            torch.ops.kdops.prototype_pool(x, labels, 3, 255, True, False)
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("raised:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "labels hold a label outside [0, num_classes)" in result.stdout + result.stderr


@pytest.mark.needs_cuda
def test_cuda_labels_of_every_integer_dtype_and_strides():
    """The CUDA kernels read the labels in their own dtype and strides (no converted copy)."""
    skip_without_cuda_kernels()
    wide = make_labels(2, (9, 22), 5, "cuda")
    x = make_features((2, 4, 6, 7), torch.float32, "contiguous", "cuda")
    expected = ref.prototype_pool(x.cpu(), wide[:, :, ::2].cpu(), 5)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        labels = wide.to(dtype)[:, :, ::2]
        assert not labels.is_contiguous()
        ignore_index = -1 if dtype == torch.int8 else 255  # 255 wraps to -1 in int8
        protos, counts = torch.ops.kdops.prototype_pool(x, labels, 5, ignore_index, True, False)
        assert torch.equal(counts.cpu(), expected[1]), dtype
        assert_close(protos, expected[0], 1e-5, f"protos {dtype}")


@pytest.mark.needs_cuda
def test_cuda_op_errors_name_the_argument():
    """The CUDA ops check their arguments like the CPU ones (label values are device-side)."""
    skip_without_cuda_kernels()
    s = make_features((2, 3, 4, 5), torch.float32, "contiguous", "cuda")
    t = make_features((2, 2, 4, 5), torch.float32, "contiguous", "cuda", seed=1)
    labels = make_labels(2, (4, 5), 3, "cuda")
    assert_op_argument_errors(s, t, labels)
    namespace = torch.ops.kdops
    with pytest.raises(ValueError, match="^labels"):
        namespace.prototype_pool(s, labels.cpu(), 3, 255, True, False)
    with pytest.raises(TypeError, match="^x"):
        namespace.prototype_pool(s.int(), labels, 3, 255, True, False)
    protos, counts = namespace.prototype_pool(s, labels, 3, 255, True, False)
    t_protos, _ = namespace.prototype_pool(t, labels, 3, 255, True, False)
    with pytest.raises(ValueError, match="^counts"):
        namespace.prototype_kl(s, t, protos, t_protos, counts.cpu(), 0.1)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("op", ["pool", "pool-normalized", "kl", "kl-protos", "variation"])
def test_cuda_no_feature_sized_temporaries(op):
    """Forward + backward allocate nothing of the features' size beyond the gradients: the
    per-unit and per-chunk partial sums and the per-pixel statistics stay well under it."""
    skip_without_cuda_kernels()
    n, c, h, w, k = 2, 64, 64, 64, 19
    labels = make_labels(n, (h, w), k, "cuda", seed=3)
    s = make_features((n, c, h, w), torch.float32, "contiguous", "cuda", seed=1).requires_grad_(True)
    t = make_features((n, c, h, w), torch.float32, "contiguous", "cuda", seed=2).requires_grad_(True)
    s_protos, counts = kdops.prototype_pool(s.detach(), labels, k, backend="cuda")
    t_protos, _ = kdops.prototype_pool(t.detach(), labels, k, backend="cuda")

    def run():
        if op.startswith("pool"):
            protos, _ = kdops.prototype_pool(s, labels, k, normalize_features=op == "pool-normalized",
                                             backend="cuda")
            return protos.square().sum(), (s,)
        if op == "kl":
            return kdops.prototype_kl(s, t, s_protos, t_protos, counts, backend="cuda"), (s, t)
        if op == "kl-protos":  # with the prototypes' gradients: the per-chunk partial sums
            ps, pt = s_protos.requires_grad_(True), t_protos.requires_grad_(True)
            return kdops.prototype_kl(s, t, ps, pt, counts, backend="cuda"), (s, t, ps, pt)
        return kdops.class_variation_loss(s, t, labels, k, backend="cuda"), (s, t)

    run()  # warm-up: the allocator's pools, lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, inputs = run()
    grads = torch.autograd.grad(loss, inputs)
    torch.cuda.synchronize()
    gradient_bytes = sum(g.numel() * g.element_size() for g in grads)
    extra = torch.cuda.max_memory_allocated() - base - gradient_bytes
    feature_bytes = s.numel() * s.element_size() + t.numel() * t.element_size()
    assert extra <= 0.5 * feature_bytes, (extra, feature_bytes)


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "reference", id="cpu-reference"), *POOL_BACKENDS])
def test_nan_in_ignored_pixels_reaches_no_gradient_of_normalised_pooling(device, backend):
    """Found by the fuzz suite: the reference normalised every pixel before zeroing the ignored
    ones, so NaN there came back through normalize's backward. Every backend: finite prototypes,
    a gradient that is 0 at the ignored pixels and finite everywhere."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(4))
    labels[0, 1, 2] = labels[1, 3, 0] = 255
    x[0, :, 1, 2] = float("nan")
    x[1, :, 3, 0] = float("inf")
    a = x.to(device).requires_grad_(True)
    protos, _ = kdops.prototype_pool(a, labels.to(device), 3, 255, per_image=False,
                                     normalize_features=True, backend=backend)
    assert torch.isfinite(protos).all()
    (protos * torch.linspace(-1, 1, protos.numel(), device=device).reshape(protos.shape)).sum().backward()
    assert torch.isfinite(a.grad).all()
    assert (a.grad[0, :, 1, 2] == 0).all() and (a.grad[1, :, 3, 0] == 0).all()
