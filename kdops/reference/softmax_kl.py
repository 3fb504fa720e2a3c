"""Reference softmax-normalised KL losses: channel-wise (CWD) and pixel-wise (KD).

KL(p‖q) = Σ p (log p − log q), with p from the teacher and q from the student.

The numerics every backend follows (DESIGN.md "Numerics"), written here the plain way:

* shift-safe: logits are max-shifted in input units *before* the division by τ, so x/τ of
  magnitude 1e4 keeps the digits of the differences that the softmax depends on;
* a teacher probability of exactly 0 (a logit of −inf) contributes 0 (0·log 0 = 0), whatever
  the student holds there;
* pixels that ``pixel_kl`` ignores are replaced by zeros before any arithmetic, so NaN or inf
  there reaches neither the loss nor the gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdops.reference._common import accumulation_dtype, flatten_spatial


def _log_softmax_shifted(x: torch.Tensor, tau: float, dim: int) -> torch.Tensor:
    """log softmax(x / τ) along ``dim``, with x shifted by its maximum before the scaling.

    The maximum is a constant for the gradient (the log-softmax does not depend on it); a
    row whose maximum is not finite is left unshifted (−inf − −inf would be NaN).
    """
    peak = x.detach().amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return F.log_softmax((x - peak) / tau, dim=dim)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p (log p − log q) elementwise, exactly 0 where p = 0 (also where log q is −inf)."""
    p = log_p.exp()
    difference = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=p.dtype, device=p.device))
    return p * difference


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation loss.

    student, teacher: (N, C, *spatial), flattened to (N, C, L).
    For each (n, c): p = softmax_L(t[n, c] / τ), q = softmax_L(s[n, c] / τ);
    returns τ² · Σ_{n,c} KL(p‖q) / (N·C), a scalar.
    """
    n, c = student.shape[:2]
    log_q = _log_softmax_shifted(flatten_spatial(student), tau, dim=-1)
    log_p = _log_softmax_shifted(flatten_spatial(teacher), tau, dim=-1)
    return _kl_terms(log_p, log_q).sum() * (tau * tau / (n * c))


def bilinear_source(in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of ``out_size`` positions reads along one axis of ``in_size``: the source
    positions of ``F.interpolate(mode="bilinear")``, src = i·(in − 1)/(out − 1) (align_corners;
    0 when out = 1), else max((i + ½)·in/out − ½, 0), as the exact fraction src = a/b of
    integers: i0 = a div b, λ = (a mod b)/b (one rounding), i1 = min(i0 + 1, in − 1). Returns
    (i0, i1, λ): x_r = (1 − λ)·x[i0] + λ·x[i1].

    Integer arithmetic makes λ exactly 0 wherever the position hits an input sample, in every
    precision and backend alike (F.interpolate's float32 src can leave a λ of 1e-7 there, which
    would read the neighbour); elsewhere λ differs from F.interpolate's by float32 round-off.
    """
    i = torch.arange(out_size, dtype=torch.int64, device=device)
    if align_corners:
        numerator, denominator = i * (in_size - 1), max(out_size - 1, 1)
    else:
        numerator, denominator = ((2 * i + 1) * in_size - out_size).clamp(min=0), 2 * out_size
    i0 = numerator // denominator
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0, i1, (numerator % denominator).to(dtype) / denominator


def _lerp(x0: torch.Tensor, x1: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1 − λ)·x0 + λ·x1, with x1 not read where λ = 0 (a −inf there stays out of the sum)."""
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return (1 - weight) * x0 + torch.where(weight > 0, weight * x1, zero)


def pixel_anchors(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, h, w): each pixel's largest finite value over C, 0 where none is finite
    (constants: detached)."""
    x = x.detach()
    finite = torch.where(torch.isfinite(x), x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))
    peak = finite.amax(dim=1, keepdim=True)
    return torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))


def bilinear_resize(x: torch.Tensor, size, align_corners: bool, *, anchored: bool = False) -> torch.Tensor:
    """(N, C, h, w) → (N, C, H, W): ``F.interpolate(x, size, mode="bilinear", align_corners=...)``
    written out (rows first, then columns), except that a corner of weight 0 is not read, so a
    logit of −inf (probability 0) reaches only the pixels that interpolate it.

    anchored: the values of each input pixel are taken less its anchor a (the largest finite
    value over C, :func:`pixel_anchors`) before the arithmetic. Each output pixel then comes out
    shifted by Σ_k w_k·a_k, the same for all its channels, which a softmax over C ignores; but
    every term rounds at the magnitude of x − a, not of x: logits with a common offset of 1e4
    keep float32 accuracy (the shift-safe rule of DESIGN.md carried through the resize).
    """
    if anchored:
        x = x - pixel_anchors(x)
    (h, w), (out_h, out_w) = x.shape[-2:], tuple(size)
    y0, y1, wy = bilinear_source(h, out_h, align_corners, x.dtype, x.device)
    x0, x1, wx = bilinear_source(w, out_w, align_corners, x.dtype, x.device)
    rows = _lerp(x[:, :, y0, :], x[:, :, y1, :], wy[:, None])
    return _lerp(rows[:, :, :, x0], rows[:, :, :, x1], wx)


def pixel_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = 255,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Pixel-wise distillation loss.

    student, teacher: (N, C, *spatial) logits; target: (N, *spatial) labels or None.
    For each pixel: p = softmax_C(t / τ), q = softmax_C(s / τ); returns τ² · the mean of
    KL(p‖q) over valid pixels (target ≠ ignore_index; all pixels when target is None).
    No valid pixel gives 0.

    With ``size`` = (H, W), (N, C, h, w) logits are first resized bilinearly to (H, W)
    (:func:`bilinear_resize`, anchored: shift-safe; APD and CIRKD-style KD at label resolution)
    and target is (N, H, W).
    """
    acc = accumulation_dtype(student)
    student, teacher = student.to(acc), teacher.to(acc)
    if size is not None:
        student = bilinear_resize(student, size, align_corners, anchored=True)
        teacher = bilinear_resize(teacher, size, align_corners, anchored=True)
    if target is not None:
        valid = (target != ignore_index).unsqueeze(1)
        zero = torch.zeros((), dtype=acc, device=student.device)
        student = torch.where(valid, student, zero)
        teacher = torch.where(valid, teacher, zero)
    log_q = _log_softmax_shifted(student, tau, dim=1)
    log_p = _log_softmax_shifted(teacher, tau, dim=1)
    kl = _kl_terms(log_p, log_q).sum(dim=1)  # (N, *spatial); 0 at ignored pixels
    if target is None:
        return kl.mean() * (tau * tau)
    return kl.sum() / valid.sum().clamp(min=1).to(acc) * (tau * tau)
