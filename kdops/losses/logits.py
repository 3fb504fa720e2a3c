"""Softmax-normalised KL losses: pixel-wise KD and channel-wise distillation (CWD)."""
from __future__ import annotations

import torch
import torch.nn as nn

import kdops
from kdops import _checks
from kdops.losses._common import conv1x1_adapter, like, weight_arg


class PixelKD(nn.Module):
    """Pixel-wise KD: ``loss_weight`` · τ² · mean over valid pixels of KL(p_t ‖ p_s), softmax
    over classes.

    Equals CIRKD ``CriterionKD(temperature=tau)`` (which flattens to (N·H·W, K) rows and takes
    ``F.kl_div(..., reduction="batchmean")``) times ``loss_weight``. With ``target`` given,
    pixels equal to ``ignore_index`` are left out of the mean (CIRKD uses all pixels: pass no
    target for its exact value).

    forward(student (N, K, H, W), teacher (N, K, H, W), target (N, H, W) or None) → scalar.
    """

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0, ignore_index: int = 255,
                 *, backend: str | None = None):
        super().__init__()
        self.tau = _checks.positive_finite("tau", tau)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        loss = kdops.pixel_kl(student, like(teacher, student), self.tau, target, self.ignore_index,
                              backend=self.backend)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"


class ChannelWiseDivergence(nn.Module):
    """Channel-wise distillation: ``loss_weight`` · τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s'/τ))
    / (N·C_s), s' the student (through the adapter when the widths differ), t the teacher, detached.

    The sum runs over the C_t channels of the (adapted) student and the teacher, and is divided
    by the student's own width C_s, as CIRKD ``CriterionCWD`` reads ``c`` from the student
    before its 1×1 conv: this module equals CIRKD ``CriterionCWD(student_channels,
    teacher_channels, norm_type="channel", divergence="kl", temperature=tau)`` times
    ``loss_weight`` at any widths (values and gradients: both detach the teacher). At equal
    widths (no adapter) it equals mmrazor ``ChannelWiseDivergence(tau, loss_weight)`` in value
    and student gradient; mmrazor does not detach the teacher (``kdops.compat.mmrazor`` does as
    mmrazor does). The adapter (bias-free 1×1 conv, student → teacher channels, built when
    ``student_channels != teacher_channels``) is trained with the student.

    forward(student (N, C_s, H, W), teacher (N, C_t, H, W)) → scalar.
    """

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0,
                 student_channels: int | None = None, teacher_channels: int | None = None,
                 *, backend: str | None = None):
        super().__init__()
        self.tau = _checks.positive_finite("tau", tau)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.adapter = conv1x1_adapter(student_channels, teacher_channels)
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student_channels = student.shape[1]
        if self.adapter is not None:
            student = self.adapter(student)
        loss = kdops.channel_kl(student, like(teacher.detach(), student), self.tau, backend=self.backend)
        # channel_kl divides by the C_t channels it sums over; CWD divides by the student's C_s.
        return (self.loss_weight * student.shape[1] / student_channels) * loss

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"
