"""The fused backends of channel_correlation, channel_correlation_loss and pairwise_affinity_loss
against float64 oracles.

Every fused backend that implements the ops runs here (``backend_params``): the C++ CPU kernels,
the Triton kernels (under TRITON_INTERPRET=1 on machines without a GPU: small shapes) and the CUDA
kernels on GPU machines. The extension's ops live in ``torch.ops.kdops``, the Triton ones in
``torch.ops.kdops_triton``, with the same schemas. The oracle is the reference evaluated in float64
on the same (rounded) inputs, and for pairwise_affinity_loss also the L × L affinities written out.
"""
import importlib

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import kdops
from kdops import backend as kd_backend
from kdops.reference import correlation as ref
from tests.utils import TOLERANCES, OpCalls, backend_params, make_layout, relative_error

GRAM_BACKENDS = backend_params("channel_correlation")
LOSS_BACKENDS = backend_params("channel_correlation_loss")
PAIRWISE_BACKENDS = backend_params("pairwise_affinity_loss")
CPU_ONLY = [p for p in PAIRWISE_BACKENDS if p.id == "cpu-cpu"]
NORMS = ["row", "l", "none"]

# Small enough for the Triton interpreter. C = 1 and L = 1 included; L ≤ C and L > C both (the
# pair-wise loss takes its L × L form when L ≤ C, its C × C form otherwise).
SHAPES = [
    pytest.param((2, 3, 5, 7), id="odd-3x5x7"),
    pytest.param((1, 1, 4, 4), id="C1"),
    pytest.param((2, 4, 1, 1), id="L1"),
    pytest.param((3, 5, 1, 9), id="H1"),
    pytest.param((2, 24, 3, 5), id="L15-below-C24"),
    pytest.param((2, 16, 4, 4), id="L16-equals-C16"),
]
# (student shape, teacher shape) of the losses' other-size cases.
LOSS_PAIRS = [
    pytest.param(((2, 3, 5, 7), (2, 3, 4, 2)), id="L35-vs-L8"),
    pytest.param(((2, 6, 2, 2), (2, 6, 3, 5)), id="L4-vs-L15"),
    pytest.param(((1, 1, 3, 3), (1, 1, 1, 1)), id="C1-L9-vs-L1"),
]
PAIRWISE_PAIRS = [
    pytest.param(((2, 3, 5, 7), (2, 6, 5, 7)), id="Cs3-Ct6"),
    pytest.param(((2, 8, 2, 3), (2, 1, 2, 3)), id="Cs8-Ct1-L6"),
    pytest.param(((1, 20, 3, 3), (1, 7, 3, 3)), id="Cs20-Ct7-L9"),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# The Triton interpreter runs ~10⁴× slower than the kernels: in the dtype × shape matrices it
# takes the shapes up to C = 5 and two layouts; its multi-tile shapes, layouts and launch
# overrides are in tests/triton/test_correlation_triton.py.
INTERPRETER_MAX_CHANNELS = 5


def matrix_layouts(backend, shape):
    """The layouts a matrix case runs; skips the CPU-path shapes for the interpreted Triton."""
    if backend == "triton" and torch.device("cpu").type == "cpu" and kd_backend.triton_interpreting():
        if shape[1] > INTERPRETER_MAX_CHANNELS:
            pytest.skip("C×C / L×L switch shape of the CPU kernels; Triton: tests/triton")
        return ["contiguous", "channels_last"]
    return LAYOUTS


def ops(backend):
    """The op namespace of a fused backend (same schemas in both)."""
    if backend == "triton":
        importlib.import_module("kdops.triton.correlation")
        return torch.ops.kdops_triton
    return torch.ops.kdops


def randn(shape, dtype, device, layout="contiguous", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g)).to(dtype)
    return make_layout(x.to(device), layout if len(shape) == 4 or layout != "channels_last" else "contiguous")


def grads_of(fn, inputs, weights=None):
    """fn(*inputs), and the gradients of ⟨fn, weights⟩ (the output itself for a scalar)."""
    inputs = [x.detach().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    total = out if weights is None else (out * weights.to(out)).sum()
    return out.detach(), torch.autograd.grad(total, inputs)


def reference_of(fn, inputs, weights=None):
    return grads_of(fn, [x.detach().double().cpu() for x in inputs],
                    None if weights is None else weights.double().cpu())


# An exact value of 0 (the gradient when C = 1 with "row", where the float64 reference leaves
# ~1e-19 of rounding) is compared against this absolute floor.
ZERO_FLOOR = 1e-9


def pairwise_unit(x):
    """1% of the bound 8/(N·L) on |∂loss/∂x̂| of the affinity loss (|A_s − A_t| ≤ 2): the floor
    for its gradients, which vanish exactly when L = 1 (every affinity is 1) while float32
    rounding of x̂ leaves |x̂|² − 1 ~ 1e-8 of them with detach_norm."""
    return 0.08 / (x.shape[0] * x[0, 0].numel())


def assert_close(got, expected, tol, name, floor=ZERO_FLOOR):
    """Relative-norm error, finite values, and every element within tol of the largest one."""
    assert got.shape == expected.shape, name
    assert torch.isfinite(got).all(), f"{name} has non-finite values"
    got64, expected64 = got.detach().double().cpu(), expected.detach().double().cpu()
    error = (got64 - expected64).norm().item() / max(expected64.norm().item(), floor)
    assert error <= tol, f"{name}: {error:.3g} > {tol}"
    scale = max(expected64.abs().max().item(), floor)
    worst = (got64 - expected64).abs().max().item()
    assert worst <= tol * scale, f"{name}: max element error {worst:.3g} vs scale {scale:.3g}"


def check(fn, reference, inputs, loss_tol, grad_tol, weights=None, grad_floor=ZERO_FLOOR):
    got, grads = grads_of(fn, inputs, weights)
    expected, grads64 = reference_of(reference, inputs, weights)
    assert got.dtype == (torch.float64 if inputs[0].dtype == torch.float64 else torch.float32)
    assert_close(got, expected, loss_tol, "output")
    for name, x, grad, grad64 in zip(("student", "teacher"), inputs, grads, grads64):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert_close(grad, grad64, grad_tol, f"{name} gradient", grad_floor)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference


@pytest.mark.parametrize("device,backend", GRAM_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, norm):
    c = shape[1]
    weights = torch.randn(shape[0], c, c, generator=torch.Generator().manual_seed(9))
    for layout in matrix_layouts(backend, shape):
        x = randn(shape, dtype, device, layout)
        check(lambda a: kdops.channel_correlation(a, norm, backend=backend),
              lambda a: ref.channel_correlation(a, norm), [x], loss_tol, grad_tol, weights)


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_loss_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, norm):
    for layout in matrix_layouts(backend, shape):
        s, t = randn(shape, dtype, device, layout, 1), randn(shape, dtype, device, layout, 2)
        check(lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend),
              lambda a, b: ref.channel_correlation_loss(a, b, norm), [s, t], loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("shapes", LOSS_PAIRS)
@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_loss_other_spatial_size(device, backend, shapes, norm):
    s, t = randn(shapes[0], torch.float32, device, seed=3), randn(shapes[1], torch.float32, device, seed=4)
    check(lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend),
          lambda a, b: ref.channel_correlation_loss(a, b, norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_affinity_loss_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, detach_norm):
    for layout in matrix_layouts(backend, shape):
        s, t = randn(shape, dtype, device, layout, 5), randn(shape, dtype, device, layout, 6)
        check(lambda a, b: kdops.pairwise_affinity_loss(a, b, detach_norm, backend=backend),
              lambda a, b: ref.pairwise_affinity_loss(a, b, detach_norm), [s, t], loss_tol, grad_tol,
              grad_floor=pairwise_unit(s))


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("shapes", PAIRWISE_PAIRS)
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_affinity_loss_other_channel_count(device, backend, shapes, detach_norm):
    s, t = randn(shapes[0], torch.float32, device, seed=7), randn(shapes[1], torch.float32, device, seed=8)
    check(lambda a, b: kdops.pairwise_affinity_loss(a, b, detach_norm, backend=backend),
          lambda a, b: ref.pairwise_affinity_loss(a, b, detach_norm), [s, t], 1e-5, 1e-5)


def explicit_pairwise_loss(s, t, detach_norm):
    """Σ (A_s − A_t)² / (N·L²) with the L × L affinities formed, float64, norm detached on request."""
    def affinity(x):
        x = x.reshape(x.shape[0], x.shape[1], -1)
        norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        hat = x / (norms.detach() if detach_norm else norms)
        return hat.transpose(1, 2) @ hat

    n, length = s.shape[0], s[0, 0].numel()
    return (affinity(s) - affinity(t)).square().sum() / (n * length * length)


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("shapes", [
    pytest.param(((2, 5, 3, 4), (2, 5, 3, 4)), id="L12-above-C5"),
    pytest.param(((2, 12, 2, 3), (2, 9, 2, 3)), id="L6-below-C12-Cs12-Ct9"),
])
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_affinity_loss_matches_explicit_affinities(device, backend, shapes, detach_norm):
    s, t = randn(shapes[0], torch.float32, device, seed=10), randn(shapes[1], torch.float32, device, seed=11)
    check(lambda a, b: kdops.pairwise_affinity_loss(a, b, detach_norm, backend=backend),
          lambda a, b: explicit_pairwise_loss(a, b, detach_norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
def test_detach_norm_changes_only_the_gradient(device, backend):
    s, t = randn((2, 6, 3, 5), torch.float32, device, seed=12), randn((2, 6, 3, 5), torch.float32, device, seed=13)
    exact, (grad_exact, _) = grads_of(lambda a, b: kdops.pairwise_affinity_loss(a, b, False, backend=backend), [s, t])
    detached, (grad_detached, _) = grads_of(lambda a, b: kdops.pairwise_affinity_loss(a, b, True, backend=backend), [s, t])
    assert relative_error(detached, exact) <= 1e-6
    assert relative_error(grad_detached, grad_exact) > 0.1  # SKD's gradient is another function


# teacher = student + 1e-3 noise: the Grams, affinities and the three Frobenius terms of the
# textbook identity agree to 1e-3 and cancel; the loss is ~1e-6 of them.
@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("shape", [pytest.param((2, 8, 5, 7), id="L35-above-C8"),
                                   pytest.param((2, 48, 4, 6), id="L24-below-C48")])
@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_loss_near_cancelling(device, backend, shape, norm):
    s = randn(shape, torch.float32, device, seed=14)
    t = s + 1e-3 * randn(shape, torch.float32, device, seed=15)
    check(lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend),
          lambda a, b: ref.channel_correlation_loss(a, b, norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
@pytest.mark.parametrize("shape", [pytest.param((2, 8, 5, 7), id="L35-above-C8"),
                                   pytest.param((2, 48, 4, 6), id="L24-below-C48")])
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_affinity_loss_near_cancelling(device, backend, shape, detach_norm):
    s = randn(shape, torch.float32, device, seed=16)
    t = s + 1e-3 * randn(shape, torch.float32, device, seed=17)
    check(lambda a, b: kdops.pairwise_affinity_loss(a, b, detach_norm, backend=backend),
          lambda a, b: ref.pairwise_affinity_loss(a, b, detach_norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", PAIRWISE_BACKENDS)
def test_pairwise_affinity_loss_zero_channels_change_nothing(device, backend):
    # A teacher that is the student with zero channels appended has the same affinities: loss 0.
    s = randn((2, 5, 3, 4), torch.float32, device, seed=18)
    t = torch.cat([s, torch.zeros_like(s[:, :3])], 1)
    loss, (grad_s, grad_t) = grads_of(lambda a, b: kdops.pairwise_affinity_loss(a, b, backend=backend), [s, t])
    assert abs(loss.item()) <= 1e-12
    assert grad_s.abs().max().item() <= 1e-9 and grad_t.abs().max().item() <= 1e-9


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
def test_zero_rows_and_pixels(device, backend):
    # A zero channel (a zero Gram row: its norm clamped) and a zero pixel (its norm clamped).
    s = randn((2, 4, 3, 3), torch.float32, device, seed=19)
    t = randn((2, 4, 3, 3), torch.float32, device, seed=20)
    s[0, 1] = 0
    t[1, :, 1, 2] = 0
    for norm in NORMS:
        check(lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend),
              lambda a, b: ref.channel_correlation_loss(a, b, norm), [s, t], 1e-5, 1e-5)
    if kd_backend.unavailable_reason("pairwise_affinity_loss", backend, device, torch.float32) is None:
        for detach_norm in (False, True):
            check(lambda a, b: kdops.pairwise_affinity_loss(a, b, detach_norm, backend=backend),
                  lambda a, b: ref.pairwise_affinity_loss(a, b, detach_norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
def test_identical_inputs_give_zero(device, backend):
    s = randn((2, 5, 3, 4), torch.float32, device, seed=21)
    for loss in (kdops.channel_correlation_loss(s, s.clone(), backend=backend),
                 kdops.pairwise_affinity_loss(s, s.clone(), backend=backend)):
        assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Gradients requested, memory saved, determinism, matmul precision


LOSS_CALLS = [
    pytest.param(lambda a, b, backend: kdops.channel_correlation_loss(a, b, "row", backend=backend),
                 lambda a, b: ref.channel_correlation_loss(a, b, "row"), id="channel_correlation_loss"),
    pytest.param(lambda a, b, backend: kdops.pairwise_affinity_loss(a, b, backend=backend),
                 lambda a, b: ref.pairwise_affinity_loss(a, b), id="pairwise_affinity_loss"),
]


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("loss_fn, reference", LOSS_CALLS)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_one_gradient_requested(device, backend, loss_fn, reference, wanted):
    s = randn((2, 3, 5, 7), torch.float32, device, seed=22)
    t = randn((2, 3, 5, 7), torch.float32, device, seed=23)
    s.requires_grad_(wanted == "student")
    t.requires_grad_(wanted == "teacher")
    loss = loss_fn(s, t, backend)
    _, (grad_s_ref, grad_t_ref) = reference_of(reference, [s, t])
    with OpCalls("channel_correlation_loss_backward", "pairwise_affinity_loss_backward") as mode:
        loss.backward()
    ((args, (grad_s, grad_t)),) = mode.calls
    student_flag, teacher_flag = args[-2:]
    assert (student_flag, teacher_flag) == (wanted == "student", wanted == "teacher")
    if wanted == "student":
        assert grad_t.numel() == 0 and t.grad is None
        assert_close(s.grad, grad_s_ref, 1e-5, "student gradient")
    else:
        assert grad_s.numel() == 0 and s.grad is None
        assert_close(t.grad, grad_t_ref, 1e-5, "teacher gradient")


def saved_tensors(fn, inputs):
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn(*inputs)
    return out, saved


def is_input(x, inputs):
    return any(x.data_ptr() == i.data_ptr() and x.shape == i.shape for i in inputs)


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
def test_losses_save_only_inputs_and_pixel_norms(device, backend):
    # C = L = 16: a C × C matrix per image is as large as the input; none may be kept.
    n, c, length = 2, 16, 16
    s = randn((n, c, 4, 4), torch.float32, device, seed=24).requires_grad_(True)
    t = randn((n, c, 4, 4), torch.float32, device, seed=25).requires_grad_(True)
    loss, saved = saved_tensors(lambda a, b: kdops.channel_correlation_loss(a, b, backend=backend), [s, t])
    loss.backward()
    assert saved and all(is_input(x, [s, t]) for x in saved), [tuple(x.shape) for x in saved]
    loss, saved = saved_tensors(lambda a, b: kdops.pairwise_affinity_loss(a, b, backend=backend), [s, t])
    loss.backward()
    others = [x for x in saved if not is_input(x, [s, t])]
    assert [tuple(x.shape) for x in others] == [(n, 2, length)]


@pytest.mark.parametrize("device,backend", GRAM_BACKENDS)
def test_channel_correlation_saves_input_output_and_row_norms(device, backend):
    x = randn((2, 6, 3, 3), torch.float32, device, seed=26).requires_grad_(True)
    gram, saved = saved_tensors(lambda a: kdops.channel_correlation(a, backend=backend), [x])
    shapes = sorted(tuple(v.shape) for v in saved if not is_input(v, [x]))
    assert shapes == [(2, 6), (2, 6, 6)]
    gram.sum().backward()


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
def test_bitwise_deterministic(device, backend):
    s = randn((2, 24, 4, 5), torch.float32, device, seed=27)
    t = randn((2, 24, 4, 5), torch.float32, device, seed=28)
    calls = [
        lambda a, b: kdops.channel_correlation_loss(a, b, backend=backend),
        lambda a, b: kdops.pairwise_affinity_loss(a, b, backend=backend),  # L × L form
        lambda a, b: kdops.pairwise_affinity_loss(a[:, :4], b[:, :3], backend=backend),  # C × C form
    ]
    results = []
    for _ in range(2):
        out = []
        for fn in calls:
            loss, grads = grads_of(fn, [s, t])
            out += [loss, *grads]
        results.append(out)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_float32_products_stay_ieee_under_lower_matmul_precision(device, backend):
    # torch.set_float32_matmul_precision("medium") lets oneDNN run float32 matmuls in bfloat16;
    # the ops keep float32 accuracy and leave the caller's setting as it was.
    s = randn((2, 32, 6, 7), torch.float32, device, seed=29)
    t = randn((2, 32, 6, 7), torch.float32, device, seed=30)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        mkldnn_setting = torch.backends.mkldnn.matmul.fp32_precision
        check(lambda a, b: kdops.channel_correlation_loss(a, b, backend=backend),
              lambda a, b: ref.channel_correlation_loss(a, b), [s, t], 1e-5, 1e-5)
        check(lambda a, b: kdops.pairwise_affinity_loss(a, b, backend=backend),
              lambda a, b: ref.pairwise_affinity_loss(a, b), [s, t], 1e-5, 1e-5)
        assert torch.backends.mkldnn.matmul.fp32_precision == mkldnn_setting
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, gradcheck, errors


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, backend, layout):
    namespace = ops(backend)
    s = randn((2, 3, 5, 7), torch.float32, device, layout, seed=31)
    t = randn((2, 3, 5, 7), torch.float32, device, layout, seed=32)
    t_wide = randn((2, 5, 5, 7), torch.float32, device, layout, seed=33)
    t_short = randn((2, 3, 2, 3), torch.float32, device, layout, seed=34)
    grad = torch.tensor(1.5, device=device)
    s_grad, t_grad = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    cases = [
        (namespace.pairwise_affinity_loss.default, (s_grad, t_grad, False)),
        (namespace.pairwise_affinity_loss.default, (s_grad, t_wide, True)),
        (namespace.channel_correlation_loss.default, (s_grad, t_grad, "row")),
        (namespace.channel_correlation_loss.default, (s_grad, t_short, "l")),
    ]
    if kd_backend.unavailable_reason("channel_correlation", backend, device, torch.float32) is None:
        for norm in NORMS:
            gram, row_norms = namespace.channel_correlation(s, norm)
            cases.append((namespace.channel_correlation.default, (s_grad, norm)))
            cases.append((namespace.channel_correlation_backward.default,
                          (torch.randn_like(gram), s, gram, row_norms, norm)))
    _, norms = namespace.pairwise_affinity_loss(s, t_wide, False)
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((namespace.pairwise_affinity_loss_backward.default, (grad, s, t_wide, norms, False, *flags)))
        cases.append((namespace.pairwise_affinity_loss_backward.default, (grad, s, t_wide, norms, True, *flags)))
        cases.append((namespace.channel_correlation_loss_backward.default, (grad, s, t_short, "row", *flags)))
    for op, args in cases:
        torch.library.opcheck(op, args)


COMPILE_CALLS = [
    pytest.param(lambda a, b, backend: kdops.channel_correlation(a, "row", backend=backend).square().sum(),
                 "channel_correlation", id="channel_correlation"),
    pytest.param(lambda a, b, backend: kdops.channel_correlation_loss(a, b, "row", backend=backend),
                 "channel_correlation_loss", id="channel_correlation_loss"),
    pytest.param(lambda a, b, backend: kdops.pairwise_affinity_loss(a, b, True, backend=backend),
                 "pairwise_affinity_loss", id="pairwise_affinity_loss"),
]


@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
@pytest.mark.parametrize("call, op", COMPILE_CALLS)
def test_compile_fullgraph(device, backend, call, op):
    if kd_backend.unavailable_reason(op, backend, device, torch.float32) is not None:
        pytest.skip(f"{backend} does not run {op}")
    s = randn((2, 3, 5, 7), torch.float32, device, seed=35)
    t = randn((2, 3, 5, 7), torch.float32, device, seed=36)

    def loss_fn(a, b):
        return 2.0 * call(a, b, backend)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    results = []
    for fn in (loss_fn, compiled):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        loss = fn(a, b)
        results.append((loss,) + torch.autograd.grad(loss, (a, b), allow_unused=True))
    assert counter.frame_count == 1
    for eager, traced in zip(*results):
        assert (eager is None) == (traced is None)
        if eager is not None:
            torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_float64(device, backend, layout):
    s = randn((2, 3, 2, 3), torch.float64, device, layout, seed=37).requires_grad_(True)
    t = randn((2, 3, 2, 3), torch.float64, device, layout, seed=38).requires_grad_(True)
    t_wide = randn((2, 8, 2, 3), torch.float64, device, layout, seed=39).requires_grad_(True)
    t_short = randn((2, 3, 1, 2), torch.float64, device, layout, seed=40).requires_grad_(True)
    for norm in NORMS:
        assert torch.autograd.gradcheck(lambda a: kdops.channel_correlation(a, norm, backend=backend), (s,))
        assert torch.autograd.gradcheck(
            lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend), (s, t))
        assert torch.autograd.gradcheck(
            lambda a, b: kdops.channel_correlation_loss(a, b, norm, backend=backend), (s, t_short))
    # detach_norm=True is not the derivative of the loss (by design): it is checked against the
    # explicit fixed-norm function in test_pairwise_affinity_loss_matches_explicit_affinities.
    for teacher in (t, t_wide):
        assert torch.autograd.gradcheck(
            lambda a, b: kdops.pairwise_affinity_loss(a, b, backend=backend), (s, teacher))


def test_gradcheck_detached_norm_is_the_explicit_function():
    # The reference with detach_norm: its gradient is that of the L × L loss with the norm held
    # constant (checked numerically by holding the norms fixed outside the function).
    s = randn((1, 3, 2, 2), torch.float64, "cpu", seed=41)
    t = randn((1, 3, 2, 2), torch.float64, "cpu", seed=42)
    norms_s = s.norm(dim=1, keepdim=True)

    def with_fixed_norm(a):
        hat = (a / norms_s).reshape(1, 3, -1)
        t_hat = torch.nn.functional.normalize(t.reshape(1, 3, -1), dim=1)
        return ((hat.transpose(1, 2) @ hat) - (t_hat.transpose(1, 2) @ t_hat)).square().sum() / 16

    expected = torch.autograd.functional.jacobian(with_fixed_norm, s)
    a = s.clone().requires_grad_(True)
    ref.pairwise_affinity_loss(a, t, detach_norm=True).backward()
    torch.testing.assert_close(a.grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_op_argument_errors(device, backend):
    s = randn((2, 3, 5, 7), torch.float32, device, seed=43)
    t = randn((2, 3, 5, 7), torch.float32, device, seed=44)
    with pytest.raises(ValueError, match="teacher must have the channels"):
        torch.ops.kdops.channel_correlation_loss(s, t[:, :2], "row")
    with pytest.raises(TypeError, match="teacher must have the dtype"):
        torch.ops.kdops.channel_correlation_loss(s, t.half(), "row")
    with pytest.raises(ValueError, match="norm must be one of"):
        torch.ops.kdops.channel_correlation_loss(s, t, "L2")
    with pytest.raises(ValueError, match="teacher must have the spatial shape"):
        torch.ops.kdops.pairwise_affinity_loss(s, t[..., :4], False)
    with pytest.raises(ValueError, match="teacher must have the batch size"):
        torch.ops.kdops.pairwise_affinity_loss(s, t[:1], False)
    with pytest.raises(ValueError, match="x must have shape"):
        torch.ops.kdops.channel_correlation(s[0, 0], "row")
    with pytest.raises(ValueError, match="norms must have shape"):
        torch.ops.kdops.pairwise_affinity_loss_backward(
            torch.tensor(1.0), s, t, torch.ones(2, 2, 34, dtype=torch.float64), False, True, True)
    with pytest.raises(TypeError, match="norms must be float64"):
        torch.ops.kdops.pairwise_affinity_loss_backward(
            torch.tensor(1.0), s, t, torch.ones(2, 2, 35), False, True, True)
    gram, row_norms = torch.ops.kdops.channel_correlation(s, "row")
    with pytest.raises(ValueError, match="row_norms must have shape"):
        torch.ops.kdops.channel_correlation_backward(gram, s, gram, row_norms[:1], "row")
    with pytest.raises(ValueError, match="grad_loss must hold one element"):
        torch.ops.kdops.channel_correlation_loss_backward(torch.ones(2), s, t, "row", True, True)


@pytest.mark.parametrize("op", ["channel_correlation_loss", "pairwise_affinity_loss"])
def test_cuda_backend_on_cpu_tensors_says_why(op):
    s = randn((2, 3, 5, 7), torch.float32, "cpu", seed=45)
    with pytest.raises(kd_backend.BackendUnavailableError, match="cuda"):
        getattr(kdops, op)(s, s, backend="cuda")


@pytest.mark.parametrize("scale", [1e-3, 1e3], ids=["teacher-1000x-smaller", "teacher-1000x-larger"])
@pytest.mark.parametrize("device,backend", LOSS_BACKENDS)
def test_correlation_loss_with_sides_of_very_different_size(device, backend, scale):
    """Found by the fuzz suite: with the teacher's features 1000× smaller than the student's, the
    row-normalised loss came out 15 % low on the CPU and Triton kernels (G_t was formed as
    G_s − ΔG, which cancels every digit of a small G_t). Loss and gradients against float64."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4, 34, 8, generator=g)
    t = torch.randn(2, 4, 34, 8, generator=g) * scale
    for norm in ("row", "l", "none"):
        a = s.clone().to(device).requires_grad_(True)
        b = t.clone().to(device).requires_grad_(True)
        loss = kdops.channel_correlation_loss(a, b, norm, backend=backend)
        loss.backward()
        a64 = s.double().requires_grad_(True)
        b64 = t.double().requires_grad_(True)
        exact = ref.channel_correlation_loss(a64, b64, norm)
        exact.backward()
        assert relative_error(loss.double().cpu(), exact) < 1e-5, (norm, loss.item(), exact.item())
        assert relative_error(a.grad.double().cpu(), a64.grad) < 1e-4, norm
        assert relative_error(b.grad.double().cpu(), b64.grad) < 1e-4, norm
