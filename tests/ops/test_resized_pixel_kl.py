"""pixel_kl(size=...): the fused bilinear resize + per-pixel KL of every backend (the C++ CPU
kernels, the CUDA kernels, the Triton kernels on the GPU and under Triton's interpreter on the CPU)
against the float64 reference and oracle of resized_pixel_kl_cases.py.

The reference resizes with :func:`kdops.reference.softmax_kl.bilinear_resize` (F.interpolate's
source positions; a corner of weight 0 not read) and then takes the plain pixel KL; the fused
kernels never store the resized logits. The CUDA kernels' per-thread code also runs on the CPU in
test_resized_pixel_kl_threads.py; what only the GPU rows here check: the grids and their
fixed-order reductions, the 16-bit loads and stores, the device's exp/log, the host sync.

The Triton interpreter (the cpu-triton rows) runs a kernel's programs one after another in Python,
~0.1 s per program of the backward: its rows take small shapes, and the cases named in
INTERPRETER_HEAVY (5 to 23 s each there) run on the compiled backends only.
"""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import kdops
from kdops import backend as kd_backend
from tests.ops.resized_pixel_kl_cases import (
    ALIGN,
    RESIZE_CASES,
    assert_grad_close,
    gradient_unit,
    make_logits,
    make_target,
    reference_loss_and_grads,
    resized_oracle,
    target_ignoring_readers_of,
)
from tests.utils import TOLERANCES, OpCalls, backend_params, make_layout, relative_error

BACKENDS = backend_params("pixel_kl")
assert {p.id for p in BACKENDS} >= {"cpu-cpu", "cuda-cuda"}, "cpu and cuda must declare pixel_kl"
CPU_ONLY = [p for p in BACKENDS if p.id == "cpu-cpu"]
INTERPRETER = [p for p in BACKENDS if p.id == "cpu-triton"]
COMPILED = [p for p in BACKENDS if p.id != "cpu-triton"]
GPU = [p for p in BACKENDS if p.values[0] == "cuda"]

FP32 = TOLERANCES[:1]
HALF = TOLERANCES[1:]

# Cases beyond RESIZE_CASES: 8× up from 3×4 (the interpreter's 8× case: up8-4x5-32x40 is too
# slow there), down along one axis and up along the other, from one pixel, a row to a column.
MORE_RESIZES = [
    pytest.param((1, 3, 3, 4), (24, 32), id="up8-3x4-24x32"),
    pytest.param((2, 3, 7, 5), (3, 8), id="mixed-7x5-3x8"),
    pytest.param((2, 4, 1, 1), (3, 4), id="from-1x1"),
    pytest.param((1, 8, 1, 6), (5, 1), id="h1-to-W1"),
]
RESIZES = RESIZE_CASES + MORE_RESIZES
# The interpreter's 16-bit rows take these cases only (those of the backend tests before the CUDA
# tests were merged in: 8×, odd factors, down, mixed, to and from one pixel, a row to a column):
# 16-bit changes the loads and stores, not the index arithmetic that the other small cases test,
# and each row costs ~1 s there. Its float32 rows take every case but INTERPRETER_HEAVY.
HALF_ON_INTERPRETER = ("up8-3x4-24x32", "odd-3x7-8x11", "down-9x11-4x5", "mixed-7x5-3x8", "to-1x1",
                       "from-1x1", "h1-to-W1")

# Cases that take 5 to 23 s each under the interpreter (its backward runs hundreds of programs).
INTERPRETER_HEAVY = ("up8-4x5-32x40", "C19-up8", "tiles-halved-40x50", "several-tiles-w300")


def on(backends, *axes):
    """pytest params (device, backend, *one case's values per axis) for every backend and every
    combination of the axes' cases, marks joined; the id is the cases' ids (last axis first), then
    the backend's."""
    return [
        pytest.param(*backend.values, *(v for case in combo for v in case.values),
                     marks=[*backend.marks, *(m for case in combo for m in case.marks)],
                     id="-".join([*(case.id for case in reversed(combo)), backend.id]))
        for backend in backends for combo in itertools.product(*axes)
    ]


def on_every_backend(cases):
    """Every case on the compiled backends, and on the interpreter those not INTERPRETER_HEAVY."""
    light = [case for case in cases if case.id not in INTERPRETER_HEAVY]
    return on(COMPILED, cases) + on(INTERPRETER, light)


def ops(backend):
    """The op namespace of a backend: torch.ops.kdops (C++ CPU and CUDA) or kdops_triton."""
    if backend == "triton":
        importlib.import_module("kdops.triton.resized_pixel_kl")
        return torch.ops.kdops_triton
    return torch.ops.kdops


def loss_and_grads(backend, s, t, tau, target, size, align_corners):
    """The backend's loss and the gradients of both logits (fresh leaves of s and t)."""
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = kdops.pixel_kl(s, t, tau, target, size=size, align_corners=align_corners, backend=backend)
    return (loss,) + torch.autograd.grad(loss, (s, t))


def check(backend, s, t, tau, target, size, align_corners, loss_tol=1e-5, grad_tol=1e-5, expected=None):
    """The backend's loss (relative error ≤ loss_tol) and gradients (relative norm and every
    element ≤ grad_tol of the gradient's scale) against expected = (loss, grad_s, grad_t) in
    float64: the reference's at the same (rounded) values unless given (the oracle's, for inputs
    the reference's autograd cannot take). Returns the backend's (loss, grad_s, grad_t)."""
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, tau, target, size, align_corners)
    if expected is None:
        expected = reference_loss_and_grads(s, t, tau, target, size, align_corners)
    expected_loss, grad_s_ref, grad_t_ref = expected
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert relative_error(loss, expected_loss) <= loss_tol, (loss.item(), expected_loss.item())
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    unit = gradient_unit(size, s.shape[0], tau, target)
    assert_grad_close(grad_s, grad_s_ref, grad_tol, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, grad_tol, "teacher", unit)
    return loss, grad_s, grad_t


# ---------------------------------------------------------------------------------------------
# Loss and gradients against the reference


def interpreter_matrix():
    """The interpreter's rows of test_matches_reference: float32 on every light case, 16-bit on
    HALF_ON_INTERPRETER."""
    light = [case for case in RESIZES if case.id not in INTERPRETER_HEAVY]
    half = [case for case in RESIZES if case.id in HALF_ON_INTERPRETER]
    return on(INTERPRETER, FP32, light) + on(INTERPRETER, HALF, half)


@pytest.mark.parametrize("device,backend,dtype,loss_tol,grad_tol,shape,size",
                         on(COMPILED, TOLERANCES, RESIZES) + interpreter_matrix())
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, size, align_corners,
                           with_target):
    s, t = make_logits(shape, dtype, device)
    target = make_target(shape[0], size, shape[1], device) if with_target else None
    check(backend, s, t, 2.0, target, size, align_corners, loss_tol, grad_tol)


def layout_cases(*layouts):
    """pytest params of layout names for in_layout, each its own id."""
    return [pytest.param(layout, id=layout) for layout in layouts]


def in_layout(s, t, target, layout):
    """s, t and target with the same values in layout: "contiguous", "channels_last" (the target
    stays contiguous), "strided" (all three every other element of a wider buffer),
    "student-strided" (only s: the two logits' strides differ), "transposed_hw" (dense, H and W
    strides swapped)."""
    if layout == "transposed_hw":
        return (*(x.transpose(2, 3).contiguous().transpose(2, 3) for x in (s, t)), target)
    if layout == "student-strided":
        return make_layout(s, "strided"), t, target
    if layout == "strided":
        return (make_layout(s, "strided"), make_layout(t, "strided"),
                None if target is None else make_layout(target, "strided"))
    return make_layout(s, layout), make_layout(t, layout), target


@pytest.mark.parametrize(
    "device,backend,dtype,loss_tol,grad_tol,layout",
    on(BACKENDS, FP32, layout_cases("contiguous", "student-strided", "transposed_hw"))
    + on(BACKENDS, TOLERANCES, layout_cases("channels_last", "strided")),
)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_layouts(device, backend, dtype, loss_tol, grad_tol, layout, align_corners):
    """Inputs in other layouts (a strided target too) give the reference's values."""
    s, t = make_logits((2, 5, 3, 4), dtype, device)
    target = make_target(2, (7, 9), 5, device)
    s, t, target = in_layout(s, t, target, layout)
    check(backend, s, t, 0.5, target, (7, 9), align_corners, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend,layout", on(
    BACKENDS, layout_cases("contiguous", "channels_last", "strided", "student-strided", "transposed_hw"),
))
def test_gradients_laid_out_as_empty_like(device, backend, layout):
    """Each gradient comes back in the layout empty_like(input) gives: what the fake kernel
    promises torch.compile."""
    s, t = make_logits((2, 3, 2, 3), device=device)
    s, t, _ = in_layout(s, t, None, layout)
    _, grad_s, grad_t = loss_and_grads(backend, s, t, 1.0, None, (3, 4), False)
    assert grad_s.stride() == torch.empty_like(s).stride()
    assert grad_t.stride() == torch.empty_like(t).stride()


@pytest.mark.parametrize("device,backend,shape,size", on(COMPILED, [
    # 8× up, many tiles of the CUDA kernels.
    pytest.param((2, 6, 5, 7), (40, 56), id="2x6x5x7-40x56"),
]) + on(INTERPRETER, [pytest.param((2, 6, 2, 3), (5, 7), id="2x6x2x3-5x7")]))
@pytest.mark.parametrize("tau", [0.5, 4.0], ids=["tau0.5", "tau4"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tau(device, backend, shape, size, tau, layout):
    """τ = 0.5 and 4 (the other tests take 1 and 2), in two layouts."""
    s, t = make_logits(shape, device=device)
    target = make_target(shape[0], size, shape[1], device)
    check(backend, make_layout(s, layout), make_layout(t, layout), tau, target, size, True)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_apd_sized_case(device, backend):
    """APD's shape, scaled down: 19 classes, ×8 per side, align_corners=True, τ = 1."""
    s, t = make_logits((1, 19, 3, 5), device=device)
    check(backend, s, t, 1.0, None, (24, 40), True)


@pytest.mark.parametrize("device,backend,shape,size", on(GPU, [
    pytest.param((2, 19, 32, 64), (256, 512), id="cityscapes-like-8x"),
    pytest.param((1, 150, 12, 16), (96, 128), id="ade-C150-8x"),
    pytest.param((2, 21, 65, 65), (513, 513), id="voc-odd-8x"),
]) + on(CPU_ONLY, [
    # Medium: the float64 reference's autograd runs on the CPU here (on the device for the GPU).
    pytest.param((2, 19, 16, 32), (128, 256), id="cityscapes-like-8x-medium"),
]))
@pytest.mark.parametrize("align_corners", ALIGN)
def test_realistic_shapes(device, backend, shape, size, align_corners):
    """APD/CIRKD shapes in bfloat16 (8× per side, C = 19/21/150): many blocks and grid-stride
    rounds. Not on the interpreter (minutes per case)."""
    s, t = make_logits(shape, torch.bfloat16, device)
    target = make_target(shape[0], size, shape[1], device, ignored=0.1)
    expected = reference_loss_and_grads(s, t, 1.0, target, size, align_corners, device=device)
    check(backend, s, t, 1.0, target, size, align_corners, 1e-4, 1e-2, expected)


@pytest.mark.parametrize("device,backend,shape,size", on_every_backend([
    pytest.param((1, 3, 2, 40), (3, 2000), id="tiles-halved-40x50"),
    pytest.param((1, 2, 2, 3), (3, 2000), id="per-thread-fallback-3-to-2000"),
    pytest.param((2, 3, 3, 300), (5, 301), id="several-tiles-w300"),
    pytest.param((2, 5, 7, 9), (3, 4), id="down"),
]))
@pytest.mark.parametrize("align_corners", ALIGN)
def test_backward_forms(device, backend, shape, size, align_corners):
    """The CUDA launcher's backward forms (tests/ops/test_resized_pixel_kl_threads.py checks which
    one each shape takes): tiles halved until their span fits shared memory, the per-thread gather
    when not even one column's readers fit, several column tiles per row, downsampling. Long rows
    and wide inputs for the other backends too."""
    s, t = make_logits(shape, device=device)
    target = make_target(shape[0], size, shape[1], device)
    check(backend, s, t, 1.0, target, size, align_corners)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_own_size_is_plain_pixel_kl(device, backend):
    s, t = make_logits((2, 3, 5, 7), device=device)
    for align_corners in (True, False):
        resized = kdops.pixel_kl(s, t, 2.0, size=(5, 7), align_corners=align_corners, backend=backend)
        assert torch.equal(resized, kdops.pixel_kl(s, t, 2.0, backend=backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_equals_interpolate_then_pixel_kl(device, backend, align_corners):
    """What users wrote before: F.interpolate both logits, then pixel_kl."""
    s, t = make_logits((2, 4, 3, 5), device=device)
    target = make_target(2, (10, 17), 4, device)
    fused = kdops.pixel_kl(s, t, 1.0, target, size=(10, 17), align_corners=align_corners, backend=backend)
    resize = lambda x: F.interpolate(x, (10, 17), mode="bilinear", align_corners=align_corners)  # noqa: E731
    plain = kdops.pixel_kl(resize(s), resize(t), 1.0, target, backend=backend)
    assert relative_error(fused, plain) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Extreme inputs


@pytest.mark.parametrize("device,backend,shape,size", on(COMPILED, [
    pytest.param((2, 7, 5, 6), (19, 23), id="2x7x5x6-19x23"),
]) + on(INTERPRETER, [pytest.param((2, 5, 2, 3), (5, 7), id="2x5x2x3-5x7")]))
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus-1e3", "plus-1e4"])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_large_offset_logits(device, backend, shape, size, offset, align_corners):
    """Shift-safe through the resize: logits near 1e4 keep float32 accuracy (the interpolation
    rounds at the magnitude of x − anchor; interpolating the raw values would round at ~1e-3)."""
    s, t = make_logits(shape, device=device, seed=7, scale=1.0)
    for tau in (1.0, 0.5):
        check(backend, s + offset, t + offset, tau, None, size, align_corners)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_teacher_minus_inf_is_probability_zero(device, backend, align_corners, layout):
    """A teacher −inf is p = 0 at every output pixel that reads it with a positive weight, and is
    not read where its weight is 0: finite loss, the reference's loss and gradients, a teacher
    gradient of exactly 0 there; with the student −inf at the same logits too (q = 0 there: the
    oracle's values): at the first corner, inside, and two classes of the last corner."""
    s, t = make_logits((2, 4, 3, 3), seed=13)
    where = [(0, 1, 0, 0), (1, 3, 1, 1), (1, 0, 2, 2), (1, 1, 2, 2)]
    for index in where:
        t[index] = float("-inf")
    for student_too in (False, True):
        s_case = s.clone()
        if student_too:
            for index in where:
                s_case[index] = float("-inf")
        a = make_layout(s_case.to(device), layout)
        b = make_layout(t.to(device), layout)
        expected = resized_oracle(a, b, 1.0, None, (5, 7), align_corners) if student_too else None
        loss, _, grad_t = check(backend, a, b, 1.0, None, (5, 7), align_corners, expected=expected)
        assert torch.isfinite(loss)
        for index in where:
            assert grad_t[index].item() == 0.0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_student_minus_inf_gives_infinite_loss(device, backend):
    """q = 0 where p > 0: KL = +inf, not NaN or a clamped finite value."""
    s, t = make_logits((1, 3, 4, 4), device=device)
    s[0, 1, 2, 2] = float("-inf")
    loss = kdops.pixel_kl(s, t, 1.0, size=(8, 8), backend=backend)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_class_at_minus_1e4(device, backend):
    """A class masked with a large finite negative logit is as harmless as −inf."""
    s, t = make_logits((1, 4, 3, 4), device=device)
    t[:, 2] = -1e4
    s[:, 3] = -1e4
    check(backend, s, t, 1.0, None, (8, 10), True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_input_read_only_by_ignored_pixels_reaches_nothing(device, backend, align_corners, fill):
    """NaN/±inf in every class of an input pixel whose every reader is ignored: the clean inputs'
    loss and gradients, and exactly zero gradients at that pixel."""
    shape, size, pixel = (2, 3, 3, 4), (7, 9), (1, 2)
    s, t = make_logits(shape, device=device)
    target = target_ignoring_readers_of(2, size, shape[2:], pixel, align_corners, 3, device)
    expected = reference_loss_and_grads(s, t, 1.0, target, size, align_corners)
    s[:, :, pixel[0], pixel[1]] = fill
    t[:, :, pixel[0], pixel[1]] = fill
    _, grad_s, grad_t = check(backend, s, t, 1.0, target, size, align_corners, expected=expected)
    assert not grad_s[:, :, pixel[0], pixel[1]].any() and not grad_t[:, :, pixel[0], pixel[1]].any()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_pixels_ignored_with_nan_inputs(device, backend):
    """No valid pixel: loss 0 and zero gradients, whatever the (here all NaN) logits."""
    s = torch.full((2, 3, 4, 5), float("nan"), device=device)
    t = torch.full((2, 3, 4, 5), float("nan"), device=device)
    target = torch.full((2, 9, 7), 255, device=device)
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, 1.0, target, (9, 7), False)
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))


# ---------------------------------------------------------------------------------------------
# The ops: counts, gradients requested, what autograd saves, determinism


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_num_valid(device, backend):
    """The op's second output: the int64 count of valid output pixels (N·H·W without target)."""
    s, t = make_logits((2, 3, 5, 7), device=device)
    target = make_target(2, (9, 13), 3, device)
    op = ops(backend).resized_pixel_kl
    _, num_valid = op(s, t, target, 255, 1.0, [9, 13], False)
    assert num_valid.dim() == 0 and num_valid.dtype == torch.int64
    assert int(num_valid) == int((target != 255).sum())
    _, num_valid = op(s, t, None, 255, 1.0, [9, 13], True)
    assert int(num_valid) == 2 * 9 * 13


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_one_gradient_requested(device, backend, wanted, with_target):
    """Only the requested gradient is computed: the backward op gets the flags and returns an
    empty tensor for the other; autograd leaves the other's .grad None."""
    s, t = make_logits((2, 3, 4, 5), device=device)
    target = make_target(2, (9, 7), 3, device) if with_target else None
    s.requires_grad_(wanted == "student")
    t.requires_grad_(wanted == "teacher")
    loss = kdops.pixel_kl(s, t, 1.0, target, size=(9, 7), backend=backend)
    _, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, target, (9, 7), False)
    with OpCalls("resized_pixel_kl_backward") as mode:
        loss.backward()
    ((args, (grad_s, grad_t)),) = mode.calls
    student_flag, teacher_flag = args[-2:]
    assert (student_flag, teacher_flag) == (wanted == "student", wanted == "teacher")
    unit = gradient_unit((9, 7), 2, 1.0, target)
    if wanted == "student":
        assert grad_t.numel() == 0 and t.grad is None
        assert_grad_close(s.grad, grad_s_ref, 1e-5, "student", unit)
    else:
        assert grad_s.numel() == 0 and s.grad is None
        assert_grad_close(t.grad, grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", ["student", "both"])
def test_saves_only_inputs_target_and_count(device, backend, requires_grad):
    """Nothing of the resized size is kept for backward: the inputs themselves, the target and
    the one-element count."""
    s, t = make_logits((2, 3, 4, 5), device=device)
    target = make_target(2, (16, 20), 3, device)
    s.requires_grad_(True)
    t.requires_grad_(requires_grad == "both")
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kdops.pixel_kl(s, t, 1.0, target, size=(16, 20), backend=backend)
    loss.backward()
    assert saved, "nothing saved for backward"
    for x in saved:
        is_input = any(x.data_ptr() == y.data_ptr() and x.shape == y.shape for y in (s, t, target))
        assert is_input or x.numel() == 1, f"saved a tensor of shape {tuple(x.shape)}"


@pytest.mark.parametrize("device,backend,shape,size", on(GPU, [
    pytest.param((8, 19, 64, 128), (512, 1024), id="apd-8x19x64x128-512x1024"),
]) + on(CPU_ONLY, [
    pytest.param((2, 19, 16, 32), (128, 256), id="2x19x16x32-128x256"),
]) + on(INTERPRETER, [pytest.param((2, 3, 2, 3), (4, 5), id="2x3x2x3-4x5")]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, backend, shape, size, dtype, layout):
    """The same call twice: bitwise the same loss and gradients (fixed-order sums, no atomics);
    at the APD size on the GPU, where many blocks' partial sums meet."""
    s, t = make_logits(shape, dtype, device)
    s, t = make_layout(s, layout), make_layout(t, layout)
    target = make_target(shape[0], size, shape[1], device, ignored=0.1)
    first = loss_and_grads(backend, s, t, 1.0, target, size, False)
    second = loss_and_grads(backend, s, t, 1.0, target, size, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.isfinite(first[0]) and all(torch.isfinite(g).all() for g in first[1:])


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_same_result_for_any_thread_count(device, backend):
    s, t = make_logits((2, 19, 13, 17), device=device)
    target = make_target(2, (100, 129), 19, device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(loss_and_grads(backend, s, t, 1.0, target, (100, 129), True))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", GPU)
def test_no_host_sync(device, backend):
    """The GPU hot path: forward and backward never synchronise the host."""
    s, t = make_logits((2, 5, 6, 7), device=device)
    target = make_target(2, (48, 56), 5, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kdops.pixel_kl(s, t, 1.0, target, size=(48, 56), backend=backend).backward()  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kdops.pixel_kl(s, t, 1.0, target, size=(48, 56), backend=backend).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, gradcheck, argument errors


@pytest.mark.parametrize("device,backend,layout,align_corners", on(
    COMPILED, layout_cases("contiguous", "channels_last", "strided"), ALIGN,
) + on(INTERPRETER, layout_cases("contiguous"), ALIGN[1:]))
def test_opcheck(device, backend, layout, align_corners):
    """Schema, fake kernels, autograd registration, each op with and without target, both
    align_corners. The interpreter takes one row: opcheck runs each op several times (~20 s per
    row there)."""
    namespace = ops(backend)
    s, t = make_logits((2, 3, 2, 3), device=device)
    s, t = make_layout(s, layout), make_layout(t, layout)
    target = make_target(2, (4, 5), 3, device)
    _, num_valid = namespace.resized_pixel_kl(s, t, target, 255, 2.0, [4, 5], align_corners)
    grad = torch.tensor(1.5, device=device)
    op = namespace.resized_pixel_kl.default
    backward = namespace.resized_pixel_kl_backward.default
    cases = [
        (op, (s.detach().requires_grad_(True), t.detach().requires_grad_(True), target, 255, 2.0, [4, 5],
              align_corners)),
        (op, (s.detach().requires_grad_(True), t, None, 255, 0.5, [3, 2], not align_corners)),
    ]
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((backward, (grad, s, t, target, num_valid, 255, 2.0, [4, 5], align_corners, *flags)))
    for fn, args in cases:
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    s, t = make_logits((2, 3, 4, 5), device=device)
    target = make_target(2, (8, 10), 3, device)

    def loss_fn(a, b):
        return 2.0 * kdops.pixel_kl(a, b, 2.0, target, size=(8, 10), align_corners=True, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    results = []
    for fn in (loss_fn, compiled):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        loss = fn(a, b)
        results.append((loss,) + torch.autograd.grad(loss, (a, b)))
    assert counter.frame_count == 1
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_gradcheck_float64(device, backend, align_corners):
    s, t = make_logits((2, 3, 3, 4), torch.float64, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    target = make_target(2, (5, 7), 3, device)
    assert torch.autograd.gradcheck(
        lambda a, b: kdops.pixel_kl(a, b, 2.0, target, size=(5, 7), align_corners=align_corners,
                                    backend=backend), (s, t))


BAD_ARGUMENTS = [
    pytest.param(dict(size=(0, 4)), ValueError, "size", id="size-zero"),
    pytest.param(dict(size=(4, 5, 6)), ValueError, "size", id="size-three"),
    pytest.param(dict(size=(4.0, 5)), ValueError, "size", id="size-float"),
    pytest.param(dict(size=(6, 8), align_corners=1), TypeError, "align_corners", id="align-int"),
    pytest.param(dict(size=(6, 8), target=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError, "target",
                 id="target-at-input-size"),
    pytest.param(dict(size=(6, 8), target=torch.full((2, 6, 8), 3)), ValueError, "target",
                 id="label-out-of-range"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument(kwargs, error, name):
    s, t = make_logits((2, 3, 3, 4))
    with pytest.raises(error, match=name):
        kdops.pixel_kl(s, t, 1.0, **kwargs)


def test_size_needs_four_dimensional_logits():
    s = torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="student"):
        kdops.pixel_kl(s, s, size=(4, 4))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_op_argument_errors(device, backend):
    """The op's own checks, each naming its argument (the public API checks first; the op can be
    called directly)."""
    s, t = make_logits((2, 3, 5, 7), device=device)
    op = ops(backend).resized_pixel_kl
    with pytest.raises(ValueError, match=r"size must be \(H, W\) with H, W >= 1"):
        op(s, t, None, 255, 1.0, [0, 4], False)
    with pytest.raises(ValueError, match=r"target must have shape \[2, 9, 13\]"):
        op(s, t, torch.zeros(2, 5, 7, dtype=torch.int64, device=device), 255, 1.0, [9, 13], False)
    with pytest.raises(ValueError, match="student must have shape"):
        op(s[0], t[0], None, 255, 1.0, [9, 13], False)
    with pytest.raises(ValueError, match="teacher must have the shape of student"):
        op(s, t[:, :2], None, 255, 1.0, [9, 13], False)
    with pytest.raises(TypeError, match="teacher must have the dtype of student"):
        op(s, t.double(), None, 255, 1.0, [9, 13], False)
    with pytest.raises(ValueError, match="tau must be finite"):
        op(s, t, None, 255, 0.0, [9, 13], False)
    with pytest.raises(ValueError, match="grad_loss must hold one element"):
        ops(backend).resized_pixel_kl_backward(
            torch.ones(2, device=device), s, t, None, torch.tensor(1, device=device), 255, 1.0,
            [9, 13], False, True, True)


def test_cuda_backend_on_cpu_tensors_says_why():
    s, t = make_logits((2, 3, 3, 4))
    with pytest.raises(kd_backend.BackendUnavailableError, match="runs on cuda tensors"):
        kdops.pixel_kl(s, t, size=(6, 8), backend="cuda")
