"""The CUDA kernels of resized_pixel_kl (kdops.pixel_kl(..., size=, align_corners=),
backend="cuda") against the float64 reference and oracle, on a GPU machine; every test skips
where there is no CUDA device (or the extension was built without its CUDA kernels), saying why.

The same per-thread code runs on the CPU in test_resized_pixel_kl_threads.py; what only runs here:
the grids and their fixed-order reductions, the 16-bit loads and stores, the device's exp/log,
the torch side (argument checks, strides, streams), opcheck, torch.compile and the host sync.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import kdops
from kdops.reference import softmax_kl as ref
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
from tests.utils import TOLERANCES, backend_params, make_layout, relative_error

# ("cuda", "cuda"): marked needs_cuda, and skipped with the backend's reason where the extension
# has no CUDA kernels.
CUDA = [p for p in backend_params("pixel_kl") if p.id == "cuda-cuda"]
assert CUDA, "the cuda backend must declare pixel_kl"


def loss_and_grads(backend, s, t, tau, target, size, align_corners):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = kdops.pixel_kl(s, t, tau, target, size=size, align_corners=align_corners, backend=backend)
    return (loss,) + torch.autograd.grad(loss, (s, t))


def check_against_reference(backend, s, t, tau, target, size, align_corners, loss_tol, grad_tol):
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, tau, target, size, align_corners)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, tau, target, size, align_corners)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    unit = gradient_unit(size, s.shape[0], tau, target)
    assert_grad_close(grad_s, grad_s_ref, grad_tol, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, grad_tol, "teacher", unit)
    return grad_s, grad_t


def check_against_oracle(backend, s, t, tau, target, size, align_corners, tol=1e-5):
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, tau, target, size, align_corners)
    expected, grad_s_ref, grad_t_ref = resized_oracle(s, t, tau, target, size, align_corners)
    assert relative_error(loss, expected) <= tol, (loss.item(), expected.item())
    for name, got, want in (("student", grad_s, grad_s_ref), ("teacher", grad_t, grad_t_ref)):
        assert torch.isfinite(got).all(), f"{name} gradient has non-finite values"
        assert relative_error(got, want) <= tol, (name, relative_error(got, want))
    return loss, grad_s, grad_t


# ---------------------------------------------------------------------------------------------
# Loss and gradients against the reference


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("shape,size", RESIZE_CASES)
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_matches_reference(device, backend, dtype, loss_tol, grad_tol, align_corners, shape, size,
                           with_target):
    s, t = make_logits(shape, dtype, device)
    target = make_target(shape[0], size, shape[1], device) if with_target else None
    check_against_reference(backend, s, t, 1.0, target, size, align_corners, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_layouts(device, backend, dtype, loss_tol, grad_tol, layout, align_corners):
    """Inputs of other layouts (a strided target too) give the same values; each gradient comes
    back in the layout empty_like(input) gives (the fake kernel's promise)."""
    shape, size = (2, 5, 3, 7), (8, 11)
    s, t = make_logits(shape, dtype, device)
    target = make_target(2, size, 5, device)
    if layout == "strided":
        target = make_layout(target, "strided")
    a, b = make_layout(s, layout), make_layout(t, layout)
    grad_s, grad_t = check_against_reference(backend, a, b, 1.0, target, size, align_corners, loss_tol, grad_tol)
    assert grad_s.stride() == torch.empty_like(a).stride()
    assert grad_t.stride() == torch.empty_like(b).stride()


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("tau", [0.5, 4.0], ids=["tau0.5", "tau4"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tau(device, backend, tau, layout):
    shape, size = (2, 6, 5, 7), (40, 56)
    s, t = make_logits(shape, device=device)
    target = make_target(2, size, 6, device)
    a, b = make_layout(s, layout), make_layout(t, layout)
    check_against_reference(backend, a, b, tau, target, size, True, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("shape,size", [
    pytest.param((2, 19, 32, 64), (256, 512), id="cityscapes-like-8x"),
    pytest.param((1, 150, 12, 16), (96, 128), id="ade-C150-8x"),
    pytest.param((2, 21, 65, 65), (513, 513), id="voc-odd-8x"),
])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_realistic_shapes(device, backend, shape, size, align_corners):
    """APD/CIRKD shapes (8× per side, C = 19/21/150): many blocks and grid-stride rounds, the
    reference evaluated in float64 on the device."""
    s, t = make_logits(shape, torch.bfloat16, device)
    target = make_target(shape[0], size, shape[1], device, ignored=0.1)
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, 1.0, target, size, align_corners)
    s64 = s.double().requires_grad_(True)
    t64 = t.double().requires_grad_(True)
    expected = ref.pixel_kl(s64, t64, 1.0, target, 255, size=size, align_corners=align_corners)
    grad_s_ref, grad_t_ref = torch.autograd.grad(expected, (s64, t64))
    assert relative_error(loss, expected) <= 1e-4
    unit = gradient_unit(size, shape[0], 1.0, target)
    assert_grad_close(grad_s, grad_s_ref, 1e-2, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, 1e-2, "teacher", unit)


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("shape,size", [
    pytest.param((1, 3, 2, 40), (3, 2000), id="tiles-halved-40x50"),
    pytest.param((1, 2, 2, 3), (3, 2000), id="per-thread-fallback-3-to-2000"),
    pytest.param((2, 3, 3, 300), (5, 301), id="several-tiles-w300"),
    pytest.param((2, 5, 7, 9), (3, 4), id="down"),
])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_backward_forms(device, backend, shape, size, align_corners):
    """The launcher's backward forms (tests/ops/test_resized_pixel_kl_threads.py checks which one
    each shape takes): tiles halved until their span fits shared memory, the per-thread gather
    when not even one column's readers fit, several column tiles per row, downsampling."""
    s, t = make_logits(shape, device=device)
    target = make_target(shape[0], size, shape[1], device)
    check_against_reference(backend, s, t, 1.0, target, size, align_corners, 1e-5, 1e-5)


# ---------------------------------------------------------------------------------------------
# Extreme inputs, against the float64 oracle


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus-1e3", "plus-1e4"])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_large_offset_logits(device, backend, offset, align_corners):
    """Logits near 1e4 (the anchored interpolation keeps float32 accuracy; interpolating the raw
    values would round them at ~1e-3)."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(2, 7, 5, 6, generator=g) + offset).to(device)
    t = (torch.randn(2, 7, 5, 6, generator=g) + offset).to(device)
    for tau in (1.0, 0.5):
        check_against_oracle(backend, s, t, tau, None, (19, 23), align_corners)


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_teacher_minus_inf_is_probability_zero(device, backend, align_corners, layout):
    """A teacher −inf is p = 0 at every output that reads it: finite loss and gradients equal to
    the oracle's, a teacher gradient of exactly 0 there; also with the student −inf there."""
    s, t = make_logits((2, 5, 4, 6), seed=13)
    where = [(0, 1, 0, 0), (1, 3, 2, 4), (1, 0, 3, 5), (1, 1, 3, 5)]
    for index in where:
        t[index] = float("-inf")
    for student_too in (False, True):
        s_case = s.clone()
        if student_too:
            for index in where:
                s_case[index] = float("-inf")
        a = make_layout(s_case.to(device), layout)
        b = make_layout(t.to(device), layout)
        _, _, grad_t = check_against_oracle(backend, a, b, 1.0, None, (13, 11), align_corners)
        for index in where:
            assert grad_t[index].item() == 0.0


@pytest.mark.parametrize("device,backend", CUDA)
def test_student_minus_inf_gives_infinite_loss(device, backend):
    s, t = make_logits((1, 3, 4, 4), device=device)
    s[0, 1, 2, 2] = float("-inf")
    loss = kdops.pixel_kl(s, t, 1.0, size=(8, 8), backend=backend)
    assert loss.item() == float("inf")


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_input_read_only_by_ignored_pixels_reaches_nothing(device, backend, align_corners, fill):
    """NaN/±inf at an input pixel whose every reader is ignored: the clean inputs' loss and
    gradients, and exact zero gradients at that pixel."""
    shape, size, pixel = (2, 3, 5, 6), (17, 19), (2, 3)
    s, t = make_logits(shape, device=device)
    target = target_ignoring_readers_of(2, size, shape[2:], pixel, align_corners, 3, device)
    expected, grad_s_ref, grad_t_ref = resized_oracle(s, t, 1.0, target, size, align_corners)
    s[:, :, pixel[0], pixel[1]] = fill
    t[:, :, pixel[0], pixel[1]] = fill
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, 1.0, target, size, align_corners)
    assert relative_error(loss, expected) <= 1e-5
    assert relative_error(grad_s, grad_s_ref) <= 1e-5 and relative_error(grad_t, grad_t_ref) <= 1e-5
    assert not grad_s[:, :, pixel[0], pixel[1]].any() and not grad_t[:, :, pixel[0], pixel[1]].any()


@pytest.mark.parametrize("device,backend", CUDA)
def test_all_pixels_ignored_with_nan_inputs(device, backend):
    s = torch.full((2, 3, 4, 5), float("nan"), device=device)
    t = torch.full((2, 3, 4, 5), float("nan"), device=device)
    target = torch.full((2, 9, 7), 255, device=device)
    loss, grad_s, grad_t = loss_and_grads(backend, s, t, 1.0, target, (9, 7), False)
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))


# ---------------------------------------------------------------------------------------------
# The ops: counts, gradients requested, what autograd saves, determinism


@pytest.mark.parametrize("device,backend", CUDA)
def test_num_valid(device, backend):
    s, t = make_logits((2, 3, 5, 7), device=device)
    target = make_target(2, (9, 13), 3, device)
    _, num_valid = torch.ops.kdops.resized_pixel_kl(s, t, target, 255, 1.0, [9, 13], False)
    assert num_valid.dim() == 0 and num_valid.dtype == torch.int64
    assert int(num_valid) == int((target != 255).sum())
    _, num_valid = torch.ops.kdops.resized_pixel_kl(s, t, None, 255, 1.0, [9, 13], True)
    assert int(num_valid) == 2 * 9 * 13


class BackwardCalls(TorchDispatchMode):
    """Records the resized_pixel_kl_backward calls: their requires_grad flags and outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] == "resized_pixel_kl_backward":
            self.calls.append((args[-2], args[-1], out))
        return out


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_one_gradient_requested(device, backend, wanted):
    s, t = make_logits((2, 3, 5, 7), device=device)
    target = make_target(2, (9, 13), 3, device)
    s.requires_grad_(wanted == "student")
    t.requires_grad_(wanted == "teacher")
    loss = kdops.pixel_kl(s, t, 1.0, target, size=(9, 13), backend=backend)
    _, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, target, (9, 13), False)
    with BackwardCalls() as mode:
        loss.backward()
    (student_flag, teacher_flag, (grad_s, grad_t)), = mode.calls
    assert (student_flag, teacher_flag) == (wanted == "student", wanted == "teacher")
    unit = gradient_unit((9, 13), 2, 1.0, target)
    if wanted == "student":
        assert grad_t.numel() == 0 and t.grad is None
        assert_grad_close(s.grad, grad_s_ref, 1e-5, "student", unit)
    else:
        assert grad_s.numel() == 0 and s.grad is None
        assert_grad_close(t.grad, grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("device,backend", CUDA)
def test_saves_only_inputs_target_and_count(device, backend):
    s, t = make_logits((2, 3, 5, 7), device=device)
    target = make_target(2, (40, 56), 3, device)
    s.requires_grad_(True)
    t.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kdops.pixel_kl(s, t, 1.0, target, size=(40, 56), backend=backend)
    loss.backward()
    assert saved, "nothing saved for backward"
    for x in saved:
        is_input = x.data_ptr() in (s.data_ptr(), t.data_ptr(), target.data_ptr())
        assert is_input or x.numel() == 1, f"saved a tensor of shape {tuple(x.shape)}"


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(device, backend, dtype, layout):
    """The same call twice: bitwise the same loss and gradients (fixed-order sums, no atomics), at
    the APD size (8, 19, 64, 128) → (512, 1024)."""
    s, t = make_logits((8, 19, 64, 128), dtype, device)
    s, t = make_layout(s, layout), make_layout(t, layout)
    target = make_target(8, (512, 1024), 19, device, ignored=0.1)
    first = loss_and_grads(backend, s, t, 1.0, target, (512, 1024), False)
    second = loss_and_grads(backend, s, t, 1.0, target, (512, 1024), False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.isfinite(first[0]) and all(torch.isfinite(g).all() for g in first[1:])


@pytest.mark.parametrize("device,backend", CUDA)
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
# Registration: opcheck, torch.compile, argument errors


@pytest.mark.parametrize("device,backend", CUDA)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(device, backend, layout):
    s, t = make_logits((2, 3, 5, 7), device=device)
    s, t = make_layout(s, layout), make_layout(t, layout)
    target = make_target(2, (9, 13), 3, device)
    grad = torch.tensor(1.5, device=device)
    _, num_valid = torch.ops.kdops.resized_pixel_kl(s, t, target, 255, 2.0, [9, 13], False)
    s_grad = s.detach().requires_grad_(True)
    t_grad = t.detach().requires_grad_(True)
    op = torch.ops.kdops.resized_pixel_kl.default
    backward = torch.ops.kdops.resized_pixel_kl_backward.default
    cases = [
        (op, (s_grad, t_grad, target, 255, 2.0, [9, 13], False)),
        (op, (s_grad, t, None, 255, 0.5, [4, 3], True)),
    ]
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((backward, (grad, s, t, target, num_valid, 255, 2.0, [9, 13], False, *flags)))
    for fn, args in cases:
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("device,backend", CUDA)
def test_compile_fullgraph(device, backend):
    s, t = make_logits((2, 3, 5, 7), device=device)
    target = make_target(2, (9, 13), 3, device)

    def loss_fn(a, b):
        return 2.0 * kdops.pixel_kl(a, b, 2.0, target, size=(9, 13), align_corners=True, backend=backend)

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


@pytest.mark.parametrize("device,backend", CUDA)
def test_op_argument_errors(device, backend):
    """The C++ op's own checks (the public API checks first; the op can be called directly)."""
    s, t = make_logits((2, 3, 5, 7), device=device)
    op = torch.ops.kdops.resized_pixel_kl
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
        torch.ops.kdops.resized_pixel_kl_backward(
            torch.ones(2, device=device), s, t, None, torch.tensor(1, device=device), 255, 1.0,
            [9, 13], False, True, True)
