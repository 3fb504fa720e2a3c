"""pixel_kl(size=...): the fused resize + KL of every backend against the float64 reference.

The reference resizes with :func:`kdops.reference.softmax_kl.bilinear_resize` (F.interpolate's
source positions; a corner of weight 0 not read) and then takes the plain pixel KL; the fused
kernels never store the resized logits. Shapes stay small for the Triton interpreter.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

import kdops
from kdops import backend as kd_backend
from kdops.reference import softmax_kl as ref
from tests.ops.test_softmax_kl import assert_grad_close, make_pair
from tests.utils import LAYOUTS, TOLERANCES, backend_params, make_layout, relative_error

BACKENDS = backend_params("pixel_kl")
CPU_ONLY = [p for p in BACKENDS if p.id == "cpu-cpu"]

# (logits shape, output size): up by 8 as APD does, up by odd factors, down, to one pixel,
# from one pixel, rows or columns of one.
RESIZES = [
    pytest.param((2, 3, 3, 4), (24, 32), id="up8"),
    pytest.param((2, 5, 4, 6), (9, 13), id="up-odd"),
    pytest.param((1, 4, 9, 11), (4, 5), id="down"),
    pytest.param((2, 3, 7, 5), (3, 8), id="mixed"),
    pytest.param((2, 3, 4, 5), (1, 1), id="to-1x1"),
    pytest.param((2, 4, 1, 1), (3, 4), id="from-1x1"),
    pytest.param((1, 8, 1, 6), (5, 1), id="H1-to-W1"),
]
ALIGN = [pytest.param(True, id="align"), pytest.param(False, id="no-align")]


def ops(backend):
    if backend == "triton":
        importlib.import_module("kdops.triton.resized_pixel_kl")
        return torch.ops.kdops_triton
    return torch.ops.kdops


def make_target(batch, size, classes, device, ignored=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch, *size), generator=g)
    target[torch.rand(target.shape, generator=g) < ignored] = 255
    return target.to(device)


def reference(s, t, tau, target, size, align_corners, ignore_index=255):
    """Loss and both gradients of the reference in float64 on the same (rounded) values."""
    s64 = s.detach().double().cpu().requires_grad_(True)
    t64 = t.detach().double().cpu().requires_grad_(True)
    loss = ref.pixel_kl(s64, t64, tau, None if target is None else target.cpu(), ignore_index, size,
                        align_corners)
    return (loss.detach(),) + torch.autograd.grad(loss, (s64, t64))


def check(backend, s, t, tau, target, size, align_corners, loss_tol, grad_tol):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = kdops.pixel_kl(s, t, tau, target, size=size, align_corners=align_corners, backend=backend)
    expected, grad_s_ref, grad_t_ref = reference(s, t, tau, target, size, align_corners)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    valid = size[0] * size[1] * s.shape[0] if target is None else int((target != 255).sum())
    unit = tau / max(valid, 1)
    assert_grad_close(grad_s, grad_s_ref, grad_tol, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, grad_tol, "teacher", unit)
    return loss, grad_s, grad_t


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape,size", RESIZES)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_matches_reference(device, backend, dtype, loss_tol, grad_tol, shape, size, align_corners,
                           with_target):
    s, t = make_pair(shape, dtype, "contiguous", device)
    target = make_target(shape[0], size, shape[1], device) if with_target else None
    check(backend, s, t, 2.0, target, size, align_corners, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS + ("transposed_hw",))
@pytest.mark.parametrize("align_corners", ALIGN)
def test_layouts(device, backend, layout, align_corners):
    s, t = make_pair((2, 5, 4, 6), torch.float32, "contiguous", device)
    if layout == "transposed_hw":
        s, t = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (s, t))
    else:
        s, t = make_layout(s, layout), make_layout(t, "contiguous" if layout == "strided" else layout)
    target = make_target(2, (11, 13), 5, device)
    check(backend, s, t, 0.5, target, (11, 13), align_corners, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_apd_sized_case(device, backend):
    """APD's shape, scaled down: 19 classes, ×8 per side, align_corners=True, τ = 1."""
    s, t = make_pair((1, 19, 3, 5), torch.float32, "contiguous", device)
    check(backend, s, t, 1.0, None, (24, 40), True, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_own_size_is_plain_pixel_kl(device, backend):
    s, t = make_pair((2, 3, 5, 7), torch.float32, "contiguous", device)
    for align_corners in (True, False):
        resized = kdops.pixel_kl(s, t, 2.0, size=(5, 7), align_corners=align_corners, backend=backend)
        assert torch.equal(resized, kdops.pixel_kl(s, t, 2.0, backend=backend))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_equals_interpolate_then_pixel_kl(device, backend, align_corners):
    """What users wrote before: F.interpolate both logits, then pixel_kl."""
    s, t = make_pair((2, 4, 3, 5), torch.float32, "contiguous", device)
    target = make_target(2, (10, 17), 4, device)
    fused = kdops.pixel_kl(s, t, 1.0, target, size=(10, 17), align_corners=align_corners, backend=backend)
    resize = lambda x: F.interpolate(x, (10, 17), mode="bilinear", align_corners=align_corners)  # noqa: E731
    plain = kdops.pixel_kl(resize(s), resize(t), 1.0, target, backend=backend)
    assert relative_error(fused, plain) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_teacher_minus_inf_is_probability_zero(device, backend, align_corners):
    """A teacher logit of −inf is a probability of 0 at every output pixel it reaches with a
    positive weight, and is not read where its weight is 0: the loss stays finite."""
    s, t = make_pair((1, 3, 3, 4), torch.float32, "contiguous", device)
    t[0, 1, 1, 2] = float("-inf")
    t[0, 2, 0, 0] = float("-inf")
    loss, grad_s, grad_t = check(backend, s, t, 1.0, None, (7, 9), align_corners, 1e-5, 1e-5)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus-1e3", "plus-1e4"])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_large_offset_logits(device, backend, offset, align_corners):
    """Shift-safe through the resize: logits with a common offset keep float32 accuracy (the
    interpolation rounds at the magnitude of x − anchor, not of x)."""
    s, t = make_pair((2, 5, 3, 4), torch.float32, "contiguous", device)
    check(backend, s + offset, t + offset, 1.0, None, (7, 9), align_corners, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masked_class_at_minus_1e4(device, backend):
    """A class masked with a large finite negative logit is as harmless as −inf."""
    s, t = make_pair((1, 4, 3, 4), torch.float32, "contiguous", device)
    t[:, 2] = -1e4
    s[:, 3] = -1e4
    check(backend, s, t, 1.0, None, (8, 10), True, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_in_inputs_read_only_by_ignored_pixels(device, backend):
    """NaN at an input pixel all of whose output pixels are ignored reaches nothing."""
    s, t = make_pair((1, 3, 4, 5), torch.float32, "contiguous", device)
    size = (12, 15)
    reach = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    reach[0, 0, 1, 2] = 1.0
    touched = ref.bilinear_resize(reach, size, True)[0, 0] != 0
    target = make_target(1, size, 3, device, ignored=0.1)
    target[0][touched.to(device)] = 255
    expected = reference(s, t, 2.0, target, size, True)
    s[0, :, 1, 2] = float("nan")
    t[0, 0, 1, 2] = float("nan")
    a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    loss = kdops.pixel_kl(a, b, 2.0, target, size=size, align_corners=True, backend=backend)
    grad_s, grad_t = torch.autograd.grad(loss, (a, b))
    assert relative_error(loss, expected[0]) <= 1e-5
    for got, want in ((grad_s, expected[1]), (grad_t, expected[2])):
        assert torch.isfinite(got).all()
        assert relative_error(got, want) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_all_pixels_ignored(device, backend):
    s, t = make_pair((2, 3, 3, 4), torch.float32, "contiguous", device)
    s[0, 0, 0, 0] = float("nan")
    target = torch.full((2, 6, 8), 255, device=device)
    a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    loss = kdops.pixel_kl(a, b, 1.0, target, size=(6, 8), backend=backend)
    grad_s, grad_t = torch.autograd.grad(loss, (a, b))
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    s, t = make_pair((2, 5, 4, 6), torch.float32, "contiguous", device)
    target = make_target(2, (17, 23), 5, device)
    results = []
    for _ in range(2):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        loss = kdops.pixel_kl(a, b, 1.0, target, size=(17, 23), align_corners=True, backend=backend)
        results.append((loss,) + torch.autograd.grad(loss, (a, b)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_same_result_for_any_thread_count(device, backend):
    s, t = make_pair((2, 19, 13, 17), torch.float32, "contiguous", device)
    target = make_target(2, (100, 129), 19, device)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
            loss = kdops.pixel_kl(a, b, 1.0, target, size=(100, 129), align_corners=True, backend=backend)
            results.append((loss,) + torch.autograd.grad(loss, (a, b)))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_one_gradient_requested(device, backend, wanted):
    s, t = make_pair((2, 3, 4, 5), torch.float32, "contiguous", device)
    _, grad_s_ref, grad_t_ref = reference(s, t, 1.0, None, (9, 7), False)
    s.requires_grad_(wanted == "student")
    t.requires_grad_(wanted == "teacher")
    kdops.pixel_kl(s, t, 1.0, size=(9, 7), backend=backend).backward()
    got, other, expected = (s.grad, t.grad, grad_s_ref) if wanted == "student" else (t.grad, s.grad, grad_t_ref)
    assert other is None
    assert_grad_close(got, expected, 1e-5, wanted, 1.0 / (2 * 63))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_saves_only_inputs_target_and_count(device, backend):
    """Nothing of the resized size is kept for backward."""
    s, t = make_pair((2, 3, 4, 5), torch.float32, "contiguous", device)
    target = make_target(2, (32, 40), 3, device)
    s.requires_grad_(True)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kdops.pixel_kl(s, t, 1.0, target, size=(32, 40), backend=backend)
    loss.backward()
    assert saved, "nothing saved for backward"
    for x in saved:
        is_input = any(x.data_ptr() == y.data_ptr() and x.shape == y.shape for y in (s, t, target))
        assert is_input or x.numel() <= 1, f"saved a tensor of shape {tuple(x.shape)}"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    namespace = ops(backend)
    s, t = make_pair((2, 3, 4, 5), torch.float32, "contiguous", device)
    target = make_target(2, (7, 9), 3, device)
    _, num_valid = namespace.resized_pixel_kl(s, t, target, 255, 2.0, [7, 9], True)
    grad = torch.tensor(1.5, device=device)
    cases = [
        (namespace.resized_pixel_kl.default,
         (s.detach().requires_grad_(True), t.detach().requires_grad_(True), target, 255, 2.0, [7, 9], True)),
        (namespace.resized_pixel_kl.default, (s.detach().requires_grad_(True), t, None, 255, 0.5, [3, 2], False)),
    ]
    for flags in [(True, True), (True, False), (False, True)]:
        cases.append((namespace.resized_pixel_kl_backward.default,
                      (grad, s, t, target, num_valid, 255, 2.0, [7, 9], True, *flags)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    s, t = make_pair((2, 3, 4, 5), torch.float32, "contiguous", device)
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
    s, t = make_pair((2, 3, 3, 4), torch.float64, "contiguous", device)
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
    s, t = make_pair((2, 3, 3, 4), torch.float32, "contiguous", "cpu")
    with pytest.raises(error, match=name):
        kdops.pixel_kl(s, t, 1.0, **kwargs)


def test_size_needs_four_dimensional_logits():
    s = torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="student"):
        kdops.pixel_kl(s, s, size=(4, 4))


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_op_argument_errors(device, backend):
    s, t = make_pair((2, 3, 3, 4), torch.float32, "contiguous", device)
    with pytest.raises(ValueError, match="size"):
        torch.ops.kdops.resized_pixel_kl(s, t, None, 255, 1.0, [0, 3], True)
    with pytest.raises(ValueError, match="target"):
        torch.ops.kdops.resized_pixel_kl(s, t, torch.zeros(2, 3, 4, dtype=torch.long), 255, 1.0, [6, 8], True)
    with pytest.raises(ValueError, match="student"):
        torch.ops.kdops.resized_pixel_kl(s[0], t[0], None, 255, 1.0, [6, 8], True)


def test_cuda_backend_on_cpu_tensors_says_why():
    s, t = make_pair((2, 3, 3, 4), torch.float32, "contiguous", "cpu")
    with pytest.raises(kd_backend.BackendUnavailableError, match="runs on cuda tensors"):
        kdops.pixel_kl(s, t, size=(6, 8), backend="cuda")
