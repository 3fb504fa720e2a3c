"""Correlation losses: SKD pair-wise affinity, ICKD, and adaptive channel-wise feature
distillation (ACFD)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.losses._common import ICKDEmbed, conv1x1_adapter, like, weight_arg


class PairwiseAffinity(nn.Module):
    """SKD pair-wise distillation: ``loss_weight`` · Σ (A_s − A_t)² / (N·L²), A = X̂ᵀX̂ the
    L × L cosine affinity of the pixels' features (never formed: the op works on C × C
    Gram matrices, so full-resolution features fit in memory).

    With ``pool_scale=None`` (default) the features are used at full resolution. With a scale
    s, both are first max-pooled with kernel = stride = (⌊H·s⌋, ⌊W·s⌋) (ceil mode), which is
    SKD's ``CriterionPairWiseforWholeFeatAfterPool(scale=s)`` (upstream default s = 0.5; its
    norm adds 1e-8 where kdops clamps at 1e-12). Channels may differ. ``detach_norm=True``
    (default) treats the per-pixel norm as a constant for the gradient, as SKD's code does
    (values and gradients equal SKD's); ``False`` differentiates through it, as CIRKD's
    ``CriterionStructuralKD`` (``F.normalize``) does.

    forward(student (N, C_s, H, W), teacher (N, C_t, H, W)) → scalar.
    """

    def __init__(self, loss_weight: float = 1.0, pool_scale: float | None = None, *, detach_norm: bool = True,
                 backend: str | None = None):
        super().__init__()
        self.detach_norm = bool(detach_norm)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.pool_scale = None if pool_scale is None else _checks.positive_finite("pool_scale", pool_scale)
        self.backend = backend

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(max(1, int(d * self.pool_scale)) for d in x.shape[-2:])
        return F.max_pool2d(x, kernel, kernel, ceil_mode=True)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = like(teacher, student)
        if self.pool_scale is not None:
            student, teacher = self._pool(student), self._pool(teacher)
        return self.loss_weight * kdops.pairwise_affinity_loss(
            student, teacher, detach_norm=self.detach_norm, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, pool_scale={self.pool_scale}, detach_norm={self.detach_norm}"


class ICKD(nn.Module):
    """Inter-channel correlation distillation (Liu et al., ICCV 2021): ``loss_weight`` ·
    Σ (G_s − G_t)² / (N·C), G = X Xᵀ with each row L2-normalised.

    Equals ICKD's ``ICKDLoss(opt).batch_loss`` (s_dim = student_channels, feat_dim =
    teacher_channels): the student first goes through ICKD's embed, a bias-free 1×1 conv to the
    teacher's width and BatchNorm, at equal widths too (trained with the student). Without
    channel counts there is no embed: the Gram loss of the features as given.

    forward(student (N, C_s, H, W), teacher (N, C_t, H', W')) → scalar.
    """

    def __init__(self, student_channels: int | None = None, teacher_channels: int | None = None,
                 loss_weight: float = 1.0, *, backend: str | None = None):
        super().__init__()
        no_embed = student_channels is None or teacher_channels is None
        self.adapter = None if no_embed else ICKDEmbed(student_channels, teacher_channels)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            student = self.adapter(student)
        loss = kdops.channel_correlation_loss(student, like(teacher, student), "row", backend=self.backend)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"


class AdaptiveChannelFeatureDistillation(nn.Module):
    """Adaptive channel-wise feature distillation (ACFD): three terms on three levels.

    * ``feature``: ``feature_weight`` · (1/N) Σ_{n,i} A_t[n, i] · mean_c (s'[n, c, i] − t[n, c, i])²
      on a backbone stage, where s' is the student stage through a 1×1 adapter to the
      teacher's width (when they differ) and A_t = ``attention_map(t)`` the teacher's spatial
      attention (softmax of Σ_c t_c² over positions, summing to 1 per image): the feature
      mimicry is weighted towards the positions the teacher attends to;
    * ``correlation``: ``correlation_weight`` · ``channel_correlation_loss`` (row-normalised
      C × C Gram matrices, as ICKD) of the fusion features, with a 1×1 adapter when the widths
      differ;
    * ``channel_kl``: ``logit_weight`` · ``channel_kl(τ)``: the channel significance (softmax
      over space per class channel) of the logits, as CWD.

    Every adapter is trained with the student. There is no official code to match; the
    defaults (weights 1, 1, 3 and τ = 4 as CWD's logit setting) are this library's.

    forward(student_stage, teacher_stage, student_fusion, teacher_fusion, student_logits,
    teacher_logits), each (N, C, H, W) with matching H, W per pair → dict of weighted scalars.
    """

    def __init__(self, stage_channels: tuple[int, int], fusion_channels: tuple[int, int], *,
                 tau: float = 4.0, feature_weight: float = 1.0, correlation_weight: float = 1.0,
                 logit_weight: float = 3.0, backend: str | None = None):
        super().__init__()
        self.stage_adapter = conv1x1_adapter(*stage_channels)
        self.fusion_adapter = conv1x1_adapter(*fusion_channels)
        self.tau = _checks.positive_finite("tau", tau)
        self.feature_weight = weight_arg("feature_weight", feature_weight)
        self.correlation_weight = weight_arg("correlation_weight", correlation_weight)
        self.logit_weight = weight_arg("logit_weight", logit_weight)
        self.backend = backend

    def forward(self, student_stage: torch.Tensor, teacher_stage: torch.Tensor,
                student_fusion: torch.Tensor, teacher_fusion: torch.Tensor,
                student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage_adapter is not None:
            student_stage = self.stage_adapter(student_stage)
        if student_stage.shape != teacher_stage.shape:
            raise ValueError(
                f"teacher_stage must have the shape of the adapted student stage "
                f"{tuple(student_stage.shape)}, got {tuple(teacher_stage.shape)}"
            )
        attention = kdops.attention_map(teacher_stage, 2, "sum", "softmax", backend=self.backend)
        squared = (student_stage.float() - teacher_stage.float()).pow(2).mean(1)
        feature = (attention * squared).sum() / student_stage.shape[0]

        if self.fusion_adapter is not None:
            student_fusion = self.fusion_adapter(student_fusion)
        correlation = kdops.channel_correlation_loss(student_fusion, like(teacher_fusion, student_fusion),
                                                     "row", backend=self.backend)
        channel = kdops.channel_kl(student_logits, like(teacher_logits, student_logits), self.tau,
                                   backend=self.backend)
        return {
            "feature": self.feature_weight * feature,
            "correlation": self.correlation_weight * correlation,
            "channel_kl": self.logit_weight * channel,
        }

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, feature_weight={self.feature_weight}, "
                f"correlation_weight={self.correlation_weight}, logit_weight={self.logit_weight}")
