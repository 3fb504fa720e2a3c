"""Small helpers shared by the loss modules."""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` in ``ref``'s dtype: the ops take student and teacher of one dtype, and under
    autocast an adapter's output (float32 weights) and a teacher feature may disagree."""
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


def resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) bilinearly resized to ``ref``'s H, W (unchanged when equal)."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def weight_arg(name: str, value) -> float:
    """A loss weight: a finite number ≥ 0."""
    value = _checks.finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def conv1x1_adapter(in_channels: int | None, out_channels: int | None) -> nn.Module | None:
    """A bias-free 1×1 conv from ``in_channels`` to ``out_channels``; None when they are equal
    (or not given), since an adapter there would only add parameters to a matching pair."""
    if in_channels is None or out_channels is None:
        return None
    _checks.integer("student_channels", in_channels, minimum=1)
    _checks.integer("teacher_channels", out_channels, minimum=1)
    if in_channels == out_channels:
        return None
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)


class ICKDEmbed(nn.Sequential):
    """ICKD's student embedding: a bias-free 1×1 conv, then BatchNorm (ICKD's ``Embed``, whose
    BatchNorm is named ``l2norm``; the sub-module names keep its state-dict keys). ICKD always
    embeds the student, at equal widths too: the BatchNorm is part of the method."""

    def __init__(self, in_channels: int, out_channels: int):
        _checks.integer("student_channels", in_channels, minimum=1)
        _checks.integer("teacher_channels", out_channels, minimum=1)
        super().__init__()
        self.add_module("conv2d", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False))
        self.add_module("l2norm", nn.BatchNorm2d(out_channels))


@functools.cache
def _pairwise_op_takes_detach_norm() -> bool:
    return "detach_norm" in inspect.signature(kdops.pairwise_affinity_loss).parameters


def pairwise_affinity(student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool,
                      backend: str | None) -> torch.Tensor:
    """``kdops.pairwise_affinity_loss`` with SKD's detached norm when ``detach_norm``.

    Until the op takes ``detach_norm`` (the correlation family adds it), the detached-norm loss
    is computed here by the same C × C Gram identity as the reference op, in float64; the op is
    used as soon as it has the argument.
    """
    if not detach_norm:
        return kdops.pairwise_affinity_loss(student, teacher, backend=backend)
    if _pairwise_op_takes_detach_norm():
        return kdops.pairwise_affinity_loss(student, teacher, detach_norm=True, backend=backend)
    return detached_norm_affinity_loss(student, teacher)


def detached_norm_affinity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Σ (A_s − A_t)² / (N·L²), A = X̂ᵀX̂ with x̂ = x / max(‖x‖₂, 1e-12) over channels and the
    norm a constant for the gradient (SKD's ``sim_dis_compute``). No L × L matrix is formed:
    Σ (A_s − A_t)² = ‖X̂_s X̂_sᵀ‖² − 2‖X̂_t X̂_sᵀ‖² + ‖X̂_t X̂_tᵀ‖² (C × C products), in float64
    because the three terms nearly cancel. student (N, C_s, *spatial), teacher (N, C_t, *spatial)
    → float32 scalar (float64 for float64 inputs)."""
    _checks.tensor("student", student, min_dim=3)
    _checks.tensor("teacher", teacher, min_dim=3)
    if teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the batch size and spatial shape of student {tuple(student.shape)}, "
            f"got shape {tuple(teacher.shape)}"
        )
    n = student.shape[0]

    def unit_columns(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(n, x.shape[1], -1).to(torch.float64)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12).detach()

    s, t = unit_columns(student), unit_columns(teacher)
    length = s.shape[2]
    total = ((s @ s.transpose(1, 2)).square().sum() - 2.0 * (t @ s.transpose(1, 2)).square().sum()
             + (t @ t.transpose(1, 2)).square().sum())
    out_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return (total / (n * length * length)).to(out_dtype)
