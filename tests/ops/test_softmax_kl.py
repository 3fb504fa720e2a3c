"""The fused backends of channel_kl and pixel_kl against the float64 reference.

Every fused backend that implements the ops runs here (``backend_params``): the C++ CPU
kernels, the Triton kernels (under TRITON_INTERPRET=1 on machines without a GPU: small shapes)
and the CUDA kernels on GPU machines. The extension's ops live in ``torch.ops.kdops``, the
Triton ones in ``torch.ops.kdops_triton``, with the same schemas.
"""
import importlib
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kdops
from kdops import backend as kd_backend
from kdops.reference import softmax_kl as ref
from tests.utils import LAYOUTS, TOLERANCES, OpCalls, backend_params, make_layout, relative_error

CHANNEL_BACKENDS = backend_params("channel_kl")
PIXEL_BACKENDS = backend_params("pixel_kl")
CPU_ONLY = [p for p in CHANNEL_BACKENDS if p.id == "cpu-cpu"]

# Small enough for the Triton interpreter (≤ 4·8·9·11 elements).
SHAPES = [
    pytest.param((2, 3, 5, 7), id="odd-5x7"),
    pytest.param((1, 1, 4, 4), id="N1-C1"),
    pytest.param((2, 4, 1, 1), id="L1"),
    pytest.param((3, 5, 1, 9), id="H1"),
    pytest.param((4, 8, 9, 11), id="4x8x9x11"),
]
# CPU only: rows longer than one work chunk (8192) with a ragged tail; rows just longer than the
# short-row path's limit (256), with a scalar tail; more channels than one SIMD vector (channels
# layout) and many short rows in several groups of a vector's width (short-row path).
LARGE_SHAPES = [
    pytest.param((1, 3, 100, 171), id="long-rows-L17100"),
    pytest.param((2, 3, 1, 263), id="L263"),
    pytest.param((2, 40, 6, 7), id="C40"),
    pytest.param((64, 7, 3, 5), id="many-short-rows"),
    pytest.param((3, 19, 33, 65), id="cityscapes-like"),
]
TAUS = [pytest.param(0.5, id="tau0.5"), pytest.param(4.0, id="tau4")]


def ops(backend):
    """The op namespace of a fused backend (same schemas in both)."""
    if backend == "triton":
        importlib.import_module("kdops.triton.channel_kl")
        importlib.import_module("kdops.triton.pixel_kl")
        return torch.ops.kdops_triton
    return torch.ops.kdops


def make_pair(shape, dtype, layout, device, seed=0):
    """Student and teacher logits in `dtype` and `layout` (the values rounded to dtype)."""
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(shape, generator=g)).to(dtype)
    t = (2 * torch.randn(shape, generator=g)).to(dtype)
    return make_layout(s.to(device), layout), make_layout(t.to(device), layout)


def make_target(shape, device, ignored=0.3, seed=1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    target[torch.rand(target.shape, generator=g) < ignored] = 255
    return target.to(device=device, dtype=dtype)


def layouts_for(shape):
    return [layout for layout in LAYOUTS if layout != "channels_last" or len(shape) == 4]


def reference_loss_and_grads(op, s, t, tau, **kwargs):
    """The reference loss and gradients, evaluated in float64 on the same (rounded) values."""
    s64 = s.detach().double().cpu().requires_grad_(True)
    t64 = t.detach().double().cpu().requires_grad_(True)
    if kwargs.get("target") is not None:
        kwargs["target"] = kwargs["target"].cpu()
    loss = getattr(ref, op)(s64, t64, tau, **kwargs)
    grad_s, grad_t = torch.autograd.grad(loss, (s64, t64))
    return loss.detach(), grad_s, grad_t


def gradient_unit(op, s, tau, target=None, ignore_index=255):
    """The largest magnitude a gradient element can reach, τ/(N·C) or τ/#valid pixels
    (|q − p| ≤ 1): the scale for elements whose exact gradient is 0 (rows of one element)."""
    if op == "channel_kl":
        return tau / (s.shape[0] * s.shape[1])
    valid = s[:, 0].numel() if target is None else int((target != ignore_index).sum())
    return tau / max(valid, 1)


def assert_grad_close(got, expected, tol, name, unit):
    """Relative-norm error, and every element within tol of the gradient's scale (no element left
    unwritten or wrong where the norm would hide it)."""
    assert got is not None, f"no gradient for {name}"
    assert got.shape == expected.shape
    assert torch.isfinite(got).all(), f"{name} gradient has non-finite values"
    assert relative_error(got, expected) <= tol, f"{name}: {relative_error(got, expected):.3g} > {tol}"
    scale = max(expected.abs().max().item(), unit)
    worst = (got.double().cpu() - expected).abs().max().item()
    assert worst <= tol * scale, f"{name}: max element error {worst:.3g} vs scale {scale:.3g}"


def check_against_reference(op, backend, s, t, tau, loss_tol, grad_tol, **kwargs):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = getattr(kdops, op)(s, t, tau, **kwargs, backend=backend)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(op, s, t, tau, **kwargs)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    unit = gradient_unit(op, s, tau, **kwargs)
    assert_grad_close(grad_s, grad_s_ref, grad_tol, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, grad_tol, "teacher", unit)


# ---------------------------------------------------------------------------------------------
# Loss and gradients against the reference


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_kl_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape):
    for layout in layouts_for(shape):
        s, t = make_pair(shape, dtype, layout, device)
        check_against_reference("channel_kl", backend, s, t, 1.0, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_pixel_kl_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, with_target):
    target = make_target(shape, device) if with_target else None
    for layout in layouts_for(shape):
        s, t = make_pair(shape, dtype, layout, device)
        check_against_reference("pixel_kl", backend, s, t, 1.0, loss_tol, grad_tol, target=target)


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_kl_tau(device, backend, tau, layout):
    s, t = make_pair((2, 3, 5, 7), torch.float32, layout, device, seed=2)
    check_against_reference("channel_kl", backend, s, t, tau, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pixel_kl_tau(device, backend, tau, layout):
    s, t = make_pair((2, 3, 5, 7), torch.float32, layout, device, seed=3)
    target = make_target((2, 3, 5, 7), device)
    check_against_reference("pixel_kl", backend, s, t, tau, 1e-5, 1e-5, target=target)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", LARGE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_shapes_cpu(device, backend, dtype, loss_tol, grad_tol, shape, layout):
    s, t = make_pair(shape, dtype, layout, device, seed=4)
    check_against_reference("channel_kl", backend, s, t, 2.0, loss_tol, grad_tol)
    target = make_target(shape, device, seed=5)
    check_against_reference("pixel_kl", backend, s, t, 2.0, loss_tol, grad_tol, target=target)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_pixel_kl_label_dtypes(device, backend, label_dtype):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device, seed=6)
    target = make_target((2, 3, 5, 7), device, dtype=label_dtype)
    check_against_reference("pixel_kl", backend, s, t, 1.0, 1e-5, 1e-5, target=target)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
def test_pixel_kl_ignore_index_other_than_255(device, backend):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device, seed=7)
    target = make_target((2, 3, 5, 7), device)
    target[target == 255] = -1
    check_against_reference("pixel_kl", backend, s, t, 1.0, 1e-5, 1e-5, target=target, ignore_index=-1)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pixel_kl_all_pixels_ignored(device, backend, layout):
    s, t = make_pair((2, 3, 5, 7), torch.float32, layout, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    target = torch.full((2, 5, 7), 255, device=device)
    loss = kdops.pixel_kl(s, t, 1.0, target, backend=backend)
    assert loss.item() == 0.0
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert torch.equal(grad_s, torch.zeros_like(grad_s))
    assert torch.equal(grad_t, torch.zeros_like(grad_t))
    _, num_valid = ops(backend).pixel_kl(s, t, target, 255, 1.0)
    assert int(num_valid) == 0


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_rising_logits(device, backend, layout):
    """Logits that climb along the row (L for channel_kl, C for pixel_kl) by far more than the
    kernels' rescaling slack: the running maxima are raised again and again mid-row."""
    shape = (2, 6, 7, 9) if backend == "triton" else (2, 6, 30, 41)
    s, t = make_pair(shape, torch.float32, "contiguous", device, seed=8)
    along_l = torch.linspace(0, 40, shape[2] * shape[3], device=device).reshape(shape[2:])
    along_c = torch.linspace(0, 40, shape[1], device=device)[:, None, None]
    for ramp, op in ((along_l, "channel_kl"), (along_c, "pixel_kl")):
        a = make_layout(s + ramp, layout)
        b = make_layout(t + 0.5 * ramp, layout)
        check_against_reference(op, backend, a, b, 0.5, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
def test_identical_inputs_give_zero(device, backend):
    """s = t: every KL term vanishes exactly in the one-pass form (no cancellation)."""
    s, _ = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    assert abs(kdops.channel_kl(s, s.clone(), 2.0, backend=backend).item()) <= 1e-7
    assert abs(kdops.pixel_kl(s, s.clone(), 2.0, backend=backend).item()) <= 1e-7


# ---------------------------------------------------------------------------------------------
# Extreme inputs (issue 7): the float64 oracle below is written here, independent of the reference.


def oracle(op, s, t, tau, target=None, ignore_index=255):
    """Loss and gradients of channel_kl / pixel_kl in float64, from the formulas of DESIGN.md:
    log-softmaxes of s/τ and t/τ, KL terms p (log p − log q) taken as 0 where p = 0, ignored
    pixels' logits replaced by 0 before anything is computed (they count for nothing),
    gradients in closed form: τ·w·(q − p) and τ·w·p (log p − log q − KL) (0 where p = 0),
    w = 1/(N·C) or 1/max(#valid, 1) (0 at ignored pixels)."""
    s = s.detach().double().cpu()
    t = t.detach().double().cpu()
    if op == "channel_kl":
        dim, weight = 2, torch.full(s.shape[:2], 1.0 / (s.shape[0] * s.shape[1]), dtype=s.dtype)
        s, t = s.reshape(*s.shape[:2], -1), t.reshape(*t.shape[:2], -1)
    else:
        dim = 1
        valid = torch.ones(s.shape[:1] + s.shape[2:], dtype=torch.bool)
        if target is not None:
            valid = target.cpu() != ignore_index
            s = s.masked_fill(~valid.unsqueeze(1), 0.0)
            t = t.masked_fill(~valid.unsqueeze(1), 0.0)
        weight = valid.double() / max(int(valid.sum()), 1)
    log_q = (s / tau).log_softmax(dim)
    log_p = (t / tau).log_softmax(dim)
    p, q = log_p.exp(), log_q.exp()
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=s.dtype))
    kl = (p * log_ratio).sum(dim, keepdim=True)
    w = weight.unsqueeze(dim)
    loss = (kl * w).sum() * tau * tau
    grad_s = tau * w * (q - p)
    grad_t = torch.where(p > 0, tau * w * p * (log_ratio - kl), torch.zeros((), dtype=s.dtype))
    return loss, grad_s, grad_t


def loss_and_grads(op, backend, s, t, tau, **kwargs):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = getattr(kdops, op)(s, t, tau, **kwargs, backend=backend)
    return (loss,) + torch.autograd.grad(loss, (s, t))


def assert_matches_oracle(op, backend, s, t, tau, loss_tol=1e-5, grad_tol=1e-5, **kwargs):
    """Loss and both gradients against the float64 oracle (fp32 tolerances of DESIGN.md)."""
    loss, grad_s, grad_t = loss_and_grads(op, backend, s, t, tau, **kwargs)
    expected, grad_s_ref, grad_t_ref = oracle(op, s, t, tau, **kwargs)
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    for name, got, ref_grad in (("student", grad_s, grad_s_ref), ("teacher", grad_t, grad_t_ref)):
        assert torch.isfinite(got).all(), f"{name} gradient has non-finite values"
        got = got.double().cpu().reshape(ref_grad.shape)
        assert relative_error(got, ref_grad) <= grad_tol, (name, relative_error(got, ref_grad))
    return loss, grad_s, grad_t


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
def test_pixel_kl_large_logits_issue_reproducer(device, backend):
    """Issue 7, item 1: logits near 900 against logits near 0 (the softmax of the student is
    formed after the max shift, and the backward's log q from the max and log z kept apart)."""
    s = torch.tensor([902.71576, 902.44110], device=device).reshape(1, 2, 1, 1)
    t = torch.tensor([-0.37490556, -0.11977036], device=device).reshape(1, 2, 1, 1)
    assert_matches_oracle("pixel_kl", backend, s, t, 1.0, loss_tol=2e-6, grad_tol=2e-6)


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus-1e3", "plus-1e4"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offset_logits(device, backend, op, offset, layout):
    """Issue 7, item 1: randn(2, 7, 13, 11) + offset on both inputs, τ = 1 and 0.5: rounding
    of k·x at |x| = 1e4 (1e-3 absolute) would show as gradient errors ≥ 1e-4."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 7, 13, 11, generator=g) + offset
    t = torch.randn(2, 7, 13, 11, generator=g) + offset
    s, t = make_layout(s.to(device), layout), make_layout(t.to(device), layout)
    for tau in (1.0, 0.5):
        assert_matches_oracle(op, backend, s, t, tau)


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
def test_uniform_rows_give_exactly_zero(device, backend):
    """Issue 7, item 1: uniform rows (s ≡ 0.0066895, t ≡ 122.49455, τ = 0.14094782) have
    p = q: the KL is exactly 0, never negative."""
    tau = 0.14094782
    for shape, op in (((1, 1, 1, 20), "channel_kl"), ((1, 20, 1, 1), "pixel_kl"),
                      ((2, 3, 4, 5), "channel_kl"), ((2, 3, 4, 5), "pixel_kl")):
        s = torch.full(shape, 0.0066895, device=device)
        t = torch.full(shape, 122.49455, device=device)
        loss, grad_s, grad_t = loss_and_grads(op, backend, s, t, tau)
        assert loss.item() == 0.0, (op, shape, loss.item())
        assert grad_s.abs().max().item() <= 1e-7 and grad_t.abs().max().item() <= 1e-7


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_smallest_tau(device, backend, op, layout):
    """Issue 7, item 2: τ = 1e-6, the smallest τ the API takes: finite, exact loss and
    gradients (the softmaxes are one-hot up to ties; exponents reach −1e6)."""
    g = torch.Generator().manual_seed(11)
    s = make_layout(torch.randn(2, 5, 4, 6, generator=g).to(device), layout)
    t = make_layout(torch.randn(2, 5, 4, 6, generator=g).to(device), layout)
    assert_matches_oracle(op, backend, s, t, 1e-6)


def roundoff_bounds(op, s, t, tau):
    """What float32 round-off in the shift-safe one-pass algorithm can move the loss and the
    gradients by (norms), for inputs without ignored pixels or infinities: 16·u (u = 2⁻²⁴, a
    handful of operations per term) times the condition κ_i = |ds_i| + |dt_i| + log z_s +
    log z_t + 1 of each element (ds = (s − max s)/τ: the sizes of the numbers rounded), summed
    with the weights each result gives them: loss τ²·w·Σ p κ; ∂/∂s τ·w·(q + p)·κ (q − p
    cancels); ∂/∂t τ·w·p·(κ + |log p − log q − KL| + Σ p κ)."""
    s = s.detach().double().cpu()
    t = t.detach().double().cpu()
    if op == "channel_kl":
        dim, weight = 2, 1.0 / (s.shape[0] * s.shape[1])
        s, t = s.reshape(*s.shape[:2], -1), t.reshape(*t.shape[:2], -1)
    else:
        dim, weight = 1, 1.0 / (s.numel() // s.shape[1])
    ds = (s - s.amax(dim, keepdim=True)) / tau
    dt = (t - t.amax(dim, keepdim=True)) / tau
    log_zs, log_zt = ds.logsumexp(dim, keepdim=True), dt.logsumexp(dim, keepdim=True)
    log_q, log_p = ds - log_zs, dt - log_zt
    q, p = log_q.exp(), log_p.exp()
    kappa = ds.abs() + dt.abs() + log_zs + log_zt + 1.0
    mean_kappa = (p * kappa).sum(dim, keepdim=True)
    kl = (p * (log_p - log_q)).sum(dim, keepdim=True)
    u = 16 * 2.0**-24
    loss = u * tau * tau * weight * mean_kappa.sum().item()
    grad_s = u * (tau * weight * (q + p) * kappa).norm().item()
    grad_t = u * (tau * weight * p * (kappa + (log_p - log_q - kl).abs() + mean_kappa)).norm().item()
    return loss, grad_s, grad_t


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize("tau", [1e2, 1e4, 1e6], ids=["tau1e2", "tau1e4", "tau1e6"])
def test_large_tau(device, backend, op, tau):
    """Large τ, up to 1e6 (the largest the API takes): finite loss and gradients, each within
    DESIGN's float32 tolerance or within what float32 round-off can explain (roundoff_bounds).
    At large τ a row's KL (~1/τ²) is the difference of log-sums of size log L, and q − p
    (~1/(τL)) of probabilities of size 1/L: float32 sums cannot resolve them better."""
    g = torch.Generator().manual_seed(12)
    s = torch.randn(2, 5, 4, 6, generator=g).to(device)
    t = torch.randn(2, 5, 4, 6, generator=g).to(device)
    loss, grad_s, grad_t = loss_and_grads(op, backend, s, t, tau)
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    expected, grad_s_ref, grad_t_ref = oracle(op, s, t, tau)
    loss_bound, grad_s_bound, grad_t_bound = roundoff_bounds(op, s, t, tau)
    error = abs(loss.item() - expected.item())
    assert error <= max(1e-5 * abs(expected.item()), loss_bound), (error, loss_bound)
    for got, ref_grad, bound in ((grad_s, grad_s_ref, grad_s_bound), (grad_t, grad_t_ref, grad_t_bound)):
        error = (got.double().cpu().reshape(ref_grad.shape) - ref_grad).norm().item()
        assert error <= max(1e-5 * ref_grad.norm().item(), bound), (error, bound)


# (op, position of the infinite logit in a (2, 5, 4, 6) input): the first element a row's pass
# reads (a running maximum starts at −inf), and one inside a row.
INF_POSITIONS = [
    pytest.param("channel_kl", (0, 1, 0, 0), id="channel-first"),
    pytest.param("channel_kl", (1, 3, 2, 4), id="channel-inside"),
    pytest.param("pixel_kl", (0, 0, 1, 2), id="pixel-first"),
    pytest.param("pixel_kl", (1, 3, 2, 4), id="pixel-inside"),
]


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op,where", INF_POSITIONS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_teacher_minus_inf_is_probability_zero(device, backend, op, where, layout):
    """Issue 7, item 3: a teacher −inf is p = 0 exactly: 0·log 0 = 0, a finite loss, finite
    gradients and a teacher gradient of exactly 0 there; also with the student −inf at the same
    entry (both probabilities 0: no term)."""
    g = torch.Generator().manual_seed(13)
    s = torch.randn(2, 5, 4, 6, generator=g)
    t = torch.randn(2, 5, 4, 6, generator=g)
    t[where] = float("-inf")
    for student_too in (False, True):
        s_case = s.clone()
        if student_too:
            s_case[where] = float("-inf")
        a = make_layout(s_case.to(device), layout)
        b = make_layout(t.to(device), layout)
        _, _, grad_t = assert_matches_oracle(op, backend, a, b, 1.0)
        assert grad_t[where].item() == 0.0


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op,where", INF_POSITIONS)
def test_student_minus_inf_gives_infinite_loss(device, backend, op, where):
    """Issue 7, item 3: a student −inf where p > 0 makes the KL +inf: the loss is +inf, not NaN."""
    g = torch.Generator().manual_seed(14)
    s = torch.randn(2, 5, 4, 6, generator=g)
    t = torch.randn(2, 5, 4, 6, generator=g)
    s[where] = float("-inf")
    loss = getattr(kdops, op)(s.to(device), t.to(device), 1.0, backend=backend)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_minus_inf_across_chunks_cpu(device, backend, layout):
    """Rows longer than one work chunk (8192) whose first chunk holds only −inf teacher logits
    (its partial state has student mass and no teacher mass: it must not be dropped as empty),
    or only −inf student logits (the KL is +inf)."""
    g = torch.Generator().manual_seed(15)
    s = torch.randn(1, 3, 100, 100, generator=g)
    t = torch.randn(1, 3, 100, 100, generator=g)
    t[0, 1].view(-1)[:9000] = float("-inf")
    t[0, 2].view(-1)[:3] = float("-inf")
    a, b = make_layout(s, layout), make_layout(t, layout)
    assert_matches_oracle("channel_kl", backend, a, b, 1.0)
    s[0, 1].view(-1)[:9000] = float("-inf")
    t[0, 1].view(-1)[:9000] = 0.0
    loss = kdops.channel_kl(make_layout(s, layout), make_layout(t, layout), 1.0, backend=backend)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pixel_kl_never_reads_ignored_pixels(device, backend, layout):
    """Issue 7, item 3: ignored pixels count for nothing whatever they hold (NaN, ±inf logits):
    the loss and gradients equal those of clean inputs, ignored pixels' gradients are 0."""
    s, t = make_pair((2, 3, 5, 7), torch.float32, layout, device)
    target = make_target((2, 3, 5, 7), device)
    ignored = (target == 255).unsqueeze(1).expand_as(s)
    for fill_s, fill_t in ((float("nan"), float("inf")), (float("-inf"), float("nan")),
                           (float("inf"), float("-inf"))):
        poisoned_s = s.masked_fill(ignored, fill_s)
        poisoned_t = t.masked_fill(ignored, fill_t)
        _, grad_s, grad_t = assert_matches_oracle(
            "pixel_kl", backend, poisoned_s, poisoned_t, 1.0, target=target
        )
        assert not grad_s[ignored].any() and not grad_t[ignored].any()


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
def test_pixel_kl_all_ignored_with_nan_inputs(device, backend):
    """Issue 7, item 3: every pixel ignored and NaN logits: loss 0 and zero gradients."""
    s = torch.full((2, 3, 5, 7), float("nan"), device=device)
    t = torch.full((2, 3, 5, 7), float("nan"), device=device)
    target = torch.full((2, 5, 7), 255, device=device)
    loss, grad_s, grad_t = loss_and_grads("pixel_kl", backend, s, t, 1.0, target=target)
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s))
    assert torch.equal(grad_t, torch.zeros_like(grad_t))


# ---------------------------------------------------------------------------------------------
# The ops: saved statistics, gradients not requested, what autograd saves


def assert_row_stats(loss, row_stats, s, t, tau):
    """channel_kl's row_stats (N·C, 5) = per row [max_s, log z_s, max_t, log z_t, KL]: each
    "max" a logit of the row (raw units) at most kKLSlack = 8 scaled units below the row's
    maximum (the kernels raise their running maxima lazily), z = Σ exp((x − max)/τ) against
    float64 at that max, and the row's KL; and loss = τ²·mean of the rows' KL."""
    rows = s.shape[0] * s.shape[1]
    assert row_stats.shape == (rows, 5) and row_stats.dtype == torch.float32
    stats = row_stats.double().cpu()
    xs = s.detach().double().cpu().reshape(rows, -1)
    xt = t.detach().double().cpu().reshape(rows, -1)
    for column, x in ((0, xs), (2, xt)):
        m = stats[:, column]
        assert (x == m[:, None]).any(1).all(), "the saved max is not a logit of its row"
        assert ((x.amax(1) - m) / tau <= 8.0).all()
        log_z = ((x - m[:, None]) / tau).logsumexp(1)
        assert (stats[:, column + 1] - log_z).abs().max() <= 1e-6 * max(1.0, log_z.abs().max())
    log_q = (xs / tau).log_softmax(1)
    log_p = (xt / tau).log_softmax(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    assert relative_error(stats[:, 4], kl) <= 1e-5
    assert relative_error(loss, kl.sum() * tau * tau / rows) <= 1e-5


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_channel_kl_row_stats(device, backend, layout):
    s, t = make_pair((2, 3, 5, 7), torch.float32, layout, device)
    loss, row_stats = ops(backend).channel_kl(s, t, 2.0)
    assert_row_stats(loss, row_stats, s, t, 2.0)


@pytest.mark.parametrize("device,backend", PIXEL_BACKENDS)
def test_pixel_kl_num_valid(device, backend):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    target = make_target((2, 3, 5, 7), device)
    _, num_valid = ops(backend).pixel_kl(s, t, target, 255, 1.0)
    assert num_valid.dim() == 0 and int(num_valid) == int((target != 255).sum())
    _, num_valid = ops(backend).pixel_kl(s, t, None, 255, 1.0)
    assert int(num_valid) == 2 * 5 * 7


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_one_gradient_requested(device, backend, op, wanted):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    s.requires_grad_(wanted == "student")
    t.requires_grad_(wanted == "teacher")
    loss = getattr(kdops, op)(s, t, 1.0, backend=backend)
    _, grad_s_ref, grad_t_ref = reference_loss_and_grads(op, s, t, 1.0)
    with OpCalls("channel_kl_backward", "pixel_kl_backward") as mode:
        loss.backward()
    ((args, (grad_s, grad_t)),) = mode.calls
    student_flag, teacher_flag = args[-2:]
    assert (student_flag, teacher_flag) == (wanted == "student", wanted == "teacher")
    if wanted == "student":
        assert grad_t.numel() == 0 and t.grad is None
        assert_grad_close(s.grad, grad_s_ref, 1e-5, "student", gradient_unit(op, s, 1.0))
    else:
        assert grad_s.numel() == 0 and s.grad is None
        assert_grad_close(t.grad, grad_t_ref, 1e-5, "teacher", gradient_unit(op, s, 1.0))


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_saves_only_inputs_and_row_statistics(device, backend, op):
    shape = (2, 3, 5, 7)
    s, t = make_pair(shape, torch.float32, "contiguous", device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = getattr(kdops, op)(s, t, 1.0, backend=backend)
    loss.backward()
    assert saved, "nothing saved for backward"
    rows = shape[0] * shape[1]
    for x in saved:
        is_input = x.data_ptr() in (s.data_ptr(), t.data_ptr()) and x.shape == s.shape
        assert is_input or x.numel() <= 5 * rows, f"saved a tensor of shape {tuple(x.shape)}"


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_same_result_for_any_thread_count(device, backend):
    s, t = make_pair((2, 19, 33, 65), torch.float32, "contiguous", device)
    target = make_target((2, 19, 33, 65), device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a = s.detach().requires_grad_(True)
            b = t.detach().requires_grad_(True)
            losses = (kdops.channel_kl(a, b, 2.0, backend=backend),
                      kdops.pixel_kl(a, b, 2.0, target, backend=backend))
            results.append(losses + torch.autograd.grad(sum(losses), (a, b)))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, gradcheck, backend errors


def opcheck_cases(device, layout):
    shape = (2, 3, 5, 7)
    s, t = make_pair(shape, torch.float32, layout, device)
    target = make_target(shape, device)
    return s, t, target


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(device, backend, layout):
    s, t, target = opcheck_cases(device, layout)
    namespace = ops(backend)
    grad = torch.tensor(1.5, device=device)
    _, row_stats = namespace.channel_kl(s, t, 2.0)
    _, num_valid = namespace.pixel_kl(s, t, target, 255, 2.0)
    s_grad = s.detach().requires_grad_(True)
    t_grad = t.detach().requires_grad_(True)
    cases = [
        (namespace.channel_kl.default, (s_grad, t_grad, 2.0)),
        (namespace.pixel_kl.default, (s_grad, t_grad, target, 255, 2.0)),
        (namespace.pixel_kl.default, (s_grad, t, None, 255, 0.5)),
    ]
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((namespace.channel_kl_backward.default, (grad, s, t, row_stats, 2.0, *flags)))
        cases.append(
            (namespace.pixel_kl_backward.default, (grad, s, t, target, num_valid, 255, 2.0, *flags))
        )
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", CHANNEL_BACKENDS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_compile_fullgraph(device, backend, op):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    target = make_target((2, 3, 5, 7), device)
    kwargs = {"target": target} if op == "pixel_kl" else {}

    def loss_fn(a, b):
        return 2.0 * getattr(kdops, op)(a, b, 2.0, **kwargs, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    results = []
    for fn in (loss_fn, compiled):
        a = s.detach().requires_grad_(True)
        b = t.detach().requires_grad_(True)
        loss = fn(a, b)
        results.append((loss,) + torch.autograd.grad(loss, (a, b)))
    assert counter.frame_count == 1
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_compile_fullgraph_first_call(device, backend, monkeypatch):
    """A training script's first call of the op is often the compiled one."""
    monkeypatch.setattr(kd_backend, "_IMPLEMENTATIONS", {})
    torch._dynamo.reset()
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    s.requires_grad_(True)
    compiled = torch.compile(lambda a, b: kdops.channel_kl(a, b, 2.0, backend=backend), fullgraph=True)
    compiled(s, t).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(device, backend, layout):
    s, t = make_pair((2, 3, 4, 5), torch.float64, layout, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    target = make_target((2, 3, 4, 5), device)
    assert torch.autograd.gradcheck(lambda a, b: kdops.channel_kl(a, b, 0.5, backend=backend), (s, t))
    assert torch.autograd.gradcheck(
        lambda a, b: kdops.pixel_kl(a, b, 2.0, target, backend=backend), (s, t)
    )


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_cuda_backend_on_cpu_tensors_says_why(op):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", "cpu")
    with pytest.raises(kd_backend.BackendUnavailableError, match="runs on cuda tensors"):
        getattr(kdops, op)(s, t, backend="cuda")


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_op_argument_errors(device, backend):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    with pytest.raises(ValueError, match="teacher"):
        torch.ops.kdops.channel_kl(s, t[:, :2], 1.0)
    with pytest.raises(TypeError, match="teacher"):
        torch.ops.kdops.channel_kl(s, t.half(), 1.0)
    with pytest.raises(ValueError, match="tau"):
        torch.ops.kdops.channel_kl(s, t, 0.0)
    with pytest.raises(ValueError, match="row_stats"):
        torch.ops.kdops.channel_kl_backward(torch.tensor(1.0), s, t, torch.zeros(5, 3), 1.0, True, True)
    with pytest.raises(ValueError, match="target"):
        torch.ops.kdops.pixel_kl(s, t, torch.zeros(2, 5, 6, dtype=torch.long), 255, 1.0)
    with pytest.raises(TypeError, match="target"):
        torch.ops.kdops.pixel_kl(s, t, torch.zeros(2, 5, 7), 255, 1.0)
