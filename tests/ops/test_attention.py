"""The fused backends of the attention-map ops against the float64 reference.

Every fused backend that implements the ops runs here (``backend_params``): the C++ CPU
kernels, the Triton kernels (under TRITON_INTERPRET=1 without a GPU: small shapes; every
launcher buffer starts as NaN, so a pass proves each output element is written) and the CUDA
kernels on GPU machines. The kernels' ops live in ``torch.ops.kdops`` (C++) and
``torch.ops.kdops_triton`` (Triton), with the same schemas.

Inputs are scaled so that float32 evaluation is well conditioned (a softmax over maps of O(1)
spread), and 16-bit gradients are taken of a scaled loss, as mixed-precision training does, so
that they land in the dtype's normal range: what is measured is the kernels' error, not the
dtype's underflow.
"""
import importlib

import pytest
import torch

import kdops
from kdops import backend as kd_backend
from kdops.ops.attention import attention_map_distance
from kdops.reference import attention as ref
from tests.utils import TOLERANCES, backend_params, make_layout, relative_error

BACKENDS = backend_params("attention_loss")
CLASS_BACKENDS = backend_params("class_attention_loss")
CPU_ONLY = [p for p in BACKENDS if p.id == "cpu-cpu"]
LAYOUTS = ("contiguous", "channels_last", "strided")
NORMS = ("softmax", "l2", "none")
# 16-bit gradients of loss·GRAD_SCALE (loss scaling): the gradients of these tiny losses would be
# float16 subnormals otherwise.
GRAD_SCALE = {torch.float32: 1.0, torch.float16: 1e4, torch.bfloat16: 1e4, torch.float64: 1.0}


def ops(backend):
    if backend == "triton":
        importlib.import_module("kdops.triton.attention")
        return torch.ops.kdops_triton
    return torch.ops.kdops


@pytest.fixture(autouse=True)
def poisoned_triton_outputs(monkeypatch):
    """Triton launcher buffers start as NaN (when the Triton module can be imported)."""
    if kd_backend.unavailable_reason("attention_loss", "triton", "cpu", torch.float32) is None or (
        torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    ):
        module = importlib.import_module("kdops.triton.attention")
        monkeypatch.setattr("kdops.triton._launch.POISON_OUTPUTS", True)
        monkeypatch.setattr(module, "_LAUNCH_OVERRIDES", {
            "reduce_block_c": 2, "reduce_block_l": 16, "class_block_k": 16, "class_block_c": 16,
            "class_block_l": 16,
        })


def features(shape, dtype, layout, device, p=2.0, seed=0):
    """randn features scaled so that Σ_c |x_c|^p is O(1) per position, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * shape[1] ** (-1.0 / p)
    return make_layout(x.to(dtype).to(device), layout)


def assert_grad_close(got, expected, tol, name):
    assert got is not None, f"no gradient for {name}"
    assert got.shape == expected.shape
    assert torch.isfinite(got).all(), f"{name} gradient has non-finite values"
    err = relative_error(got, expected)
    assert err <= tol, f"{name}: {err:.3g} > {tol}"


def check_loss(backend, s, t, p, reduce, norm, size, loss_tol, grad_tol):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(True)
    loss = kdops.attention_loss(s, t, p, reduce, norm, size, backend=backend)
    s64 = s.detach().double().cpu().requires_grad_(True)
    t64 = t.detach().double().cpu().requires_grad_(True)
    expected = ref.attention_loss(s64, t64, p, reduce, norm, size)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    scale = GRAD_SCALE[s.dtype]
    grad_s, grad_t = torch.autograd.grad(loss * scale, (s, t))
    ref_s, ref_t = torch.autograd.grad(expected * scale, (s64, t64))
    assert grad_s.dtype == s.dtype and grad_t.dtype == t.dtype
    assert_grad_close(grad_s, ref_s, grad_tol, "student")
    assert_grad_close(grad_t, ref_t, grad_tol, "teacher")


# ---------------------------------------------------------------------------------------------
# attention_map / attention_loss


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5], ids=["p1", "p2", "p3", "p0.5"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_attention_loss_matches_reference(device, backend, dtype, loss_tol, grad_tol, p, reduce):
    for layout in LAYOUTS:
        for norm in NORMS:
            s = features((2, 5, 6, 7), dtype, layout, device, p, seed=0)
            t = features((2, 3, 6, 7), dtype, layout, device, p, seed=1)  # other channels
            check_loss(backend, s, t, p, reduce, norm, None, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("student_hw,teacher_hw,size", [
    pytest.param((8, 10), (4, 5), None, id="teacher-up"),
    pytest.param((4, 5), (8, 10), None, id="teacher-down"),
    pytest.param((7, 9), (4, 5), (5, 3), id="both-to-odd"),
    pytest.param((3, 1), (5, 2), (2, 5), id="W1-to-2x5"),
])
def test_attention_loss_resizes(device, backend, dtype, loss_tol, grad_tol, student_hw, teacher_hw, size):
    for norm in NORMS:
        s = features((2, 4, *student_hw), dtype, "contiguous", device, seed=2)
        t = features((2, 6, *teacher_hw), dtype, "channels_last", device, seed=3)
        check_loss(backend, s, t, 2.0, "sum", norm, size, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_map_matches_reference(device, backend, dtype, loss_tol, grad_tol, layout):
    x = features((3, 6, 5, 9), dtype, layout, device, 2.0, seed=4)
    for p, reduce, norm, size in [(2.0, "sum", "softmax", None), (1.0, "mean", "l2", (4, 4)),
                                  (0.5, "sum", "none", (7, 11))]:
        xs = x.detach().requires_grad_(True)
        out = kdops.attention_map(xs, p, reduce, norm, size, backend=backend)
        x64 = x.detach().double().cpu().requires_grad_(True)
        expected = ref.attention_map(x64, p, reduce, norm, size)
        assert out.dtype == torch.float32 and out.shape == expected.shape
        assert relative_error(out, expected) <= loss_tol
        weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (grad,) = torch.autograd.grad((out * weights.to(out)).sum(), xs)  # O(1) gradients
        (grad_ref,) = torch.autograd.grad((expected * weights).sum(), x64)
        assert_grad_close(grad, grad_ref, grad_tol, "x")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5], ids=["p1", "p2", "p3", "p0.5"])
def test_zero_feature_map(device, backend, p):
    """Σ|0|^p = 0: softmax of zeros is uniform, l2 of zeros is 0, and no NaN anywhere."""
    x = torch.zeros(2, 3, 4, 5, device=device, requires_grad=True)
    uniform = kdops.attention_map(x, p, "sum", "softmax", backend=backend)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 20), rtol=0, atol=0)
    l2 = kdops.attention_map(x, p, "mean", "l2", backend=backend)
    assert torch.equal(l2, torch.zeros_like(l2))
    t = torch.randn(2, 3, 4, 5, device=device)
    for norm in NORMS:
        loss = kdops.attention_loss(x, t, p, "sum", norm, backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradient_at_exact_zeros_is_zero_for_p_below_one(device, backend):
    """p < 1: the reference's autograd gives NaN at x = 0 (0·∞); the kernels give 0 there and the
    reference's value everywhere else."""
    x = features((2, 4, 3, 5), torch.float32, "contiguous", device, 0.5, seed=6)
    x = torch.where(x.abs() < 0.2, torch.zeros_like(x), x)  # a ReLU-like map with exact zeros
    zeros = x == 0
    assert zeros.any()
    xs = x.detach().requires_grad_(True)
    t = features((2, 4, 3, 5), torch.float32, "contiguous", device, 0.5, seed=7)
    (grad,) = torch.autograd.grad(kdops.attention_loss(xs, t, 0.5, backend=backend), xs)
    x64 = x.detach().double().cpu().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(ref.attention_loss(x64, t.double().cpu(), 0.5), x64)
    assert torch.isnan(grad_ref[zeros.cpu()]).all()
    assert torch.equal(grad[zeros], torch.zeros_like(grad[zeros]))
    assert relative_error(grad[~zeros], grad_ref[~zeros.cpu()]) <= 1e-5


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_map_reuse_equals_attention_loss(device, backend):
    """attention_map(norm="none") + attention_map_distance gives attention_loss (the MAD chain)."""
    s = features((2, 4, 8, 6), torch.float32, "contiguous", device, seed=8)
    t = features((2, 5, 4, 3), torch.float32, "contiguous", device, seed=9)
    for norm in NORMS:
        direct = kdops.attention_loss(s, t, 2.0, "sum", norm, backend=backend)
        raw_s = kdops.attention_map(s, 2.0, "sum", "none", backend=backend)
        raw_t = kdops.attention_map(t, 2.0, "sum", "none", backend=backend)
        # Two float32 evaluations of one formula (the C++ backends fuse the loss into one op).
        assert relative_error(attention_map_distance(raw_s, raw_t, norm), direct) <= 1e-5


# ---------------------------------------------------------------------------------------------
# class_attention_map / class_attention_loss


def class_weights(k, c_s, c_t, with_bias, seed=10):
    g = torch.Generator().manual_seed(seed)
    w_s = torch.randn(k, c_s, generator=g) / c_s**0.5
    w_t = torch.randn(k, c_t, generator=g) / c_t**0.5
    b_s = 0.1 * torch.randn(k, generator=g) if with_bias else None
    b_t = 0.1 * torch.randn(k, generator=g) if with_bias else None
    return w_s, w_t, b_s, b_t


def check_class_loss(backend, s, t, w_s, w_t, b_s, b_t, norm, loss_tol, grad_tol):
    leaves = [v.detach().requires_grad_(True) for v in (s, t, w_s)]
    if b_s is not None:
        leaves.append(b_s.detach().requires_grad_(True))
    loss = kdops.class_attention_loss(leaves[0], leaves[1], leaves[2], w_t, leaves[3] if b_s is not None else None,
                                      b_t, norm, backend=backend)
    leaves64 = [v.detach().double().cpu().requires_grad_(True) for v in leaves]
    expected = ref.class_attention_loss(
        leaves64[0], leaves64[1], leaves64[2], w_t.double().cpu(),
        leaves64[3] if b_s is not None else None, None if b_t is None else b_t.double().cpu(), norm)
    assert loss.dim() == 0 and loss.dtype == torch.float32 or s.dtype == torch.float64
    assert relative_error(loss, expected) <= loss_tol, (loss.item(), expected.item())
    scale = GRAD_SCALE[s.dtype]
    grads = torch.autograd.grad(loss * scale, leaves)
    grads_ref = torch.autograd.grad(expected * scale, leaves64)
    for name, leaf, grad, grad_ref in zip(("student", "teacher", "student_weight", "student_bias"),
                                          leaves, grads, grads_ref):
        assert grad.dtype == leaf.dtype
        assert_grad_close(grad, grad_ref, grad_tol, name)


@pytest.mark.parametrize("device,backend", CLASS_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("k", [1, 5], ids=["K1", "K5"])
def test_class_attention_loss_matches_reference(device, backend, dtype, loss_tol, grad_tol, with_bias, k):
    w_s, w_t, b_s, b_t = class_weights(k, 6, 4, with_bias)
    for layout in LAYOUTS:
        for norm in ("l2", "softmax", "none"):
            s = features((2, 6, 5, 7), dtype, layout, device, seed=11)
            t = features((2, 4, 5, 7), dtype, layout, device, seed=12)
            check_class_loss(backend, s, t, w_s.to(device), w_t.to(device),
                             None if b_s is None else b_s.to(device), None if b_t is None else b_t.to(device),
                             norm, loss_tol, grad_tol)


@pytest.mark.parametrize("device,backend", CLASS_BACKENDS)
def test_class_attention_many_classes(device, backend):
    """K = 150 (ADE20K) crosses several class blocks."""
    w_s, w_t, b_s, b_t = class_weights(150, 20, 18, True)
    s = features((1, 20, 3, 7), torch.float32, "contiguous", device, seed=13)
    t = features((1, 18, 3, 7), torch.float32, "channels_last", device, seed=14)
    check_class_loss(backend, s, t, w_s.to(device), w_t.to(device), b_s.to(device), b_t.to(device),
                     "l2", 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", CLASS_BACKENDS)
def test_class_attention_all_negative(device, backend):
    """A class whose pre-activations are all negative: its l2 map is 0 (no NaN) with zero gradient,
    its softmax map uniform."""
    x = features((2, 4, 3, 5), torch.float32, "contiguous", device, seed=15).abs()
    weight = torch.stack([-torch.ones(4), torch.linspace(-1, 1, 4)]).to(device)  # class 0: < 0 everywhere
    bias = torch.tensor([-0.5, 0.0], device=device)
    xs = x.detach().requires_grad_(True)
    maps = kdops.class_attention_map(xs, weight, bias, "l2", backend=backend)
    assert torch.equal(maps[:, 0], torch.zeros_like(maps[:, 0]))
    assert torch.isfinite(maps).all()
    uniform = kdops.class_attention_map(x, weight, bias, "softmax", backend=backend)[:, 0]
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 15), rtol=0, atol=1e-7)
    (grad,) = torch.autograd.grad(maps[:, 0].sum() + 0 * maps.sum(), xs)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device,backend", CLASS_BACKENDS)
def test_class_attention_map_matches_reference(device, backend):
    x = features((2, 6, 5, 7), torch.float32, "channels_last", device, seed=16)
    w_s, _, b_s, _ = class_weights(3, 6, 6, True)
    for norm in ("l2", "softmax", "none"):
        out = kdops.class_attention_map(x, w_s.to(device), b_s.to(device), norm, backend=backend)
        expected = ref.class_attention_map(x.double().cpu(), w_s.double(), b_s.double(), norm)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7)
        assert relative_error(out, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Memory, determinism, registration


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention_loss", "class_attention_loss"])
def test_saves_only_inputs_and_maps(device, backend, op):
    """Saved for backward: the inputs and map-sized tensors, nothing of a feature's size."""
    s = features((2, 16, 6, 8), torch.float32, "contiguous", device, seed=17).requires_grad_(True)
    t = features((2, 16, 6, 8), torch.float32, "contiguous", device, seed=18).requires_grad_(True)
    w_s, w_t, _, _ = class_weights(3, 16, 16, False)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        if op == "attention_loss":
            loss = kdops.attention_loss(s, t, backend=backend)
        else:
            loss = kdops.class_attention_loss(s, t, w_s.to(device), w_t.to(device), backend=backend)
    loss.backward()
    assert saved, "nothing saved for backward"
    map_numel = 2 * 6 * 8 * (3 if op == "class_attention_loss" else 1)
    inputs = {s.data_ptr(), t.data_ptr()}
    for x in saved:
        is_input = x.data_ptr() in inputs and x.shape == s.shape
        assert is_input or x.numel() <= map_numel or x.shape == w_s.shape, (
            f"saved a tensor of shape {tuple(x.shape)}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    s = features((2, 9, 7, 5), torch.float32, "contiguous", device, seed=19)
    t = features((2, 9, 7, 5), torch.float32, "contiguous", device, seed=20)
    w_s, w_t, b_s, b_t = class_weights(4, 9, 9, True)
    w_s, w_t, b_s, b_t = (v.to(device) for v in (w_s, w_t, b_s, b_t))
    results = []
    for _ in range(2):
        a = s.detach().requires_grad_(True)
        losses = (kdops.attention_loss(a, t, 1.5, backend=backend),
                  kdops.class_attention_loss(a, t, w_s, w_t, b_s, b_t, backend=backend))
        results.append(losses + torch.autograd.grad(sum(losses), a))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
def test_same_result_for_any_thread_count(device, backend):
    s = features((3, 40, 33, 65), torch.float32, "contiguous", device, seed=21)
    t = features((3, 40, 33, 65), torch.float32, "channels_last", device, seed=22)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            a = s.detach().requires_grad_(True)
            b = t.detach().requires_grad_(True)
            loss = kdops.attention_loss(a, b, 3.0, backend=backend)
            results.append((loss,) + torch.autograd.grad(loss, (a, b)))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("shape", [(1, 3, 70, 90), (2, 37, 3, 5), (64, 5, 2, 3)],
                         ids=["long-rows", "C37", "many-images"])
def test_cpu_large_shapes(device, backend, shape):
    """Rows longer than one map chunk, channel counts that are not a multiple of the unroll or the
    SIMD width, many images."""
    for layout in LAYOUTS:
        s = features(shape, torch.float32, layout, device, 2.0, seed=23)
        t = features(shape, torch.float32, layout, device, 2.0, seed=24)
        for p in (2.0, 0.5):
            check_loss(backend, s, t, p, "sum", "softmax", None, 1e-5, 1e-5)


GPU_BACKENDS = [p for p in BACKENDS if p.values[0] == "cuda"]
GPU_CLASS_BACKENDS = [p for p in CLASS_BACKENDS if p.values[0] == "cuda"]


@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 40, 48, 80), (1, 1100, 3, 5)], ids=["rows-3840", "C1100"])
def test_gpu_long_rows(device, backend, shape):
    """Rows of the unit-stride dim longer than the CUDA backward's 1024-element stretch: channel rows
    of 3840 positions (contiguous) and pixels of 1100 channels (channels_last). The loss is kept
    well conditioned at these lengths so that 1e-5 measures the reductions' tiling, not float32
    round-off: norm="none" (a softmax's float32 normaliser over 3840 positions alone moves the
    loss by 2e-5) and a teacher twice the student's scale (maps that differ by their own size,
    where two maps of one scale differ by ~10 %, which amplifies their round-off tenfold)."""
    for layout in LAYOUTS:
        s = features(shape, torch.float32, layout, device, 2.0, seed=31)
        t = 2 * features(shape, torch.float32, layout, device, 2.0, seed=32)
        for p in (2.0, 0.5):
            check_loss(backend, s, t, p, "sum", "none", None, 1e-5, 1e-5)


@pytest.mark.parametrize("device,backend", GPU_CLASS_BACKENDS)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", [row for row in TOLERANCES if row.id in ("fp32", "bf16")])
@pytest.mark.parametrize("k,c", [(19, 96), (150, 20)], ids=["K19", "K150"])
def test_gpu_class_weight_gradient_over_long_maps(device, backend, dtype, loss_tol, grad_tol, k, c):
    """The weight gradient sums over H·W = 2560 positions per image: cuBLAS for float32 features;
    for 16-bit ones the CUDA kernel splits that inner dimension into chunks (few K×C output tiles)
    whose partial products are summed after."""
    w_s, w_t, b_s, b_t = class_weights(k, c, c, True, seed=33)
    for layout in ("contiguous", "channels_last"):
        s = features((2, c, 40, 64), dtype, layout, device, seed=34)
        t = features((2, c, 40, 64), dtype, layout, device, seed=35)
        check_class_loss(backend, s, t, w_s.to(device), w_t.to(device), b_s.to(device),
                         b_t.to(device), "l2", loss_tol, grad_tol)


def _opcheck_cases(namespace, device, layout):
    x = features((2, 3, 5, 7), torch.float32, layout, device, seed=25)
    weight = torch.randn(4, 3, device=device)
    bias = torch.randn(4, device=device)
    x_grad = x.detach().requires_grad_(True)
    w_grad = weight.detach().requires_grad_(True)
    b_grad = bias.detach().requires_grad_(True)
    grad_map = torch.randn(2, 5, 7, device=device)
    maps = namespace.class_attention_scores(x, weight, bias)
    grad_maps = torch.randn(2, 4, 5, 7, device=device)
    cases = [
        (namespace.attention_reduce.default, (x_grad, 2.0, False)),
        (namespace.attention_reduce.default, (x_grad, 0.5, True)),
        (namespace.attention_reduce_backward.default, (grad_map, x, 3.0, True)),
        (namespace.class_attention_scores.default, (x_grad, w_grad, b_grad)),
        (namespace.class_attention_scores.default, (x_grad, w_grad, None)),
    ]
    for flags in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        cases.append((namespace.class_attention_scores_backward.default, (grad_maps, maps, x, weight, *flags)))
    return cases


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, backend, layout):
    for op, args in _opcheck_cases(ops(backend), device, layout):
        torch.library.opcheck(op, args)


EXTENSION_BACKENDS = [p for p in BACKENDS if p.id in ("cpu-cpu", "cuda-cuda")]


@pytest.mark.parametrize("device,backend", EXTENSION_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_fused_attention_loss(device, backend, layout):
    """kdops::attention_loss: the whole loss as one op (the C++ CPU and CUDA kernels)."""
    s = features((2, 3, 5, 7), torch.float32, layout, device, seed=28)
    t = features((2, 4, 3, 4), torch.float32, layout, device, seed=29)
    s_grad, t_grad = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
    namespace = torch.ops.kdops
    cases = []
    for norm, size in [("softmax", None), ("l2", [4, 6]), ("none", [5, 7])]:
        cases.append((namespace.attention_loss.default, (s_grad, t_grad, 2.0, False, norm, size)))
        _, s_map, t_map = namespace.attention_loss(s, t, 0.5, True, norm, size)
        for flags in [(True, True), (True, False), (False, True)]:
            cases.append((namespace.attention_loss_backward.default,
                          (torch.tensor(1.5, device=device), s, t, s_map, t_map, 0.5, True, norm, *flags)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", CPU_ONLY)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_fused_class_attention_loss(device, backend, layout):
    """kdops::class_attention_loss: the whole CAMD loss as one op (the C++ CPU kernels)."""
    s = features((2, 3, 5, 7), torch.float32, layout, device, seed=30)
    t = features((2, 4, 5, 7), torch.float32, layout, device, seed=31)
    w_s, w_t, b_s, b_t = class_weights(3, 3, 4, True)
    leaves = [v.detach().requires_grad_(True) for v in (s, t, w_s, w_t, b_s, b_t)]
    namespace = torch.ops.kdops
    cases = []
    for norm in NORMS:
        cases.append((namespace.class_attention_loss.default, (*leaves, norm)))
        cases.append((namespace.class_attention_loss.default, (leaves[0], t, leaves[2], w_t, None, None, norm)))
        _, maps_s, maps_t = namespace.class_attention_loss(s, t, w_s, w_t, b_s, b_t, norm)
        for mask in ([1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 1, 0]):
            cases.append((namespace.class_attention_loss_backward.default,
                          (torch.tensor(0.7), s, t, w_s, w_t, maps_s, maps_t, norm, mask)))
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", EXTENSION_BACKENDS)
def test_fused_attention_loss_rejects_bad_input(device, backend):
    s = torch.randn(2, 3, 4, 5, device=device)
    with pytest.raises((ValueError, RuntimeError), match="norm must be"):
        torch.ops.kdops.attention_loss(s, s, 2.0, False, "max", None)
    with pytest.raises((ValueError, RuntimeError), match="size must be"):
        torch.ops.kdops.attention_loss(s, s, 2.0, False, "l2", [0, 3])
    with pytest.raises((ValueError, RuntimeError), match="batch size"):
        torch.ops.kdops.attention_loss(s, s[:1], 2.0, False, "l2", None)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention_loss", "class_attention_loss"])
def test_compile_fullgraph(device, backend, op):
    from torch._dynamo.testing import CompileCounter

    s = features((2, 3, 5, 7), torch.float32, "contiguous", device, seed=26)
    t = features((2, 3, 4, 6), torch.float32, "contiguous", device, seed=27)
    w_s, w_t, b_s, _ = class_weights(4, 3, 3, True)
    w_s, w_t, b_s = w_s.to(device), w_t.to(device), b_s.to(device)

    def loss_fn(a, b):
        if op == "attention_loss":
            return kdops.attention_loss(a, b, 2.0, "mean", "l2", backend=backend)
        return kdops.class_attention_loss(a, b[..., :5, :7].contiguous() if b.shape[-1] >= 7 else
                                          torch.nn.functional.pad(b, (0, 1, 0, 1)), w_s, w_t, b_s, None,
                                          backend=backend)

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
def test_gradcheck_float64(device, backend):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for p in (1.0, 2.0, 3.0, 0.5):
        assert torch.autograd.gradcheck(lambda a: ops(backend).attention_reduce(a, p, True), (x,))
    assert torch.autograd.gradcheck(
        lambda a, c: kdops.attention_loss(a, c, 1.5, "sum", "softmax", backend=backend), (x, t))
    assert torch.autograd.gradcheck(
        lambda a, c: kdops.attention_loss(a, c, 2.0, "mean", "l2", (3, 4), backend=backend), (x, t))
    assert torch.autograd.gradcheck(
        lambda a, c: kdops.attention_loss(a, c, 3.0, "sum", "none", (5, 7), backend=backend), (x, t))
    assert torch.autograd.gradcheck(lambda a, ww, bb: ops(backend).class_attention_scores(a, ww, bb), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda a, ww, bb: kdops.class_attention_map(a, ww, bb, "l2", backend=backend), (x, w, b))
    t_same = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    w_t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for norm in ("l2", "softmax", "none"):
        assert torch.autograd.gradcheck(
            lambda a, c, ww, wt, bb: kdops.class_attention_loss(a, c, ww, wt, bb, None, norm, backend=backend),
            (x, t_same, w, w_t, b))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_kernel_ops_reject_bad_input(device, backend):
    namespace = ops(backend)
    x = torch.randn(2, 3, 4, 5, device=device)
    with pytest.raises((ValueError, RuntimeError), match="p must be finite"):
        namespace.attention_reduce(x, -1.0, False)
    with pytest.raises((ValueError, RuntimeError), match="x must have shape"):
        namespace.attention_reduce(x[0, 0], 2.0, False)
    with pytest.raises((ValueError, RuntimeError), match="grad_map"):
        namespace.attention_reduce_backward(torch.randn(2, 4, 4, device=device), x, 2.0, False)
    with pytest.raises((ValueError, RuntimeError), match="weight must have shape"):
        namespace.class_attention_scores(x, torch.randn(4, 2, device=device), None)
    with pytest.raises((ValueError, RuntimeError), match="bias must have shape"):
        namespace.class_attention_scores(x, torch.randn(4, 3, device=device), torch.randn(3, device=device))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_single_position_l2_maps_give_exactly_zero(device, backend):
    """Found by the fuzz suite: 1×1 maps normalise to exactly 1, so two of them differ by exactly
    0 (the CPU kernels once multiplied by 1/‖S‖ and left (1 − 2⁻⁵³)² behind)."""
    s = torch.tensor([[[[0.37]], [[-1.3]]]], dtype=torch.float64, device=device)
    t = torch.tensor([[[[2.9]]]], dtype=torch.float64, device=device)
    for dtype in _exact_dtypes(backend):
        loss = kdops.attention_loss(s.to(dtype), t.to(dtype), 1.0, "sum", "l2", backend=backend)
        assert loss.item() == 0.0, (dtype, loss.item())


@pytest.mark.parametrize("device,backend", CLASS_BACKENDS)
def test_class_maps_with_one_positive_position_give_exactly_zero(device, backend):
    """Found by the fuzz suite (float64): each class map keeps one position after the ReLU, so
    both sides normalise to the same one-hot maps and the loss is exactly 0."""
    s = torch.tensor([[[[-4.38e-05, 8.6214e-04]]]], dtype=torch.float64, device=device)
    t = torch.tensor([[[[-1.0, 3.0]]]], dtype=torch.float64, device=device)
    w = torch.ones(1, 1, dtype=torch.float64, device=device)
    for dtype in _exact_dtypes(backend):
        loss = kdops.class_attention_loss(s.to(dtype), t.to(dtype), w, w, None, None, "l2", backend=backend)
        assert loss.item() == 0.0, (dtype, loss.item())


def _exact_dtypes(backend):
    return (torch.float32,) if backend == "triton" else (torch.float32, torch.float64)
