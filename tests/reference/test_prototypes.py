"""The reference prototype ops against slow loop formulations, hand values and gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdops.reference import prototypes as ref
from tests.utils import LAYOUTS, make_layout, relative_error

IGNORE = 255

# (dtype, rtol) of the reference on inputs of that dtype against the float64 loops on the same
# values: the reference accumulates 16/32-bit inputs in float32, float64 in float64.
DTYPES = [
    pytest.param(torch.float64, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-4, id="fp16"),
    pytest.param(torch.bfloat16, 1e-4, id="bf16"),
]

# (N, C_s, C_t, H, W, H_l, W_l, K): feature sizes, label-map size, number of classes.
SHAPES = {
    "odd-5x7": (2, 3, 4, 5, 7, 5, 7, 4),
    "labels-lower-res": (2, 3, 2, 6, 9, 3, 4, 3),
    "labels-higher-res": (2, 2, 3, 5, 7, 11, 16, 3),
    "N1-C1-1x1": (1, 1, 1, 1, 1, 1, 1, 2),
    "H1": (2, 3, 3, 1, 7, 1, 7, 3),
    "W1-labels-higher-res": (1, 2, 3, 5, 1, 10, 2, 3),
    "K1": (2, 3, 2, 4, 3, 4, 3, 1),
    "absent-classes": (2, 3, 2, 3, 4, 3, 4, 9),
}


def shape_and_layout_params():
    """SHAPES × LAYOUTS; "strided" (every other element of the last dim) needs W > 1 and W_l > 1."""
    return [
        pytest.param(*shape, layout, id=f"{name}-{layout}")
        for name, shape in SHAPES.items()
        for layout in LAYOUTS
        if layout != "strided" or (shape[4] > 1 and shape[6] > 1)
    ]


# ---------------------------------------------------------------- slow formulations ----------


def slow_source_index(out_index: int, in_size: int, out_size: int) -> int:
    """F.interpolate(mode="nearest"): floor(out_index · scale) in float32, scale = in/out."""
    if in_size == out_size:
        return out_index
    scale = np.float32(in_size) / np.float32(out_size)
    return min(int(np.floor(np.float32(out_index) * scale)), in_size - 1)


def slow_resize(labels: torch.Tensor, h: int, w: int) -> list:
    """(N, H_l, W_l) -> nested lists [n][i][j] of the nearest source label."""
    grid = labels.tolist()
    h_l, w_l = labels.shape[1:]
    rows = [slow_source_index(i, h_l, h) for i in range(h)]
    cols = [slow_source_index(j, w_l, w) for j in range(w)]
    return [[[image[i][j] for j in cols] for i in rows] for image in grid]


def slow_pool(x, labels, num_classes, ignore_index=IGNORE, per_image=True):
    """Sums and counts pixel by pixel in float64; mean = sum / count, 0 for an absent class."""
    n, c, h, w = x.shape
    values = x.double().tolist()
    grid = slow_resize(labels, h, w)
    sums = [[[0.0] * c for _ in range(num_classes)] for _ in range(n)]
    counts = [[0] * num_classes for _ in range(n)]
    for b in range(n):
        for i in range(h):
            for j in range(w):
                k = grid[b][i][j]
                if k == ignore_index:
                    continue
                counts[b][k] += 1
                for ch in range(c):
                    sums[b][k][ch] += values[b][ch][i][j]
    if not per_image:
        sums = [
            [[sum(sums[b][k][ch] for b in range(n)) for ch in range(c)] for k in range(num_classes)]
        ]
        counts = [[sum(counts[b][k] for b in range(n)) for k in range(num_classes)]]
    protos = [
        [[total / count if count else 0.0 for total in row] for row, count in zip(rows, image_counts)]
        for rows, image_counts in zip(sums, counts)
    ]
    protos, counts = torch.tensor(protos, dtype=torch.float64), torch.tensor(counts)
    return (protos, counts) if per_image else (protos[0], counts[0])


def slow_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(u * v for u, v in zip(a, b))
    norm_a = math.sqrt(sum(u * u for u in a))
    norm_b = math.sqrt(sum(v * v for v in b))
    return dot / (max(norm_a, 1e-12) * max(norm_b, 1e-12))


def slow_log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_total for v in values]


def slow_prototype_kl(s, t, s_protos, t_protos, counts, tau):
    """Pixel by pixel: cosines to the present classes' prototypes / τ, softmax, KL; mean over N·H·W."""
    n, _, h, w = s.shape
    s_values, t_values = s.double().tolist(), t.double().tolist()
    per_image = s_protos.dim() == 3
    total = 0.0
    for b in range(n):
        image_counts = (counts[b] if per_image else counts).tolist()
        ps = (s_protos[b] if per_image else s_protos).double().tolist()
        pt = (t_protos[b] if per_image else t_protos).double().tolist()
        present = [k for k, count in enumerate(image_counts) if count > 0]
        if not present:
            continue
        for i in range(h):
            for j in range(w):
                fs = [channel[i][j] for channel in s_values[b]]
                ft = [channel[i][j] for channel in t_values[b]]
                log_q = slow_log_softmax([slow_cosine(fs, ps[k]) / tau for k in present])
                log_p = slow_log_softmax([slow_cosine(ft, pt[k]) / tau for k in present])
                total += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / (n * h * w)


def slow_ifvd(s, t, labels, num_classes, ignore_index=IGNORE):
    """IFVD's CriterionIFV written with loops: a centre map that starts as the features
    themselves, each class's pixels overwritten with their class mean (per image), the cosine
    of each feature with its centre, and the MSE of the two cosine maps over all pixels.
    An ignored pixel keeps its own feature as centre: cosine 1 (features are nonzero here).
    """
    n, _, h, w = s.shape
    grid = slow_resize(labels, h, w)

    def cosines_to_centres(x):
        values = x.double().tolist()
        maps = []
        for b in range(n):
            features = [[[channel[i][j] for channel in values[b]] for j in range(w)] for i in range(h)]
            centres = [[features[i][j] for j in range(w)] for i in range(h)]
            for k in range(num_classes):
                if k == ignore_index:
                    continue
                pixels = [(i, j) for i in range(h) for j in range(w) if grid[b][i][j] == k]
                if not pixels:
                    continue
                channels = range(len(values[b]))
                mean = [sum(features[i][j][ch] for i, j in pixels) / len(pixels) for ch in channels]
                for i, j in pixels:
                    centres[i][j] = mean
            maps.append([slow_cosine(features[i][j], centres[i][j]) for i in range(h) for j in range(w)])
        return maps

    m_s, m_t = cosines_to_centres(s), cosines_to_centres(t)
    return sum((a - b) ** 2 for rows in zip(m_s, m_t) for a, b in zip(*rows)) / (n * h * w)


# ---------------------------------------------------------------- inputs ---------------------


def random_labels(generator, n, h, w, num_classes, ignore_index=IGNORE, ignored_fraction=0.25):
    labels = torch.randint(0, num_classes, (n, h, w), generator=generator)
    ignored = torch.rand(n, h, w, generator=generator) < ignored_fraction
    return labels.masked_fill(ignored, ignore_index)


def random_features(generator, shape, dtype, layout="contiguous"):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return make_layout(x, layout)


def random_counts(generator, shape):
    """Pixel counts in {0, 1, 2}: about a third of the classes absent."""
    return torch.randint(0, 3, shape, generator=generator)


# ---------------------------------------------------------------- resize_labels --------------


@pytest.mark.parametrize(
    "label_size, size",
    [
        pytest.param((5, 7), (5, 7), id="same"),
        pytest.param((3, 4), (6, 8), id="up-2x"),
        pytest.param((3, 4), (7, 11), id="up-odd"),
        pytest.param((11, 16), (5, 7), id="down-odd"),
        pytest.param((14, 20), (20, 14), id="float32-scale-edge"),
        pytest.param((1, 9), (4, 1), id="size-1"),
        pytest.param((97, 64), (64, 97), id="large-ratio"),
    ],
)
def test_resize_labels_matches_float_interpolate(label_size, size):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (2, *label_size), generator=g)
    expected = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    assert torch.equal(ref.resize_labels(labels, size), expected)
    assert ref.resize_labels(labels, size).tolist() == slow_resize(labels, *size)


def test_resize_labels_skips_matching_size():
    labels = torch.randint(0, 5, (2, 3, 4))
    assert ref.resize_labels(labels, (3, 4)) is labels


def test_resize_labels_keeps_values_beyond_float32():
    # 2^24 + 1 is not a float32: the float route would turn it into 2^24.
    labels = torch.full((1, 2, 2), 2**24 + 1)
    assert ref.resize_labels(labels, (3, 3)).unique().tolist() == [2**24 + 1]


def test_resize_labels_hand_values():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    # Up 2x: each label becomes a 2×2 block.
    assert ref.resize_labels(labels, (4, 4)).tolist() == [
        [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    ]
    # Down to 1×1 picks source row floor(0·2) = 0, column 0.
    assert ref.resize_labels(labels, (1, 1)).tolist() == [[[0]]]
    big = torch.arange(16).view(1, 4, 4)
    # Down 2x: rows and columns floor(i·2) = 0, 2.
    assert ref.resize_labels(big, (2, 2)).tolist() == [[[0, 2], [8, 10]]]


# ---------------------------------------------------------------- prototype_pool -------------


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
@pytest.mark.parametrize("n, c, _c_t, h, w, h_l, w_l, num_classes, layout", shape_and_layout_params())
def test_prototype_pool_matches_loops(n, c, _c_t, h, w, h_l, w_l, num_classes, layout, per_image):
    g = torch.Generator().manual_seed(1)
    x = random_features(g, (n, c, h, w), torch.float32, layout)
    labels = random_labels(g, n, h_l, w_l, num_classes)
    labels = make_layout(labels, "strided" if layout == "strided" else "contiguous")
    protos, counts = ref.prototype_pool(x, labels, num_classes, IGNORE, per_image)
    expected_protos, expected_counts = slow_pool(x, labels, num_classes, IGNORE, per_image)
    assert protos.shape == expected_protos.shape and protos.dtype == torch.float32
    assert counts.dtype == torch.int64 and torch.equal(counts, expected_counts)
    assert relative_error(protos, expected_protos) <= 1e-5


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_prototype_pool_dtypes(dtype, rtol):
    g = torch.Generator().manual_seed(2)
    x = random_features(g, (2, 3, 5, 7), dtype)
    labels = random_labels(g, 2, 5, 7, 4)
    protos, counts = ref.prototype_pool(x, labels, 4)
    expected_protos, expected_counts = slow_pool(x, labels, 4)
    assert protos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(counts, expected_counts)
    assert relative_error(protos, expected_protos) <= rtol


def test_prototype_pool_ignore_index_inside_class_range():
    g = torch.Generator().manual_seed(3)
    x = random_features(g, (2, 3, 4, 5), torch.float64)
    labels = torch.randint(0, 4, (2, 4, 5), generator=g)
    protos, counts = ref.prototype_pool(x, labels, 4, ignore_index=1)
    expected_protos, expected_counts = slow_pool(x, labels, 4, ignore_index=1)
    assert counts[:, 1].eq(0).all() and torch.equal(counts, expected_counts)
    assert relative_error(protos, expected_protos) <= 1e-12


def test_prototype_pool_hand_values():
    # x = [[1, 2], [3, 4]], labels = [[0, 0], [1, 255]], K = 3:
    # class 0: (1 + 2) / 2 = 1.5 from 2 pixels; class 1: 3 from 1 pixel; class 2 absent: 0.
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    labels = torch.tensor([[[0, 0], [1, 255]]])
    protos, counts = ref.prototype_pool(x, labels, 3)
    assert protos.tolist() == [[[1.5], [3.0], [0.0]]]
    assert counts.tolist() == [[2, 1, 0]]
    protos, counts = ref.prototype_pool(x, labels, 3, per_image=False)
    assert protos.tolist() == [[1.5], [3.0], [0.0]]
    assert counts.tolist() == [2, 1, 0]


def test_prototype_pool_hand_values_two_images_per_batch():
    # Image 0: x = [1, 3], labels [0, 0]; image 1: x = [5, 7], labels [0, 1].
    # Per image: class 0 = 2 and 5, class 1 = 0 (absent) and 7.
    # Per batch: class 0 = (1 + 3 + 5) / 3 = 3, class 1 = 7.
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    labels = torch.tensor([[[0, 0]], [[0, 1]]])
    protos, counts = ref.prototype_pool(x, labels, 2)
    assert protos.tolist() == [[[2.0], [0.0]], [[5.0], [7.0]]]
    assert counts.tolist() == [[2, 0], [1, 1]]
    protos, counts = ref.prototype_pool(x, labels, 2, per_image=False)
    assert protos.tolist() == [[3.0], [7.0]]
    assert counts.tolist() == [3, 1]


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_pool_gradcheck(per_image):
    g = torch.Generator().manual_seed(4)
    x = random_features(g, (2, 3, 4, 3), torch.float64).requires_grad_()
    labels = random_labels(g, 2, 5, 2, 4)
    labels[0, 0, 0] = 3  # class 2 absent in image 0, present in image 1
    labels[0][labels[0] == 2] = IGNORE
    labels[1, 0, 0] = 2
    assert torch.autograd.gradcheck(lambda x: ref.prototype_pool(x, labels, 4, IGNORE, per_image)[0], (x,))


def test_prototype_pool_gradient_dtype():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float16, requires_grad=True)
    protos, _ = ref.prototype_pool(x, torch.randint(0, 3, (2, 4, 5)), 3)
    protos.sum().backward()
    assert x.grad.dtype == torch.float16


# ---------------------------------------------------------------- prototype_kl ---------------


def prototype_kl_inputs(
    generator, n, c_s, c_t, h, w, num_classes, per_image, dtype=torch.float32, layout="contiguous"
):
    s = random_features(generator, (n, c_s, h, w), dtype, layout)
    t = random_features(generator, (n, c_t, h, w), dtype, layout)
    lead = (n, num_classes) if per_image else (num_classes,)
    s_protos = random_features(generator, (*lead, c_s), torch.float32)
    t_protos = random_features(generator, (*lead, c_t), torch.float32)
    return s, t, s_protos, t_protos, random_counts(generator, lead)


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
@pytest.mark.parametrize("n, c_s, c_t, h, w, _h_l, _w_l, num_classes, layout", shape_and_layout_params())
def test_prototype_kl_matches_loops(n, c_s, c_t, h, w, _h_l, _w_l, num_classes, layout, per_image):
    g = torch.Generator().manual_seed(5)
    args = prototype_kl_inputs(g, n, c_s, c_t, h, w, num_classes, per_image, layout=layout)
    loss = ref.prototype_kl(*args, 0.1)
    expected = slow_prototype_kl(*args, 0.1)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_prototype_kl_dtypes(dtype, rtol):
    g = torch.Generator().manual_seed(6)
    args = prototype_kl_inputs(g, 2, 3, 4, 5, 7, 4, per_image=True, dtype=dtype)
    loss = ref.prototype_kl(*args, 0.5)
    expected = slow_prototype_kl(*args, 0.5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - expected) <= rtol * abs(expected)


def test_prototype_kl_with_pooled_prototypes():
    # The APD pipeline: prototypes and counts from prototype_pool, some classes absent.
    g = torch.Generator().manual_seed(7)
    s = random_features(g, (2, 3, 5, 7), torch.float64)
    t = random_features(g, (2, 4, 5, 7), torch.float64)
    labels = random_labels(g, 2, 10, 14, 6)
    labels[1][labels[1] < 3] = IGNORE
    s_protos, counts = ref.prototype_pool(s, labels, 6)
    t_protos, _ = ref.prototype_pool(t, labels, 6)
    assert counts[1, :3].eq(0).all()
    loss = ref.prototype_kl(s, t, s_protos, t_protos, counts, 0.1)
    expected = slow_prototype_kl(s, t, s_protos, t_protos, counts, 0.1)
    assert abs(loss.item() - expected) <= 1e-12 * expected


def test_prototype_kl_hand_value():
    # One pixel, C = 2, K = 3 with class 2 absent; τ = 1.
    # Student x = (1, 0), prototypes e₁, e₂: O_s = (1, 0). Teacher x = (0, 1): O_t = (0, 1).
    # log p − log q = (0 − 1, 1 − 0) = (−1, 1), so KL = p₂ − p₁ = (e − 1)/(e + 1) = tanh(1/2).
    # The absent class's prototype (5, 5) would change both softmaxes if it took part.
    student = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    teacher = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    counts = torch.tensor([4, 1, 0])
    loss = ref.prototype_kl(student, teacher, protos, protos, counts, 1.0)
    assert loss.item() == pytest.approx(math.tanh(0.5), rel=1e-6)
    per_image = ref.prototype_kl(student, teacher, protos[None], protos[None], counts[None], 1.0)
    assert per_image.item() == pytest.approx(math.tanh(0.5), rel=1e-6)


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_kl_gradcheck(per_image):
    g = torch.Generator().manual_seed(8)
    s, t, s_protos, t_protos, counts = prototype_kl_inputs(
        g, 2, 3, 2, 2, 3, 3, per_image, dtype=torch.float64
    )
    s_protos, t_protos = s_protos.double(), t_protos.double()
    counts[..., 0] = 0  # an absent class
    counts[..., 1:] = 2
    if per_image:
        counts[1] = 0  # an image with no present class
    inputs = tuple(v.requires_grad_() for v in (s, t, s_protos, t_protos))
    assert torch.autograd.gradcheck(lambda *v: ref.prototype_kl(*v, counts, 0.5), inputs)


def test_prototype_kl_gradient_dtypes():
    g = torch.Generator().manual_seed(9)
    args = prototype_kl_inputs(g, 2, 3, 2, 3, 4, 4, per_image=True, dtype=torch.bfloat16)
    s, t, s_protos, t_protos = (v.requires_grad_() for v in args[:4])
    ref.prototype_kl(s, t, s_protos, t_protos, args[4], 0.1).backward()
    assert s.grad.dtype == t.grad.dtype == torch.bfloat16
    assert s_protos.grad.dtype == t_protos.grad.dtype == torch.float32


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_kl_absent_classes_take_no_part(per_image):
    g = torch.Generator().manual_seed(10)
    s, t, s_protos, t_protos, counts = prototype_kl_inputs(g, 2, 3, 4, 5, 7, 5, per_image)
    counts[..., 1] = 0
    counts[..., 3] = 0
    counts[..., 0] = 1
    inputs = [v.clone().requires_grad_() for v in (s, t, s_protos, t_protos)]
    loss = ref.prototype_kl(*inputs, counts, 0.1)
    loss.backward()
    for v in inputs:
        assert v.grad.isfinite().all()
    for protos in inputs[2:]:
        assert protos.grad[..., [1, 3], :].eq(0).all()
        assert protos.grad[..., 0, :].ne(0).any()
    # Zero (pooled) or arbitrary prototypes of absent classes give the same loss.
    for fill in (0.0, 1e3):
        s_absent, t_absent = s_protos.clone(), t_protos.clone()
        s_absent[..., [1, 3], :] = fill
        t_absent[..., [1, 3], :] = -fill
        # Equal up to rounding: autograd-free calls may take another matmul path.
        changed = ref.prototype_kl(s, t, s_absent, t_absent, counts, 0.1)
        assert changed.item() == pytest.approx(loss.item(), rel=1e-6)


# ---------------------------------------------------------------- class_variation_loss -------


@pytest.mark.parametrize("n, c_s, c_t, h, w, h_l, w_l, num_classes, layout", shape_and_layout_params())
def test_class_variation_loss_matches_ifvd_loops(n, c_s, c_t, h, w, h_l, w_l, num_classes, layout):
    g = torch.Generator().manual_seed(11)
    s = random_features(g, (n, c_s, h, w), torch.float32, layout)
    t = random_features(g, (n, c_t, h, w), torch.float32, layout)
    labels = random_labels(g, n, h_l, w_l, num_classes)
    labels = make_layout(labels, "strided" if layout == "strided" else "contiguous")
    loss = ref.class_variation_loss(s, t, labels, num_classes, IGNORE)
    expected = slow_ifvd(s, t, labels, num_classes, IGNORE)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # A single pixel per class gives cosines of exactly 1 and a loss of 0: compare absolutely.
    assert abs(loss.item() - expected) <= 1e-5 * max(abs(expected), 1e-2)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_class_variation_loss_dtypes(dtype, rtol):
    g = torch.Generator().manual_seed(12)
    s = random_features(g, (2, 3, 5, 7), dtype)
    t = random_features(g, (2, 4, 5, 7), dtype)
    labels = random_labels(g, 2, 5, 7, 3)
    loss = ref.class_variation_loss(s, t, labels, 3)
    expected = slow_ifvd(s, t, labels, 3)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - expected) <= rtol * abs(expected)


def test_class_variation_loss_ignore_index_inside_class_range():
    g = torch.Generator().manual_seed(13)
    s = random_features(g, (2, 3, 4, 5), torch.float64)
    t = random_features(g, (2, 2, 4, 5), torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    loss = ref.class_variation_loss(s, t, labels, 3, ignore_index=0)
    assert abs(loss.item() - slow_ifvd(s, t, labels, 3, ignore_index=0)) <= 1e-12 * loss.item()


def test_class_variation_loss_hand_value():
    # One image, C = 2, three pixels: labels (0, 0, ignored).
    # Student (1, 0), (0, 1): prototype (½, ½), cosine of each pixel 1/√2; m_s = (1/√2, 1/√2, 1).
    # Teacher (1, 0), (1, 0): prototype (1, 0), m_t = (1, 1, 1).
    # loss = 2 (1 − 1/√2)² / 3 = 2 (3/2 − √2) / 3 = (3 − 2√2) / 3.
    student = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]]).view(1, 2, 1, 3)
    teacher = torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 7.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 255]]])
    loss = ref.class_variation_loss(student, teacher, labels, 2)
    assert loss.item() == pytest.approx((3 - 2 * math.sqrt(2)) / 3, rel=1e-6)


def test_class_variation_loss_gradcheck():
    g = torch.Generator().manual_seed(14)
    s = random_features(g, (2, 3, 3, 4), torch.float64).requires_grad_()
    t = random_features(g, (2, 2, 3, 4), torch.float64).requires_grad_()
    labels = random_labels(g, 2, 5, 7, 3)
    assert torch.autograd.gradcheck(lambda s, t: ref.class_variation_loss(s, t, labels, 3), (s, t))


def test_class_variation_loss_gradient_dtype():
    s = torch.randn(2, 3, 4, 5, dtype=torch.float16, requires_grad=True)
    t = torch.randn(2, 2, 4, 5, dtype=torch.float16, requires_grad=True)
    ref.class_variation_loss(s, t, torch.randint(0, 3, (2, 4, 5)), 3).backward()
    assert s.grad.dtype == t.grad.dtype == torch.float16


def test_class_variation_loss_absent_classes_are_finite():
    g = torch.Generator().manual_seed(15)
    s = random_features(g, (2, 3, 4, 5), torch.float32).requires_grad_()
    t = random_features(g, (2, 2, 4, 5), torch.float32).requires_grad_()
    labels = random_labels(g, 2, 4, 5, 2)  # classes 2..7 absent everywhere
    loss = ref.class_variation_loss(s, t, labels, 8)
    loss.backward()
    assert loss.isfinite() and s.grad.isfinite().all() and t.grad.isfinite().all()
    assert abs(loss.item() - slow_ifvd(s.detach(), t.detach(), labels, 8)) <= 1e-5 * loss.item()


# ---------------------------------------------------------------- empty selections -----------


def test_all_pixels_ignored_gives_zeros_and_zero_gradients():
    g = torch.Generator().manual_seed(16)
    s = random_features(g, (2, 3, 4, 5), torch.float32).requires_grad_()
    t = random_features(g, (2, 2, 4, 5), torch.float32).requires_grad_()
    labels = torch.full((2, 3, 3), IGNORE)

    for per_image in (True, False):
        protos, counts = ref.prototype_pool(s, labels, 3, IGNORE, per_image)
        assert protos.eq(0).all() and counts.eq(0).all()
        (grad,) = torch.autograd.grad(protos.sum(), s)
        assert grad.eq(0).all()

    s_protos, counts = ref.prototype_pool(s, labels, 3)
    t_protos, _ = ref.prototype_pool(t, labels, 3)
    # Prototype leaves that are not zero: the loss must ignore them, not just see zeros.
    s_leaf = torch.randn(2, 3, 3, generator=g).requires_grad_()
    t_leaf = torch.randn(2, 3, 2, generator=g).requires_grad_()
    for protos_s, protos_t in ((s_protos, t_protos), (s_leaf, t_leaf), (s_leaf[0], t_leaf[0])):
        kind_counts = counts if protos_s.dim() == 3 else counts[0]
        kl = ref.prototype_kl(s, t, protos_s, protos_t, kind_counts, 0.1)
        assert kl.item() == 0.0
        grads = torch.autograd.grad(kl, (s, t, s_leaf, t_leaf), allow_unused=True)
        for grad in grads:
            assert grad is None or grad.eq(0).all()

    loss = ref.class_variation_loss(s, t, labels, 3)
    assert loss.item() == 0.0
    for grad in torch.autograd.grad(loss, (s, t)):
        assert grad.eq(0).all()
