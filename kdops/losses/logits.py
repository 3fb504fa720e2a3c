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
    """Channel-wise distillation: ``loss_weight`` · τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C).

    Equals mmrazor ``ChannelWiseDivergence(tau, loss_weight)`` and, with the 1×1 adapter that
    is built when ``student_channels != teacher_channels``, CIRKD
    ``CriterionCWD(s_channels, t_channels, norm_type="channel", divergence="kl", temperature=tau)``
    times ``loss_weight``. The adapter (bias-free 1×1 conv, student → teacher channels) is
    trained with the student.

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
        if self.adapter is not None:
            student = self.adapter(student)
        loss = kdops.channel_kl(student, like(teacher, student), self.tau, backend=self.backend)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"
