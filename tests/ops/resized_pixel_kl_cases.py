"""Cases and checks shared by the tests of the resized_pixel_kl kernels (pixel_kl with size=):
every backend's op (test_resized_pixel_kl.py) and the CUDA kernels' per-thread code built for the
host (test_resized_pixel_kl_threads.py), both against the float64 reference and oracle here."""
from __future__ import annotations

import pytest
import torch

from kdops.reference import softmax_kl as ref
# One assert_grad_close for the softmax-KL and resized tests: relative norm and every element.
from tests.ops.test_softmax_kl import assert_grad_close  # noqa: F401

# (N, C, h, w) → (H, W): 8× up (the APD/CIRKD case), odd factors, down, one axis kept, size-1
# input and output dims, C = 1 (KL 0) and C = 19.
RESIZE_CASES = [
    pytest.param((2, 3, 4, 5), (32, 40), id="up8-4x5-32x40"),
    pytest.param((2, 5, 3, 7), (8, 11), id="odd-3x7-8x11"),
    pytest.param((1, 4, 9, 11), (4, 5), id="down-9x11-4x5"),
    pytest.param((2, 3, 5, 6), (5, 13), id="rows-kept-5x6-5x13"),
    pytest.param((2, 3, 1, 6), (4, 9), id="h1-1x6-4x9"),
    pytest.param((1, 2, 5, 1), (3, 4), id="w1-5x1-3x4"),
    pytest.param((2, 3, 4, 6), (1, 5), id="H1-4x6-1x5"),
    pytest.param((1, 3, 4, 6), (3, 1), id="W1-4x6-3x1"),
    pytest.param((1, 2, 3, 3), (1, 1), id="to-1x1"),
    pytest.param((1, 1, 3, 3), (7, 7), id="C1-3x3-7x7"),
    pytest.param((1, 19, 5, 6), (40, 48), id="C19-up8"),
]
ALIGN = [pytest.param(False, id="half-pixel"), pytest.param(True, id="align-corners")]


def make_logits(shape, dtype=torch.float32, device="cpu", seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(shape, generator=g)).to(dtype)
    t = (scale * torch.randn(shape, generator=g)).to(dtype)
    return s.to(device), t.to(device)


def make_target(batch, size, num_classes, device="cpu", ignored=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (batch, *size), generator=g)
    target[torch.rand(target.shape, generator=g) < ignored] = 255
    return target.to(device)


def exact_taps(in_size, out_size, align_corners, dtype=torch.float64):
    """(i0, i1, λ) along one axis: F.interpolate's source position as the exact fraction a/b
    (a = i·(in − 1), b = max(out − 1, 1) with align_corners; a = max((2i + 1)·in − out, 0),
    b = 2·out without), i0 = a div b, λ = (a mod b)/b rounded once to dtype. Written here, apart
    from the reference, so that these tests do not move with it."""
    i = torch.arange(out_size, dtype=torch.int64)
    if align_corners:
        numerator, denominator = i * (in_size - 1), max(out_size - 1, 1)
    else:
        numerator, denominator = ((2 * i + 1) * in_size - out_size).clamp(min=0), 2 * out_size
    i0 = numerator // denominator
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (numerator % denominator).to(dtype) / denominator


def output_readers(in_size, out_size, align_corners, dtype=torch.float64):
    """(out, in) matrix: the weight of input r in output i, (1 − λ) at i0 plus λ at i1 (when
    λ > 0), in dtype."""
    i0, i1, lam = exact_taps(in_size, out_size, align_corners, dtype)
    m = torch.zeros(out_size, in_size, dtype=dtype)
    m[torch.arange(out_size), i0] += 1 - lam
    m[torch.arange(out_size), i1] += torch.where(lam > 0, lam, torch.zeros_like(lam))
    return m


def resize(x, size, align_corners):
    """(N, C, h, w) float64 → (N, C, H, W) bilinearly, a corner of weight 0 not read (so −inf
    reaches only the outputs that interpolate it)."""
    (h, w), (out_h, out_w) = x.shape[-2:], size
    y0, y1, wy = exact_taps(h, out_h, align_corners)
    x0, x1, wx = exact_taps(w, out_w, align_corners)
    zero = torch.zeros((), dtype=x.dtype)
    rows = (1 - wy[:, None]) * x[:, :, y0, :] + torch.where(wy[:, None] > 0, wy[:, None] * x[:, :, y1, :], zero)
    return (1 - wx) * rows[..., x0] + torch.where(wx > 0, wx * rows[..., x1], zero)


def target_ignoring_readers_of(batch, size, in_hw, pixel, align_corners, num_classes, device="cpu"):
    """A target with every output pixel that reads input pixel (r, j) (nonzero weight) ignored, the
    others valid: NaN at (r, j) may then reach nothing."""
    rows = output_readers(in_hw[0], size[0], align_corners)[:, pixel[0]] > 0
    cols = output_readers(in_hw[1], size[1], align_corners)[:, pixel[1]] > 0
    target = make_target(batch, size, num_classes, ignored=0.0)
    target[:, rows[:, None] & cols[None, :]] = 255
    return target.to(device)


def reference_loss_and_grads(s, t, tau, target, size, align_corners, ignore_index=255, device="cpu"):
    """The float64 reference's loss and gradients at the same (rounded) values, evaluated on
    device (a GPU for the realistic shapes) and returned on the CPU."""
    s64 = s.detach().double().to(device).requires_grad_(True)
    t64 = t.detach().double().to(device).requires_grad_(True)
    tgt = None if target is None else target.to(device)
    loss = ref.pixel_kl(s64, t64, tau, tgt, ignore_index, size=size, align_corners=align_corners)
    grad_s, grad_t = torch.autograd.grad(loss, (s64, t64))
    return loss.detach().cpu(), grad_s.cpu(), grad_t.cpu()


def gradient_unit(size, batch, tau, target, ignore_index=255):
    """τ/#valid: the largest magnitude of a resized pixel's gradient element (|q − p| ≤ 1)."""
    valid = batch * size[0] * size[1] if target is None else int((target != ignore_index).sum())
    return tau / max(valid, 1)


def resized_oracle(s, t, tau, target, size, align_corners, ignore_index=255):
    """Loss and gradients in float64 from the formulas, for inputs the reference's autograd cannot
    take (−inf, NaN): the logits resized by resize() (a corner of weight 0 is not read), ignored pixels' resized logits replaced by 0, the closed-form pixel_kl
    gradients τ·w·(q − p) and τ·w·p (log p − log q − KL) (0 where p = 0), w = 1/max(#valid, 1) (0
    at ignored pixels), transposed through the interpolation weights: grad[n, c] = Mᵧᵀ·G[n, c]·Mₓ."""
    in_hw = tuple(s.shape[2:])
    s = resize(s.detach().double().cpu(), size, align_corners)
    t = resize(t.detach().double().cpu(), size, align_corners)
    valid = torch.ones(s.shape[:1] + s.shape[2:], dtype=torch.bool)
    if target is not None:
        valid = target.cpu() != ignore_index
        s = s.masked_fill(~valid.unsqueeze(1), 0.0)
        t = t.masked_fill(~valid.unsqueeze(1), 0.0)
    w = (valid.double() / max(int(valid.sum()), 1)).unsqueeze(1)
    log_q = (s / tau).log_softmax(1)
    log_p = (t / tau).log_softmax(1)
    p, q = log_p.exp(), log_q.exp()
    zero = torch.zeros((), dtype=torch.float64)
    log_ratio = torch.where(p > 0, log_p - log_q, zero)
    kl = (p * log_ratio).sum(1, keepdim=True)
    loss = (kl * w).sum() * tau * tau
    grad_s = tau * w * (q - p)
    grad_t = torch.where(p > 0, tau * w * p * (log_ratio - kl), zero)
    return loss, transpose_resize(grad_s, in_hw, align_corners), transpose_resize(grad_t, in_hw, align_corners)


def transpose_resize(grad, in_hw, align_corners):
    """(N, C, H, W) gradient of the resized logits → (N, C, h, w): Mᵧᵀ·G·Mₓ in float64."""
    rows = output_readers(in_hw[0], grad.shape[2], align_corners)
    cols = output_readers(in_hw[1], grad.shape[3], align_corners)
    return torch.einsum("yr,ncyx,xj->ncrj", rows, grad, cols)
