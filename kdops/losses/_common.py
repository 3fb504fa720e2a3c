"""Small helpers shared by the loss modules."""
from __future__ import annotations

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
