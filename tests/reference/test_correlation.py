"""The reference channel correlations against slow loop formulations, ICKD's code, the explicit
L × L affinity of SKD, hand-computed values, gradcheck and a peak-memory bound."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdops.reference import correlation as ref
from tests.utils import LAYOUTS, make_layout, relative_error

REPO_ROOT = Path(__file__).resolve().parents[2]
EPS = 1e-12  # F.normalize's eps: v / max(‖v‖, EPS)


# --- slow formulations: Python loops over n, channels and positions, in float64 -------------


def slow_gram(x, norm):
    """G[n, i, j] = Σ_l x[n, i, l] x[n, j, l], normalised per ``norm``, as nested lists."""
    n, c = x.shape[:2]
    rows = x.reshape(n, c, -1).double().tolist()
    length = len(rows[0][0])
    out = []
    for b in range(n):
        gram = []
        for i in range(c):
            row = [math.fsum(u * v for u, v in zip(rows[b][i], rows[b][j])) for j in range(c)]
            if norm == "row":
                size = math.sqrt(math.fsum(v * v for v in row))
                row = [v / max(size, EPS) for v in row]
            elif norm == "l":
                row = [v / length for v in row]
            gram.append(row)
        out.append(gram)
    return out


def slow_correlation_loss(s, t, norm):
    """Σ_{n,i,j} (G_s − G_t)² / (N·C)."""
    n, c = s.shape[:2]
    gs, gt = slow_gram(s, norm), slow_gram(t, norm)
    total = math.fsum(
        (gs[b][i][j] - gt[b][i][j]) ** 2 for b in range(n) for i in range(c) for j in range(c)
    )
    return total / (n * c)


def slow_unit_columns(x):
    """For each image, the list of per-position channel vectors divided by max(‖v‖, EPS)."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1).double()
    images = []
    for b in range(n):
        columns = []
        for pos in range(flat.shape[2]):
            v = [flat[b, k, pos].item() for k in range(c)]
            size = max(math.sqrt(math.fsum(a * a for a in v)), EPS)
            columns.append([a / size for a in v])
        images.append(columns)
    return images


def slow_pairwise_affinity(s, t):
    """Σ_{n,i,j} (cos_s(i, j) − cos_t(i, j))² / (N·L²), one pair of positions at a time."""
    us, ut = slow_unit_columns(s), slow_unit_columns(t)
    n, length = len(us), len(us[0])
    total = 0.0
    for b in range(n):
        for i in range(length):
            for j in range(length):
                a_s = math.fsum(p * q for p, q in zip(us[b][i], us[b][j]))
                a_t = math.fsum(p * q for p, q in zip(ut[b][i], ut[b][j]))
                total += (a_s - a_t) ** 2
    return total / (n * length * length)


def explicit_pairwise_affinity(s, t):
    """SKD's form: both L × L affinity maps formed explicitly, in float64 (small L only)."""
    n = s.shape[0]
    s_hat = F.normalize(s.reshape(n, s.shape[1], -1).double(), dim=1, eps=EPS)
    t_hat = F.normalize(t.reshape(n, t.shape[1], -1).double(), dim=1, eps=EPS)
    a_s = torch.einsum("icm,icn->imn", s_hat, s_hat)
    a_t = torch.einsum("icm,icn->imn", t_hat, t_hat)
    length = s_hat.shape[2]
    return ((a_s - a_t) ** 2).sum() / (n * length * length)


def ickd_loss(f_s, f_t):
    """ICKD's batch loss (ICKD repository), transcribed: row-normalised Grams, summed squared
    difference over (b·c)."""
    bsz, ch = f_s.shape[0], f_s.shape[1]
    f_s = f_s.view(bsz, ch, -1)
    f_t = f_t.view(bsz, ch, -1)
    emd_s = torch.bmm(f_s, f_s.permute(0, 2, 1))
    emd_s = F.normalize(emd_s, dim=2)
    emd_t = torch.bmm(f_t, f_t.permute(0, 2, 1))
    emd_t = F.normalize(emd_t, dim=2)
    G_diff = emd_s - emd_t
    loss = (G_diff * G_diff).view(bsz, -1).sum() / (ch * bsz)
    return loss


# --- cases ----------------------------------------------------------------------------------

SHAPES = [
    pytest.param((2, 3, 5, 7), id="odd-5x7"),
    pytest.param((1, 1, 4, 3), id="N1-C1"),
    pytest.param((2, 4, 1, 6), id="H1"),
    pytest.param((1, 3, 5, 1), id="W1"),
    pytest.param((3, 2, 1, 1), id="L1"),
    pytest.param((2, 3, 7), id="3d"),
    pytest.param((1, 2, 2, 3, 2), id="5d"),
]

# (student shape, teacher shape) for the correlation loss: equal N and C, L may differ.
CORRELATION_PAIRS = [
    pytest.param((2, 3, 5, 7), (2, 3, 5, 7), id="odd-5x7"),
    pytest.param((2, 3, 5, 7), (2, 3, 3, 2), id="teacher-smaller-L"),
    pytest.param((1, 1, 4, 3), (1, 1, 4, 3), id="N1-C1"),
    pytest.param((3, 4, 1, 1), (3, 4, 1, 1), id="L1"),
    pytest.param((2, 2, 9), (2, 2, 3, 3), id="3d-vs-4d"),
]

# (student shape, teacher shape) for the pair-wise loss: equal N and spatial shape, C may differ.
AFFINITY_PAIRS = [
    pytest.param((2, 3, 5, 7), (2, 3, 5, 7), id="odd-5x7"),
    pytest.param((2, 5, 5, 7), (2, 2, 5, 7), id="C5-vs-C2"),
    pytest.param((1, 4, 3, 3), (1, 1, 3, 3), id="teacher-C1"),
    pytest.param((1, 1, 2, 5), (1, 3, 2, 5), id="student-C1"),
    pytest.param((3, 4, 1, 1), (3, 6, 1, 1), id="L1"),
    pytest.param((1, 3, 1, 9), (1, 5, 1, 9), id="H1"),
    pytest.param((2, 3, 11), (2, 4, 11), id="3d"),
]

NORMS = ["row", "l", "none"]
DTYPES = [
    pytest.param(torch.float64, 1e-12, id="fp64"),
    # 16/32-bit inputs are exact in float64, and the reference rounds only its float32 result.
    pytest.param(torch.float32, 1e-6, id="fp32"),
    pytest.param(torch.float16, 1e-6, id="fp16"),
    pytest.param(torch.bfloat16, 1e-6, id="bf16"),
]


def randn(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def expected_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- channel_correlation --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_channel_correlation_matches_loops(shape, norm, dtype, rtol):
    x = randn(shape, 0, dtype)
    got = ref.channel_correlation(x, norm)
    assert got.dtype == expected_dtype(dtype)
    assert got.shape == (shape[0], shape[1], shape[1])
    expected = torch.tensor(slow_gram(x, norm), dtype=torch.float64)
    assert relative_error(got, expected) <= rtol


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_any_layout(layout, norm):
    x = randn((2, 3, 5, 7), 1, torch.float32)
    got = ref.channel_correlation(make_layout(x, layout), norm)
    expected = torch.tensor(slow_gram(x, norm), dtype=torch.float64)
    assert relative_error(got, expected) <= 1e-6


def test_channel_correlation_hand_computed():
    # x[0, 0] = (1, 2), x[0, 1] = (3, 4) over L = 2 positions:
    # G = [[1·1 + 2·2, 1·3 + 2·4], [3·1 + 4·2, 3·3 + 4·4]] = [[5, 11], [11, 25]].
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    none = ref.channel_correlation(x, "none")
    assert torch.equal(none, torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]))
    # "l": G / L with L = 2.
    per_position = ref.channel_correlation(x, "l")
    assert torch.equal(per_position, torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))
    # "row": ‖(5, 11)‖ = √146, ‖(11, 25)‖ = √746.
    row = ref.channel_correlation(x, "row")
    expected = torch.tensor(
        [[[5 / math.sqrt(146), 11 / math.sqrt(146)], [11 / math.sqrt(746), 25 / math.sqrt(746)]]]
    )
    torch.testing.assert_close(row, expected, rtol=1e-7, atol=0)


def test_channel_correlation_zero_channel_row_is_zero():
    # A channel that is zero everywhere has a zero row in G: "row" divides it by
    # max(0, 1e-12) and gives 0, with a finite gradient.
    x = randn((1, 3, 2, 2), 2).requires_grad_()
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    g = ref.channel_correlation(x * mask, "row")
    assert torch.equal(g[0, 1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(g[0, :, 1], torch.zeros(3, dtype=torch.float64))
    g.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_gradcheck(norm):
    x = randn((2, 3, 3, 4), 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ref.channel_correlation(v, norm), (x,))


# --- channel_correlation_loss ---------------------------------------------------------------


@pytest.mark.parametrize("s_shape, t_shape", CORRELATION_PAIRS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_channel_correlation_loss_matches_loops(s_shape, t_shape, norm, dtype, rtol):
    s, t = randn(s_shape, 4, dtype), randn(t_shape, 5, dtype)
    got = ref.channel_correlation_loss(s, t, norm)
    assert got.dtype == expected_dtype(dtype)
    assert got.dim() == 0
    assert got.item() == pytest.approx(slow_correlation_loss(s, t, norm), rel=rtol)


@pytest.mark.parametrize("s_layout", LAYOUTS)
@pytest.mark.parametrize("t_layout", LAYOUTS)
def test_channel_correlation_loss_any_layout(s_layout, t_layout):
    s, t = randn((2, 3, 5, 7), 6, torch.float32), randn((2, 3, 5, 7), 7, torch.float32)
    got = ref.channel_correlation_loss(make_layout(s, s_layout), make_layout(t, t_layout))
    assert got.item() == pytest.approx(slow_correlation_loss(s, t, "row"), rel=1e-6)


@pytest.mark.parametrize(
    "shape", [pytest.param((2, 5, 6, 7), id="odd"), pytest.param((1, 1, 3, 1), id="C1")]
)
def test_channel_correlation_loss_is_ickd(shape):
    s, t = randn(shape, 8), randn(shape, 9)
    expected = ickd_loss(s, t)
    got = ref.channel_correlation_loss(s, t, "row")
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_channel_correlation_loss_hand_computed():
    # student channels (1, 0) and (0, 1) over L = 2: G_s = I.
    # teacher channels (1, 1) and (0, 0): G_t = [[2, 0], [0, 0]].
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    # "row": G_s = I, G_t = [[1, 0], [0, 0]] (the zero row stays 0); Σ diff² = 1; / (N·C = 2).
    assert ref.channel_correlation_loss(s, t, "row").item() == 0.5
    # "none": diff = [[-1, 0], [0, 1]]; Σ diff² = 2; / 2.
    assert ref.channel_correlation_loss(s, t, "none").item() == 1.0
    # "l": diff = I/2 − [[1, 0], [0, 0]] = [[-0.5, 0], [0, 0.5]]; Σ diff² = 0.5; / 2.
    assert ref.channel_correlation_loss(s, t, "l").item() == 0.25


@pytest.mark.parametrize("norm", NORMS)
def test_channel_correlation_loss_gradcheck(norm):
    s = randn((2, 3, 3, 4), 10).requires_grad_()
    t = randn((2, 3, 2, 5), 11).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ref.channel_correlation_loss(a, b, norm), (s, t))


# --- pairwise_affinity_loss -----------------------------------------------------------------


@pytest.mark.parametrize("s_shape, t_shape", AFFINITY_PAIRS)
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_pairwise_affinity_loss_matches_loops(s_shape, t_shape, dtype, rtol):
    s, t = randn(s_shape, 12, dtype), randn(t_shape, 13, dtype)
    got = ref.pairwise_affinity_loss(s, t)
    assert got.dtype == expected_dtype(dtype)
    assert got.dim() == 0
    assert got.item() == pytest.approx(slow_pairwise_affinity(s, t), rel=rtol, abs=1e-15)


@pytest.mark.parametrize("s_shape, t_shape", AFFINITY_PAIRS)
def test_pairwise_affinity_loss_matches_explicit_affinity(s_shape, t_shape):
    s, t = randn(s_shape, 14), randn(t_shape, 15)
    expected = explicit_pairwise_affinity(s, t)
    got = ref.pairwise_affinity_loss(s, t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("s_layout", LAYOUTS)
@pytest.mark.parametrize("t_layout", LAYOUTS)
def test_pairwise_affinity_loss_any_layout(s_layout, t_layout):
    s, t = randn((2, 3, 5, 7), 16, torch.float32), randn((2, 4, 5, 7), 17, torch.float32)
    got = ref.pairwise_affinity_loss(make_layout(s, s_layout), make_layout(t, t_layout))
    assert got.item() == pytest.approx(explicit_pairwise_affinity(s, t).item(), rel=1e-6)


def test_pairwise_affinity_loss_hand_computed():
    # student positions (1, 0) and (1, 1): cos = 1/√2, A_s = [[1, 1/√2], [1/√2, 1]].
    # teacher (C = 1) values 2 and −5: unit columns 1 and −1, A_t = [[1, −1], [−1, 1]].
    # Off-diagonal differences 1/√2 + 1; Σ diff² = 2(1 + 1/√2)² = 3 + 2√2; / (N·L² = 4).
    s = torch.tensor([[[[1.0, 1.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    t = torch.tensor([[[[2.0, -5.0]]]])  # (1, 1, 1, 2)
    got = ref.pairwise_affinity_loss(s, t)
    assert got.item() == pytest.approx((3 + 2 * math.sqrt(2)) / 4, rel=1e-7)


def test_pairwise_affinity_loss_zero_position():
    # A position whose features are all 0 has x̂ = 0 (max(‖0‖, 1e-12)): its affinities are 0,
    # and the gradient stays finite. Student A_s: position 0 unit, position 1 zero → only
    # A_s[0, 0] = 1. Teacher positions (1, 0), (0, 1): A_t = I. Σ diff² = 1; / (N·L² = 4).
    s = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], dtype=torch.float64)
    loss = ref.pairwise_affinity_loss(s, t)
    assert loss.item() == pytest.approx(0.25, rel=1e-15)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_pairwise_affinity_loss_identical_inputs_is_zero():
    x = randn((2, 8, 9, 11), 18, torch.float32)
    assert abs(ref.pairwise_affinity_loss(x, x).item()) <= 1e-12


def test_pairwise_affinity_loss_cancellation():
    # Student = teacher + noise of 1e-4: each of the identity's three terms is ~1/C of N·L²
    # while the loss is ~1e-8 of that. Summed in float32 the terms would leave nothing but
    # rounding; the float64 accumulation of the reference keeps the loss to float32 precision.
    t = randn((2, 16, 9, 11), 19, torch.float32)
    s = (t + 1e-4 * randn(t.shape, 20, torch.float32)).to(torch.float32)
    expected = explicit_pairwise_affinity(s, t).item()
    got = ref.pairwise_affinity_loss(s, t).item()
    assert got == pytest.approx(expected, rel=1e-6)

    # The case is hard: the same identity evaluated in float32 misses by far more.
    n, length = t.shape[0], t.shape[2] * t.shape[3]
    s_hat = F.normalize(s.reshape(n, 16, -1), dim=1)
    t_hat = F.normalize(t.reshape(n, 16, -1), dim=1)
    terms32 = (
        (s_hat @ s_hat.mT).square().sum()
        - 2 * (t_hat @ s_hat.mT).square().sum()
        + (t_hat @ t_hat.mT).square().sum()
    ) / (n * length * length)
    assert abs(terms32.item() - expected) > 1e-2 * expected


def test_pairwise_affinity_loss_gradcheck():
    s = randn((2, 3, 3, 4), 21).requires_grad_()
    t = randn((2, 2, 3, 4), 22).requires_grad_()
    assert torch.autograd.gradcheck(ref.pairwise_affinity_loss, (s, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_losses_gradients_reach_both_inputs_in_their_dtype(dtype):
    s = randn((2, 3, 4, 5), 23, dtype).requires_grad_()
    t = randn((2, 3, 4, 5), 24, dtype).requires_grad_()
    for loss in (ref.channel_correlation_loss(s, t), ref.pairwise_affinity_loss(s, t)):
        s.grad = t.grad = None
        loss.backward()
        for grad in (s.grad, t.grad):
            assert grad.dtype == dtype
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_pairwise_affinity_loss_memory_is_not_quadratic_in_L():
    # L = 128·256 = 32768: one L × L float32 map would be 4 GiB. Forward and backward at this
    # size must add well under 1 GiB to the peak resident memory of a fresh process.
    script = textwrap.dedent(
        """
        import resource
        import torch
        from kdops.reference.correlation import pairwise_affinity_loss

        torch.manual_seed(0)
        s = torch.randn(2, 64, 128, 256, requires_grad=True)
        t = torch.randn(2, 64, 128, 256, requires_grad=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = pairwise_affinity_loss(s, t)
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        print(after - before)  # KiB on Linux
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    added_kib = int(done.stdout.split()[-1])
    assert added_kib < 1024 * 1024, f"peak memory grew by {added_kib / 1024:.0f} MiB"
