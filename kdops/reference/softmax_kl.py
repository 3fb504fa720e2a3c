"""Reference softmax-normalised KL losses: channel-wise (CWD) and pixel-wise (KD).

KL(p‖q) = Σ p (log p − log q), with p from the teacher and q from the student.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdops.reference._common import accumulation_dtype, flatten_spatial


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation loss.

    student, teacher: (N, C, *spatial), flattened to (N, C, L).
    For each (n, c): p = softmax_L(t[n, c] / τ), q = softmax_L(s[n, c] / τ);
    returns τ² · Σ_{n,c} KL(p‖q) / (N·C), a scalar.
    """
    n, c = student.shape[:2]
    log_q = F.log_softmax(flatten_spatial(student) / tau, dim=-1)
    log_p = F.log_softmax(flatten_spatial(teacher) / tau, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return kl * (tau * tau / (n * c))


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
    log_q = F.log_softmax(student.to(acc) / tau, dim=1)
    log_p = F.log_softmax(teacher.to(acc) / tau, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # (N, *spatial)
    if target is None:
        return kl.mean() * (tau * tau)
    valid = target != ignore_index
    total = torch.where(valid, kl, torch.zeros((), dtype=acc, device=kl.device)).sum()
    return total / valid.sum().clamp(min=1).to(acc) * (tau * tau)
