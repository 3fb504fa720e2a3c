"""The reference softmax-normalised KL losses against slow loop formulations and upstream conventions."""
import math

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops.reference import softmax_kl as ref
from tests.utils import LAYOUTS, make_layout


def slow_channel_kl(s, t, tau):
    """τ² Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C), one row at a time, float64."""
    n, c = s.shape[:2]
    s = s.reshape(n, c, -1).double()
    t = t.reshape(n, c, -1).double()
    total = 0.0
    for i in range(n):
        for j in range(c):
            zs = [v / tau for v in s[i, j].tolist()]
            zt = [v / tau for v in t[i, j].tolist()]
            lse_s = math.log(sum(math.exp(v) for v in zs))
            lse_t = math.log(sum(math.exp(v) for v in zt))
            for a, b in zip(zs, zt):
                log_p, log_q = b - lse_t, a - lse_s
                total += math.exp(log_p) * (log_p - log_q)
    return total * tau * tau / (n * c)


def slow_pixel_kl(s, t, tau, target=None, ignore_index=255):
    """τ² · mean over valid pixels of KL(softmax_C(t/τ) ‖ softmax_C(s/τ)), one pixel at a time."""
    n, c = s.shape[:2]
    s = s.reshape(n, c, -1).double()
    t = t.reshape(n, c, -1).double()
    labels = None if target is None else target.reshape(n, -1)
    total, count = 0.0, 0
    for i in range(n):
        for pix in range(s.shape[2]):
            if labels is not None and int(labels[i, pix]) == ignore_index:
                continue
            zs = [s[i, k, pix].item() / tau for k in range(c)]
            zt = [t[i, k, pix].item() / tau for k in range(c)]
            lse_s = math.log(sum(math.exp(v) for v in zs))
            lse_t = math.log(sum(math.exp(v) for v in zt))
            total += sum(
                math.exp(b - lse_t) * ((b - lse_t) - (a - lse_s)) for a, b in zip(zs, zt)
            )
            count += 1
    return total * tau * tau / count if count else 0.0


SHAPES = [
    pytest.param((2, 3, 5, 7), id="odd-5x7"),
    pytest.param((1, 1, 4, 4), id="N1-C1"),
    pytest.param((2, 4, 1, 1), id="L1"),
    pytest.param((1, 5, 1, 9), id="H1"),
    pytest.param((3, 2, 6), id="3d"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_channel_kl_matches_loops(shape, tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    got = ref.channel_kl(s.double(), t.double(), tau)
    assert got.item() == pytest.approx(slow_channel_kl(s, t, tau), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_pixel_kl_matches_loops(shape, tau, with_target):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    target = None
    if with_target:
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.3] = 255
    got = ref.pixel_kl(s.double(), t.double(), tau, target, 255)
    assert got.item() == pytest.approx(slow_pixel_kl(s, t, tau, target), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_layouts_give_the_same_loss(layout, op):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)
    fn = getattr(ref, op)
    expected = fn(s, t, 2.0)
    got = fn(make_layout(s, layout), make_layout(t, layout), 2.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_channel_kl_hand_computed():
    # One row of two positions: s = [0, 0] → q = [1/2, 1/2]; t = [ln 3, 0] → p = [3/4, 1/4].
    # KL(p‖q) = 3/4·ln(3/2) + 1/4·ln(1/2) = 0.75·0.405465 − 0.25·0.693147 = 0.130812.
    s = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    t = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ref.channel_kl(s, t, 1.0).item() == pytest.approx(expected, rel=1e-12)
    # τ = 2 divides the logits: t/2 = [ln √3, 0] → p = [√3, 1]/(√3 + 1); then times τ² = 4.
    p0 = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_tau2 = 4 * (p0 * math.log(2 * p0) + (1 - p0) * math.log(2 * (1 - p0)))
    assert ref.channel_kl(s, t, 2.0).item() == pytest.approx(expected_tau2, rel=1e-12)


def test_pixel_kl_hand_computed_with_ignore():
    # Two pixels, two classes. Pixel 0: s = [0, 0], t = [ln 3, 0] → KL = 0.130812 (as above).
    # Pixel 1 is ignored, so the mean is over one pixel.
    s = torch.zeros(1, 2, 1, 2, dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 5.0], [0.0, -5.0]], dtype=torch.float64).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 255]]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert ref.pixel_kl(s, t, 1.0, target, 255).item() == pytest.approx(expected, rel=1e-12)


def test_identical_inputs_give_zero():
    x = torch.randn(2, 3, 4, 5)
    assert ref.channel_kl(x, x, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert ref.pixel_kl(x, x, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_channel_kl_equals_cwd_convention():
    """CWD (mmrazor ChannelWiseDivergence, CIRKD CriterionCWD): the KL summed over the spatial
    softmax of each channel, times τ², divided by N·C — written here from that formula."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    tau = 4.0
    n, c, h, w = s.shape
    soft_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    cwd = torch.sum(
        soft_t * F.log_softmax(t.reshape(-1, h * w) / tau, dim=1)
        - soft_t * F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)
    ) * tau**2 / (c * n)
    torch.testing.assert_close(ref.channel_kl(s, t, tau), cwd, rtol=1e-6, atol=0)


def test_pixel_kl_equals_cirkd_kd_convention():
    """CIRKD CriterionKD: KLDiv(log_softmax(s/τ), softmax(t/τ)) with 'batchmean' over the
    pixels (the logits are permuted to (N·H·W, C)), times τ²."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    tau = 2.0
    c = s.shape[1]
    s_rows = s.permute(0, 2, 3, 1).reshape(-1, c)
    t_rows = t.permute(0, 2, 3, 1).reshape(-1, c)
    kd = F.kl_div(F.log_softmax(s_rows / tau, 1), F.softmax(t_rows / tau, 1), reduction="batchmean")
    torch.testing.assert_close(ref.pixel_kl(s, t, tau), kd * tau**2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_gradcheck(op):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = getattr(ref, op)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, 1.5), (s, t))


def test_pixel_kl_gradcheck_with_target():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 255, 1], [2, 2, 255]], [[255, 0, 0], [1, 255, 2]]])
    assert torch.autograd.gradcheck(lambda a, b: ref.pixel_kl(a, b, 0.7, target, 255), (s, t))


def test_pixel_kl_all_ignored_is_zero_with_zero_grad():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = ref.pixel_kl(s, t, 1.0, target, 255)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_losses_are_float32_and_grads_keep_dtype(dtype):
    s = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, dtype=dtype, requires_grad=True)
    for op in (ref.channel_kl, ref.pixel_kl):
        loss = op(s, t, 1.0)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        (gs, gt) = torch.autograd.grad(loss, (s, t))
        assert gs.dtype == dtype and gt.dtype == dtype


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_public_api_reference_backend(op):
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    expected = getattr(ref, op)(s, t, 2.0)
    torch.testing.assert_close(getattr(kdops, op)(s, t, 2.0, backend="reference"), expected)
    torch.testing.assert_close(getattr(kdops, op)(s, t, tau=2.0), expected, rtol=1e-5, atol=1e-7)


BAD_CALLS = [
    pytest.param(lambda s, t: kdops.channel_kl(s, t[:, :2]), "student and teacher", id="shape"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t.half()), "teacher", id="dtype"),
    pytest.param(lambda s, t: kdops.channel_kl(s.long(), t), "student", id="int-student"),
    pytest.param(lambda s, t: kdops.channel_kl(s[0, 0], t[0, 0]), "student", id="ndim"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t, tau=0.0), "tau", id="tau-zero"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t, tau=-1.0), "tau", id="tau-negative"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t, tau=float("nan")), "tau", id="tau-nan"),
    pytest.param(lambda s, t: kdops.pixel_kl(s, t, tau=float("inf")), "tau", id="tau-inf"),
    pytest.param(lambda s, t: kdops.pixel_kl(s, t, target=torch.zeros(2, 4, 4).long()), "target", id="target-shape"),
    pytest.param(lambda s, t: kdops.pixel_kl(s, t, target=torch.zeros(2, 4, 5)), "target", id="target-float"),
    pytest.param(lambda s, t: kdops.pixel_kl(s, t, ignore_index=1.5), "ignore_index", id="ignore-float"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t, backend="gpu"), "backend", id="backend-name"),
    pytest.param(lambda s, t: kdops.channel_kl(s, t, backend="cuda"), "backend='cuda'", id="backend-cuda-on-cpu"),
    pytest.param(lambda s, t: kdops.channel_kl(s, torch.empty(2, 3, 0, 5)), "teacher", id="empty"),
]


@pytest.mark.parametrize("call,name", BAD_CALLS)
def test_bad_input_names_the_argument(call, name):
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=name):
        call(s, t)


def test_backend_env_var(monkeypatch):
    s, t = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    monkeypatch.setenv("KDOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="KDOPS_BACKEND"):
        kdops.channel_kl(s, t)
    monkeypatch.setenv("KDOPS_BACKEND", "reference")
    torch.testing.assert_close(kdops.channel_kl(s, t), ref.channel_kl(s, t, 1.0))
