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


def pixel_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Pixel-wise distillation loss.

    student, teacher: (N, C, *spatial) logits; target: (N, *spatial) labels or None.
    For each pixel: p = softmax_C(t / τ), q = softmax_C(s / τ); returns τ² · the mean of
    KL(p‖q) over valid pixels (target ≠ ignore_index; all pixels when target is None).
    No valid pixel gives 0.
    """
    acc = accumulation_dtype(student)
    student, teacher = student.to(acc), teacher.to(acc)
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
