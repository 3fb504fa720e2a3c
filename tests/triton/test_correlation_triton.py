"""The Triton kernels of the channel-correlation family across tiles, layouts and dtypes.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py); on a
GPU the same cases run on CUDA tensors. Every launcher buffer starts as NaN (the
kdops.triton._launch.POISON_OUTPUTS hook, on for the whole file), so a passing case also proves that every output
element is written. Tile overrides of 16 make the small inputs cross several C, L and row tiles.
The oracle is the reference in float64 on the same (rounded) inputs.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kdops import backend as kd_backend  # noqa: E402
from kdops.reference import correlation as reference  # noqa: E402
from kdops.triton import correlation as triton_corr  # noqa: E402
from tests.utils import TOLERANCES, cpu_and_cuda, make_layout, relative_error  # noqa: E402

OPS = torch.ops.kdops_triton


@pytest.fixture(params=cpu_and_cuda())
def device(request):
    if request.param == "cpu" and not kd_backend.triton_interpreting():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr("kdops.triton._launch.POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_corr, "_LAUNCH_OVERRIDES", {"block": 16, "block_l": 16, "block_rows": 16})


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """make_layout's layouts, and "h-slice": every other row of a twice-as-tall buffer, whose
    spatial dims do not merge into one stride (the launchers copy it once)."""
    if name != "h-slice":
        return make_layout(x, name)
    tall = torch.empty(*x.shape[:2], 2 * x.shape[2], *x.shape[3:], dtype=x.dtype, device=x.device)
    tall[:, :, ::2] = x
    return tall[:, :, ::2]


def randn(shape, dtype, device, name="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    return layout(torch.randn(shape, generator=g).to(dtype).to(device), name)


def check(fn, ref_fn, inputs, loss_tol, grad_tol, weights=None):
    args = [x.detach().requires_grad_(True) for x in inputs]
    args64 = [x.detach().double().cpu().requires_grad_(True) for x in inputs]
    out, expected = fn(*args), ref_fn(*args64)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert relative_error(out, expected) <= loss_tol
    w = torch.ones(()) if weights is None else weights
    grads = torch.autograd.grad((out * w.to(out)).sum(), args)
    grads64 = torch.autograd.grad((expected * w.double()).sum(), args64)
    for x, grad, grad64 in zip(inputs, grads, grads64):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        assert torch.isfinite(grad).all(), "unwritten (NaN) or non-finite gradient"
        assert relative_error(grad, grad64) <= grad_tol


# (student, teacher): C and L across several 16-wide tiles, odd tails.
PAIRWISE_SHAPES = [
    pytest.param(((1, 20, 3, 7), (1, 20, 3, 7)), id="C20-L21"),       # L > C: the C × C tiles
    pytest.param(((1, 33, 2, 9), (1, 17, 2, 9)), id="Cs33-Ct17-L18"),  # L ≤ C: the L × L tiles
    pytest.param(((2, 3, 5, 7), (2, 18, 5, 7)), id="Cs3-Ct18-L35"),
]


@pytest.mark.parametrize("shapes", PAIRWISE_SHAPES)
@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_across_tiles(device, shapes, detach_norm):
    s, t = randn(shapes[0], torch.float32, device, seed=1), randn(shapes[1], torch.float32, device, seed=2)
    check(lambda a, b: OPS.pairwise_affinity_loss(a, b, detach_norm)[0],
          lambda a, b: reference.pairwise_affinity_loss(a, b, detach_norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("name", ["channels_last", "strided", "h-slice"])
def test_pairwise_dtypes_and_layouts(device, dtype, loss_tol, grad_tol, name):
    s, t = randn((1, 18, 3, 7), dtype, device, name, 3), randn((1, 18, 3, 7), dtype, device, name, 4)
    check(lambda a, b: OPS.pairwise_affinity_loss(a, b, False)[0],
          lambda a, b: reference.pairwise_affinity_loss(a, b), [s, t], loss_tol, grad_tol)


@pytest.mark.parametrize("norm", ["row", "l", "none"])
@pytest.mark.parametrize("lengths", [pytest.param((21, 21), id="L21"), pytest.param((35, 8), id="L35-vs-L8")])
def test_correlation_loss_across_tiles(device, norm, lengths):
    s = randn((2, 20, 1, lengths[0]), torch.float32, device, seed=5)
    t = randn((2, 20, 1, lengths[1]), torch.float32, device, seed=6)
    check(lambda a, b: OPS.channel_correlation_loss(a, b, norm),
          lambda a, b: reference.channel_correlation_loss(a, b, norm), [s, t], 1e-5, 1e-5)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", TOLERANCES)
@pytest.mark.parametrize("name", ["channels_last", "h-slice"])
def test_correlation_loss_dtypes_and_layouts(device, dtype, loss_tol, grad_tol, name):
    s, t = randn((1, 17, 3, 6), dtype, device, name, 7), randn((1, 17, 3, 6), dtype, device, name, 8)
    check(lambda a, b: OPS.channel_correlation_loss(a, b, "row"),
          lambda a, b: reference.channel_correlation_loss(a, b, "row"), [s, t], loss_tol, grad_tol)


@pytest.mark.parametrize("norm", ["row", "l", "none"])
def test_channel_correlation_across_tiles(device, norm):
    x = randn((2, 19, 3, 7), torch.float32, device, "channels_last", 9)
    weights = torch.randn(2, 19, 19, generator=torch.Generator().manual_seed(10))
    check(lambda a: OPS.channel_correlation(a, norm)[0],
          lambda a: reference.channel_correlation(a, norm), [x], 1e-5, 1e-5, weights)


def test_near_cancelling_across_tiles(device):
    s = randn((1, 20, 3, 7), torch.float32, device, seed=11)
    t = s + 1e-3 * randn((1, 20, 3, 7), torch.float32, device, seed=12)
    check(lambda a, b: OPS.pairwise_affinity_loss(a, b, False)[0],
          lambda a, b: reference.pairwise_affinity_loss(a, b), [s, t], 1e-5, 1e-5)
    check(lambda a, b: OPS.channel_correlation_loss(a, b, "row"),
          lambda a, b: reference.channel_correlation_loss(a, b, "row"), [s, t], 1e-5, 1e-5)


def test_bitwise_deterministic(device):
    s, t = randn((1, 20, 3, 7), torch.float32, device, seed=13), randn((1, 20, 3, 7), torch.float32, device, seed=14)
    results = []
    for _ in range(2):
        a, b = s.detach().requires_grad_(True), t.detach().requires_grad_(True)
        losses = (OPS.pairwise_affinity_loss(a, b, False)[0], OPS.channel_correlation_loss(a, b, "row"))
        results.append(losses + torch.autograd.grad(sum(losses), (a, b)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_rejects_float64(device):
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        OPS.pairwise_affinity_loss(x, x, False)
