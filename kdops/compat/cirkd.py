"""CIRKD (github.com/winycg/CIRKD, ``losses/``): drop-in loss modules.

``from losses import CriterionCWD`` → ``from kdops.compat.cirkd import CriterionCWD``; the
constructors, forward arguments, values and gradients are CIRKD's (``train_kd.py`` builds
them as ``CriterionKD(temperature=T)``, ``CriterionCWD(s_channels, t_channels,
norm_type='channel', divergence='kl', temperature=4.)``, ``CriterionAT()``,
``CriterionStructuralKD()``, ``CriterionIFV(num_class)``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.compat._common import NO_CLASS, classes_or_no_class, same_spatial
from kdops.losses._common import like

__all__ = ["CriterionAT", "CriterionCWD", "CriterionIFV", "CriterionKD", "CriterionStructuralKD"]

CWD_NORM_TYPES = ("channel", "spatial", "channel_mean", "none")
CWD_DIVERGENCES = ("mse", "kl")


class CriterionKD(nn.Module):
    """Pixel-wise KD: τ² · Σ over the N·H·W pixels of KL(softmax_C(soft/τ) ‖ softmax_C(pred/τ))
    / (N·H·W) (``F.kl_div(..., reduction='batchmean')`` on (N·H·W, C) rows) =
    ``kdops.pixel_kl(pred, soft, τ)``. The teacher (``soft``) is not detached: it receives the
    KL's gradient when it requires grad, as in CIRKD.

    forward(pred (N, C, H, W), soft (N, C, H, W)) → scalar.
    """

    def __init__(self, temperature=1, *, backend: str | None = None):
        super().__init__()
        self.temperature = temperature
        self.backend = backend

    def forward(self, pred: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return kdops.pixel_kl(pred, like(soft, pred), self.temperature, backend=self.backend)


class CriterionCWD(nn.Module):
    """CIRKD's channel-wise distillation and its variants; the teacher is always detached.

    The student goes through ``self.conv`` (bias-free 1×1, s_channels → t_channels, always
    built, applied only when the widths differ); n, c, h, w are the student's shape *before*
    it. With T the temperature, s and t the student and teacher divided by T:

    * ``norm_type='channel'``: softmax over the H·W positions of each channel; ``'kl'``:
      T² · Σ KL(p_t ‖ p_s) / (n·c) (= ``kdops.channel_kl`` · C_t / c); ``'mse'``:
      T² · Σ (p_s − p_t)² / (n·c);
    * ``'spatial'``: softmax over the channels at each pixel; ``'kl'``: T² · Σ KL / (n·h·w)
      (= ``kdops.pixel_kl``); ``'mse'``: T² · Σ (p_s − p_t)² / (n·h·w);
    * ``'channel_mean'``: the spatial mean of each channel, m (no softmax); ``'kl'``:
      T² · Σ m_t (log m_t − log m_s) / (n·c) (NaN where a mean is negative, as upstream);
      ``'mse'``: T² · Σ (m_s − m_t)² / (n·c);
    * ``'none'``: the raw maps of the *first image only*, without temperature (upstream
      indexes ``preds[0]``); ``'kl'``: T² · Σ t₀ (log t₀ − log s₀) / (n·h·w); ``'mse'``:
      T² · Σ (s₀ − t₀)² / (n·h·w).

    ``divergence='mse'`` (CIRKD's default) works with temperature 1 whatever ``temperature``
    says: upstream sets ``self.temperature`` only for ``'kl'``, so its forward raises
    AttributeError for ``'mse'``. Only ``'channel'`` + ``'kl'`` and ``'spatial'`` + ``'kl'`` run
    on fused kernels; the other combinations are elementwise PyTorch (cheap next to them, or
    (N, C) sized).

    forward(preds_S (N, C_s, H, W), preds_T (N, C_t, H, W)) → scalar.
    """

    def __init__(self, s_channels, t_channels, norm_type="none", divergence="mse", temperature=1.0,
                 *, backend: str | None = None):
        super().__init__()
        _checks.choice("norm_type", norm_type, CWD_NORM_TYPES)
        _checks.choice("divergence", divergence, CWD_DIVERGENCES)
        self.norm_type = norm_type
        self.divergence = divergence
        self.temperature = temperature if divergence == "kl" else 1.0
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
        self.backend = backend

    def forward(self, preds_S: torch.Tensor, preds_T: torch.Tensor) -> torch.Tensor:
        _checks.tensor("preds_S", preds_S, ndim=4)
        _checks.tensor("preds_T", preds_T, ndim=4)
        n, c, h, w = preds_S.shape
        if preds_S.shape[1] != preds_T.shape[1]:
            preds_S = self.conv(preds_S)
        student, teacher = preds_S, like(preds_T.detach(), preds_S)
        tau = self.temperature
        kl = self.divergence == "kl"
        if self.norm_type == "channel":
            if kl:
                return kdops.channel_kl(student, teacher, tau, backend=self.backend) * (student.shape[1] / c)
            p_s = F.softmax(student.flatten(2) / tau, dim=-1)
            p_t = F.softmax(teacher.flatten(2) / tau, dim=-1)
            return (p_s - p_t).square().sum() / (n * c) * tau**2
        if self.norm_type == "spatial":
            if kl:
                same_spatial("preds_S", student, "preds_T", teacher)
                return kdops.pixel_kl(student, teacher, tau, backend=self.backend)
            p_s, p_t = F.softmax(student / tau, dim=1), F.softmax(teacher / tau, dim=1)
            return (p_s - p_t).square().sum() / (n * h * w) * tau**2
        if self.norm_type == "channel_mean":
            norm_s = (student / tau).flatten(2).mean(-1)
            norm_t = (teacher / tau).flatten(2).mean(-1)
            denominator = n * c
        else:
            norm_s, norm_t = student[0], teacher[0]
            denominator = n * h * w
        if kl:
            loss = F.kl_div(norm_s.log(), norm_t, reduction="sum")
        else:
            loss = (norm_s - norm_t).square().sum()
        return loss / denominator * tau**2


class CriterionAT(nn.Module):
    """Attention transfer, code form: mean over N·H·W of (a_s − a_t)², a = the L2-normalised
    channel mean of x² (p = 2) = ``kdops.attention_loss(s, t, 2, "mean", "l2")``. No detach.

    forward(feat_S (N, C_s, H, W), feat_T (N, C_t, H, W)) → scalar.
    """

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.p = 2
        self.backend = backend

    def forward(self, feat_S: torch.Tensor, feat_T: torch.Tensor) -> torch.Tensor:
        same_spatial("feat_S", feat_S, "feat_T", feat_T)
        return kdops.attention_loss(feat_S, like(feat_T, feat_S), self.p, "mean", "l2", backend=self.backend)


class CriterionStructuralKD(nn.Module):
    """CIRKD's structural (pair-wise) KD: both features max-pooled 2×2 (stride 2, ceil mode),
    then mean over N·L·L of (A_s − A_t)², A = X̂ᵀX̂ with x̂ = ``F.normalize`` over channels
    (the norm is differentiated, unlike SKD's) = ``kdops.pairwise_affinity_loss``. No detach.

    forward(feat_S (N, C_s, H, W), feat_T (N, C_t, H, W)) → scalar.
    """

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, feat_S: torch.Tensor, feat_T: torch.Tensor) -> torch.Tensor:
        same_spatial("feat_S", feat_S, "feat_T", feat_T)
        student = F.max_pool2d(feat_S, 2, 2, ceil_mode=True)
        teacher = F.max_pool2d(like(feat_T, feat_S), 2, 2, ceil_mode=True)
        return kdops.pairwise_affinity_loss(student, teacher, backend=self.backend)


def intra_class_variation(feat_S: torch.Tensor, feat_T: torch.Tensor, target: torch.Tensor,
                          num_classes: int, backend: str | None) -> torch.Tensor:
    """IFVD's loss as IFVD and CIRKD compute it: ``kdops.class_variation_loss`` with every
    label outside [0, num_classes) (255, CIRKD's -1) a pixel of no class (cosine 1 in both)."""
    same_spatial("feat_S", feat_S, "feat_T", feat_T)
    labels = classes_or_no_class(target, num_classes)
    return kdops.class_variation_loss(feat_S, like(feat_T, feat_S), labels, num_classes, NO_CLASS,
                                      backend=backend)


class CriterionIFV(nn.Module):
    """Intra-class feature variation distillation: mean over N·H·W of (m_s − m_t)², m the
    cosine of each pixel's feature to its class's per-image mean feature (labels resized to
    the feature by nearest neighbour; a pixel of no class — any label outside [0, classes) —
    has m = 1). The teacher is not detached (CIRKD computes ``feat_T.detach()`` but uses
    ``feat_T``).

    forward(feat_S (N, C_s, H, W), feat_T (N, C_t, H, W), target (N, H_l, W_l)) → scalar.
    """

    def __init__(self, classes, *, backend: str | None = None):
        super().__init__()
        self.num_classes = _checks.integer("classes", classes, minimum=1)
        self.backend = backend

    def forward(self, feat_S: torch.Tensor, feat_T: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return intra_class_variation(feat_S, feat_T, target, self.num_classes, self.backend)
