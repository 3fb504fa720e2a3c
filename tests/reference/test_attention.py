"""The reference attention maps against slow loop formulations, hand values and gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdops.reference import attention as ref
from tests.utils import LAYOUTS, make_layout, relative_error

# Reference in float32 against the float64 loops; float64 reference against the loops.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ---------------------------------------------------------------- slow formulations ----------


def slow_normalize(values: list[float], norm: str) -> list[float]:
    if norm == "softmax":
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        return [e / total for e in exps]
    if norm == "l2":
        length = math.sqrt(sum(v * v for v in values))
        return [v / max(length, 1e-12) for v in values]
    assert norm == "none"
    return list(values)


def slow_source_index(out_index: int, in_size: int, out_size: int) -> tuple[int, int, float]:
    """Bilinear, align_corners=False: the two source indices and the weight of the second."""
    source = max((out_index + 0.5) * in_size / out_size - 0.5, 0.0)
    low = int(math.floor(source))
    high = min(low + 1, in_size - 1)
    return low, high, source - low


def slow_bilinear(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    in_h, in_w = len(grid), len(grid[0])
    out = []
    for i in range(out_h):
        i0, i1, di = slow_source_index(i, in_h, out_h)
        row = []
        for j in range(out_w):
            j0, j1, dj = slow_source_index(j, in_w, out_w)
            top = (1 - dj) * grid[i0][j0] + dj * grid[i0][j1]
            bottom = (1 - dj) * grid[i1][j0] + dj * grid[i1][j1]
            row.append((1 - di) * top + di * bottom)
        out.append(row)
    return out


def slow_attention_map(x, p, reduce, norm, size) -> torch.Tensor:
    """(N, H', W') float64, one pixel and one channel at a time."""
    values = x.double().tolist()
    batch, channels, h, w = x.shape
    out_h, out_w = (h, w) if size is None else size
    maps = []
    for n in range(batch):
        grid = []
        for i in range(h):
            row = []
            for j in range(w):
                total = 0.0
                for c in range(channels):
                    total += abs(values[n][c][i][j]) ** p
                row.append(total / channels if reduce == "mean" else total)
            grid.append(row)
        if (out_h, out_w) != (h, w):
            grid = slow_bilinear(grid, out_h, out_w)
        flat = slow_normalize([v for row in grid for v in row], norm)
        maps.append([flat[i * out_w:(i + 1) * out_w] for i in range(out_h)])
    return torch.tensor(maps, dtype=torch.float64)


def slow_attention_loss(student, teacher, p, reduce, norm, size) -> float:
    if size is None:
        size = tuple(student.shape[2:])
    student_map = slow_attention_map(student, p, reduce, norm, size).tolist()
    teacher_map = slow_attention_map(teacher, p, reduce, norm, size).tolist()
    total, count = 0.0, 0
    for n in range(len(student_map)):
        for i in range(size[0]):
            for j in range(size[1]):
                total += (student_map[n][i][j] - teacher_map[n][i][j]) ** 2
                count += 1
    return total / count


def slow_class_attention_map(x, weight, bias, norm) -> torch.Tensor:
    """(N, K, H, W) float64, one class, pixel and channel at a time."""
    values = x.double().tolist()
    weights = weight.double().tolist()
    biases = None if bias is None else bias.double().tolist()
    batch, channels, h, w = x.shape
    maps = []
    for n in range(batch):
        per_class = []
        for k in range(len(weights)):
            flat = []
            for i in range(h):
                for j in range(w):
                    score = 0.0 if biases is None else biases[k]
                    for c in range(channels):
                        score += weights[k][c] * values[n][c][i][j]
                    flat.append(max(score, 0.0))
            flat = slow_normalize(flat, norm)
            per_class.append([flat[i * w:(i + 1) * w] for i in range(h)])
        maps.append(per_class)
    return torch.tensor(maps, dtype=torch.float64)


def slow_class_attention_loss(student, teacher, student_weight, teacher_weight,
                              student_bias, teacher_bias, norm) -> float:
    student_maps = slow_class_attention_map(student, student_weight, student_bias, norm)
    teacher_maps = slow_class_attention_map(teacher, teacher_weight, teacher_bias, norm)
    diffs = (student_maps - teacher_maps).flatten().tolist()
    return sum(d * d for d in diffs) / len(diffs)


def randn(*shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------ attention_map -------------

SHAPES = {
    "odd-5x7": (2, 3, 5, 7),
    "N1": (1, 4, 6, 6),
    "C1": (2, 1, 5, 7),
    "H1": (2, 3, 1, 7),
    "W1": (2, 3, 5, 1),
    "all-1": (1, 1, 1, 1),
}
# A (1, 1, 1, 1) tensor is contiguous whatever its strides: no "strided" case for it.
SHAPE_LAYOUTS = [
    pytest.param(shape, layout, id=f"{name}-{layout}")
    for name, shape in SHAPES.items()
    for layout in LAYOUTS
    if not (name == "all-1" and layout == "strided")
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", SHAPE_LAYOUTS)
def test_attention_map_matches_loops_over_shapes_and_layouts(shape, layout, dtype):
    x = make_layout(randn(*shape, dtype=dtype), layout)
    out = ref.attention_map(x, 2.0, "sum", "softmax", None)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2], shape[3])
    assert relative_error(out, slow_attention_map(x, 2.0, "sum", "softmax", None)) <= RTOL[dtype]


MAP_OPTIONS = [
    pytest.param(1.0, "sum", "softmax", None, id="p1-sum-softmax"),
    pytest.param(1.5, "mean", "l2", None, id="p1.5-mean-l2"),
    pytest.param(3.0, "sum", "none", None, id="p3-sum-none"),
    pytest.param(0.5, "mean", "softmax", None, id="p0.5-mean-softmax"),
    pytest.param(2.0, "mean", "l2", None, id="AT-mean-l2"),
    pytest.param(2.0, "sum", "softmax", (5, 7), id="size-same"),
    pytest.param(2.0, "sum", "softmax", (3, 4), id="size-down"),
    pytest.param(2.0, "sum", "none", (8, 11), id="size-up-none"),
    pytest.param(2.0, "mean", "l2", (9, 3), id="size-mixed-l2"),
    pytest.param(1.0, "sum", "softmax", (1, 1), id="size-1x1"),
    pytest.param(2.0, "sum", "l2", (10, 14), id="size-double"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p, reduce, norm, size", MAP_OPTIONS)
def test_attention_map_matches_loops_over_options(p, reduce, norm, size, dtype):
    x = make_layout(randn(2, 3, 5, 7, dtype=dtype, seed=1), "channels_last")
    out = ref.attention_map(x, p, reduce, norm, size)
    expected = slow_attention_map(x, p, reduce, norm, size)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16"),
])
def test_attention_map_16bit_accumulates_in_float32(dtype):
    x = randn(2, 5, 5, 7, seed=2).to(dtype).requires_grad_()
    out = ref.attention_map(x, 2.0, "sum", "l2", (4, 6))
    assert out.dtype == torch.float32
    # The loops read the same rounded values: only the float32 arithmetic differs.
    assert relative_error(out, slow_attention_map(x.detach(), 2.0, "sum", "l2", (4, 6))) <= 1e-5
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert grad.dtype == dtype


def test_attention_map_hand_values():
    # x: channel 0 = [1, 3], channel 1 = [-1, 1]; p=2, mean: a = [(1+1)/2, (9+1)/2] = [1, 5].
    x = torch.tensor([[[[1.0, 3.0]], [[-1.0, 1.0]]]])
    assert ref.attention_map(x, 2.0, "mean", "none", None).tolist() == [[[1.0, 5.0]]]
    # softmax([1, 5]) = [1/(1+e^4), e^4/(1+e^4)]
    softmax = ref.attention_map(x, 2.0, "mean", "softmax", None)
    torch.testing.assert_close(softmax, torch.tensor([[[0.01798620996209156, 0.9820137900379085]]]))
    # p=1, sum: a = [1+1, 3+1] = [2, 4]; l2: [2, 4]/sqrt(20) = [1/sqrt(5), 2/sqrt(5)]
    l2 = ref.attention_map(x, 1.0, "sum", "l2", None)
    torch.testing.assert_close(l2, torch.tensor([[[0.4472135954999579, 0.8944271909999159]]]))


def test_attention_map_hand_resize():
    # a = [0, 2²] = [0, 4] on a 1x2 grid, resized to 1x4: source columns (o + 0.5)/2 − 0.5 =
    # -0.25 (clamped to 0), 0.25, 0.75, 1.25 (both neighbours are column 1) -> [0, 1, 3, 4].
    x = torch.tensor([[[[0.0, 2.0]]]])
    out = ref.attention_map(x, 2.0, "sum", "none", (1, 4))
    assert out.tolist() == [[[0.0, 1.0, 3.0, 4.0]]]


@pytest.mark.parametrize("p", [pytest.param(1.0, id="p1"), pytest.param(2.0, id="p2"),
                               pytest.param(1.5, id="p1.5")])
def test_attention_map_of_zeros(p):
    x = torch.zeros(2, 3, 4, 5, requires_grad=True)
    l2 = ref.attention_map(x, p, "sum", "l2", None)
    assert torch.equal(l2, torch.zeros(2, 4, 5))
    (grad,) = torch.autograd.grad(l2.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    softmax = ref.attention_map(x, p, "sum", "softmax", (3, 3))
    assert torch.equal(softmax, torch.full((2, 3, 3), 1 / 9))


GRADCHECK_MAPS = [
    pytest.param(2.0, "sum", "softmax", None, id="p2-sum-softmax"),
    pytest.param(1.5, "mean", "l2", (3, 4), id="p1.5-mean-l2-down"),
    pytest.param(3.0, "sum", "none", (6, 9), id="p3-sum-none-up"),
    pytest.param(1.0, "sum", "softmax", (5, 5), id="p1-sum-softmax-resize"),
    pytest.param(0.5, "mean", "l2", None, id="p0.5-mean-l2"),
]


@pytest.mark.parametrize("p, reduce, norm, size", GRADCHECK_MAPS)
def test_attention_map_gradcheck(p, reduce, norm, size):
    x = randn(2, 3, 4, 5, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ref.attention_map(t, p, reduce, norm, size), (x,))


# ----------------------------------------------------------------- attention_loss -------------

LOSS_CASES = [
    pytest.param((2, 3, 5, 7), (2, 6, 5, 7), "contiguous", None, id="same-size-other-C"),
    pytest.param((2, 3, 8, 6), (2, 5, 4, 3), "contiguous", None, id="teacher-smaller"),
    pytest.param((1, 4, 3, 5), (1, 2, 7, 9), "channels_last", None, id="teacher-larger-N1"),
    pytest.param((2, 3, 5, 7), (2, 3, 6, 4), "strided", (4, 5), id="explicit-size"),
    pytest.param((2, 1, 1, 7), (2, 1, 1, 7), "channels_last", None, id="C1-H1"),
]
LOSS_OPTIONS = [
    pytest.param(2.0, "sum", "softmax", id="SAD"),
    pytest.param(2.0, "mean", "l2", id="AT"),
    pytest.param(1.5, "sum", "none", id="p1.5-none"),
]


@pytest.mark.parametrize("p, reduce, norm", LOSS_OPTIONS)
@pytest.mark.parametrize("student_shape, teacher_shape, layout, size", LOSS_CASES)
def test_attention_loss_matches_loops(student_shape, teacher_shape, layout, size, p, reduce, norm):
    student = make_layout(randn(*student_shape, dtype=torch.float32, seed=4), layout)
    teacher = make_layout(randn(*teacher_shape, dtype=torch.float32, seed=5), layout)
    loss = ref.attention_loss(student, teacher, p, reduce, norm, size)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expected = slow_attention_loss(student, teacher, p, reduce, norm, size)
    assert relative_error(loss, torch.tensor(expected)) <= 1e-5


def zagoruyko_at_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer as in Zagoruyko & Komodakis's code (utils.py: at, at_loss)."""
    def at(x):
        return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))
    return (at(student) - at(teacher)).pow(2).mean()


@pytest.mark.parametrize("dtype, rtol", [
    pytest.param(torch.float64, 1e-12, id="fp64"), pytest.param(torch.float32, 1e-5, id="fp32"),
])
def test_attention_loss_is_attention_transfer(dtype, rtol):
    student = randn(3, 4, 6, 5, dtype=dtype, seed=6)
    teacher = randn(3, 9, 6, 5, dtype=dtype, seed=7)
    loss = ref.attention_loss(student, teacher, 2.0, "mean", "l2", None)
    assert relative_error(loss, zagoruyko_at_loss(student.double(), teacher.double())) <= rtol


def test_attention_loss_hand_value():
    # student [1, 2]: p=2 -> [1, 4]; teacher channels [1, 1], [1, 0] -> [2, 1];
    # differences [-1, 3] -> (1 + 9) / 2 = 5.
    student = torch.tensor([[[[1.0, 2.0]]]])
    teacher = torch.tensor([[[[1.0, 1.0]], [[1.0, 0.0]]]])
    assert ref.attention_loss(student, teacher, 2.0, "sum", "none", None).item() == 5.0


def test_attention_loss_gradcheck():
    student = randn(2, 3, 6, 5, seed=8).requires_grad_()
    teacher = randn(2, 4, 3, 4, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: ref.attention_loss(s, t, 2.0, "sum", "softmax", None), (student, teacher)
    )
    assert torch.autograd.gradcheck(
        lambda s, t: ref.attention_loss(s, t, 1.5, "mean", "l2", (4, 4)), (student, teacher)
    )


# ------------------------------------------------------------- class_attention_map ------------

CLASS_CASES = [
    pytest.param((2, 3, 5, 7), 4, "contiguous", id="odd-5x7"),
    pytest.param((1, 3, 5, 7), 2, "channels_last", id="N1-channels_last"),
    pytest.param((2, 1, 5, 7), 3, "strided", id="C1-strided"),
    pytest.param((2, 3, 1, 7), 1, "channels_last", id="H1-K1"),
    pytest.param((2, 4, 5, 1), 3, "contiguous", id="W1"),
]
CLASS_NORMS = [pytest.param(norm, id=norm) for norm in ("l2", "softmax", "none")]


@pytest.mark.parametrize("with_bias", [pytest.param(False, id="no-bias"),
                                       pytest.param(True, id="bias")])
@pytest.mark.parametrize("norm", CLASS_NORMS)
@pytest.mark.parametrize("shape, num_classes, layout", CLASS_CASES)
def test_class_attention_map_matches_loops(shape, num_classes, layout, norm, with_bias):
    x = make_layout(randn(*shape, dtype=torch.float32, seed=10), layout)
    weight = randn(num_classes, shape[1], dtype=torch.float32, seed=11)
    bias = randn(num_classes, dtype=torch.float32, seed=12) if with_bias else None
    out = ref.class_attention_map(x, weight, bias, norm)
    assert out.dtype == torch.float32
    assert out.shape == (shape[0], num_classes, shape[2], shape[3])
    assert relative_error(out, slow_class_attention_map(x, weight, bias, norm)) <= 1e-5


def test_class_attention_map_dtypes():
    x16 = randn(2, 3, 4, 5, seed=13).half().requires_grad_()
    weight = randn(2, 3, seed=14).float().requires_grad_()
    out = ref.class_attention_map(x16, weight, None, "l2")
    assert out.dtype == torch.float32
    assert relative_error(out, slow_class_attention_map(x16.detach(), weight.detach(), None, "l2")) <= 1e-5
    grad_x, grad_weight = torch.autograd.grad(out.square().sum() + out.sum(), (x16, weight))
    assert grad_x.dtype == torch.float16 and grad_weight.dtype == torch.float32
    x64 = randn(2, 3, 4, 5, seed=13)
    assert ref.class_attention_map(x64, weight.detach(), None, "l2").dtype == torch.float64


def test_class_attention_map_hand_values():
    # x channels [1, 2] and [2, 2]; class 0 weights [1, 1] -> [3, 4]; class 1 weights [2, -1]
    # with bias -1 -> [2-2-1, 4-2-1] = [-1, 1] -> ReLU [0, 1].
    x = torch.tensor([[[[1.0, 2.0]], [[2.0, 2.0]]]])
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    bias = torch.tensor([0.0, -1.0])
    assert ref.class_attention_map(x, weight, bias, "none").tolist() == [[[[3.0, 4.0]], [[0.0, 1.0]]]]
    # l2: [3, 4]/5 = [0.6, 0.8]; [0, 1]/1
    torch.testing.assert_close(
        ref.class_attention_map(x, weight, bias, "l2"), torch.tensor([[[[0.6, 0.8]], [[0.0, 1.0]]]])
    )
    # softmax([0, 1]) = [1/(1+e), e/(1+e)]
    torch.testing.assert_close(
        ref.class_attention_map(x, weight, bias, "softmax")[0, 1],
        torch.tensor([[0.2689414213699951, 0.7310585786300049]]),
    )


@pytest.mark.parametrize("pooling, cam_scale", [
    # score summed over pixels: ∂y_k/∂x[c, i] = w[k, c] at every pixel, so α = w (scale 1).
    pytest.param("sum", lambda h, w: 1.0, id="summed-score"),
    # score averaged over pixels (GAP classifier): α = w / (H·W), so M = ReLU(Σ_c H·W·α_c x_c).
    pytest.param("mean", lambda h, w: h * w, id="averaged-score"),
])
def test_class_attention_map_is_grad_cam(pooling, cam_scale):
    n, c, h, w, k = 2, 3, 5, 7, 4
    x = randn(n, c, h, w, seed=15).requires_grad_()
    classifier = randn(k, c, 1, 1, seed=16)
    scores = F.conv2d(x, classifier)  # (N, K, H, W): the classifier applied at every pixel
    grad_cam = torch.empty(n, k, h, w, dtype=torch.float64)
    for cls in range(k):
        class_score = scores[:, cls].sum(dim=(1, 2)) if pooling == "sum" else scores[:, cls].mean(dim=(1, 2))
        # Images are independent: the gradient of the batch sum is each image's own gradient.
        (grad,) = torch.autograd.grad(class_score.sum(), x, retain_graph=True)
        alpha = grad.mean(dim=(2, 3))  # (N, C): Grad-CAM's pooled gradients
        weighted = (alpha[:, :, None, None] * x.detach()).sum(dim=1)
        grad_cam[:, cls] = torch.relu(cam_scale(h, w) * weighted)
    out = ref.class_attention_map(x.detach(), classifier.flatten(1), None, "none")
    assert relative_error(out, grad_cam) <= 1e-12


def test_class_attention_map_all_zero_maps():
    # Positive features and negative weights: every score is < 0, every ReLU'd map is zero,
    # except class 1 whose positive weights keep it alive.
    x = randn(2, 3, 4, 5, seed=17).abs().add(0.1).requires_grad_()
    weight = torch.tensor([[-1.0, -2.0, -0.5], [1.0, 0.5, 2.0]], dtype=torch.float64,
                          requires_grad=True)
    bias = torch.tensor([-0.1, 0.0], dtype=torch.float64, requires_grad=True)
    l2 = ref.class_attention_map(x, weight, bias, "l2")
    assert torch.equal(l2[:, 0], torch.zeros(2, 4, 5, dtype=torch.float64))
    assert torch.allclose(l2[:, 1].square().sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))
    grads = torch.autograd.grad(l2[:, 0].sum(), (x, weight, bias))
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))
    softmax = ref.class_attention_map(x, weight, bias, "softmax")
    assert torch.equal(softmax[:, 0], torch.full((2, 4, 5), 1 / 20, dtype=torch.float64))


@pytest.mark.parametrize("norm", CLASS_NORMS)
def test_class_attention_map_gradcheck(norm):
    x = randn(2, 3, 4, 5, seed=18).requires_grad_()
    weight = randn(3, 3, seed=19).requires_grad_()
    bias = randn(3, seed=20).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: ref.class_attention_map(a, b, c, norm), (x, weight, bias)
    )


# ----------------------------------------------------------- class_attention_loss -------------

CLASS_LOSS_CASES = [
    pytest.param((2, 3, 5, 7), (2, 6, 5, 7), 4, "contiguous", True, id="odd-5x7-other-C-bias"),
    pytest.param((1, 2, 4, 3), (1, 5, 4, 3), 3, "channels_last", False, id="N1-channels_last"),
    pytest.param((2, 1, 1, 6), (2, 1, 1, 6), 1, "strided", True, id="C1-H1-K1-strided"),
]


@pytest.mark.parametrize("norm", CLASS_NORMS)
@pytest.mark.parametrize("student_shape, teacher_shape, num_classes, layout, with_bias",
                         CLASS_LOSS_CASES)
def test_class_attention_loss_matches_loops(student_shape, teacher_shape, num_classes, layout,
                                            with_bias, norm):
    student = make_layout(randn(*student_shape, dtype=torch.float32, seed=21), layout)
    teacher = make_layout(randn(*teacher_shape, dtype=torch.float32, seed=22), layout)
    student_weight = randn(num_classes, student_shape[1], dtype=torch.float32, seed=23)
    teacher_weight = randn(num_classes, teacher_shape[1], dtype=torch.float32, seed=24)
    student_bias = randn(num_classes, dtype=torch.float32, seed=25) if with_bias else None
    teacher_bias = randn(num_classes, dtype=torch.float32, seed=26) if with_bias else None
    args = (student, teacher, student_weight, teacher_weight, student_bias, teacher_bias, norm)
    loss = ref.class_attention_loss(*args)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert relative_error(loss, torch.tensor(slow_class_attention_loss(*args))) <= 1e-5


def test_class_attention_loss_hand_value():
    # student x = [1, 2] (C=1), weight [[1]] -> [1, 2]; teacher x = [3, -1] (C=1),
    # weight [[1]] -> ReLU [3, 0]; differences [-2, 2] -> (4 + 4) / 2 = 4.
    student = torch.tensor([[[[1.0, 2.0]]]])
    teacher = torch.tensor([[[[3.0, -1.0]]]])
    one = torch.ones(1, 1)
    assert ref.class_attention_loss(student, teacher, one, one, None, None, "none").item() == 4.0


def test_class_attention_loss_gradcheck():
    inputs = (
        randn(2, 3, 4, 5, seed=27), randn(2, 4, 4, 5, seed=28),
        randn(3, 3, seed=29), randn(3, 4, seed=30), randn(3, seed=31), randn(3, seed=32),
    )
    inputs = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(lambda *a: ref.class_attention_loss(*a, "l2"), inputs)
    assert torch.autograd.gradcheck(lambda *a: ref.class_attention_loss(*a, "softmax"), inputs)
