"""SKD, structured knowledge distillation (irfanICMLL/structure_knowledge_distillation,
``utils/criterion.py``): drop-in loss modules taking the models' output lists.

``from utils.criterion import CriterionPairWiseforWholeFeatAfterPool`` →
``from kdops.compat.skd import CriterionPairWiseforWholeFeatAfterPool``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.compat._common import pick, same_spatial
from kdops.losses._common import like

__all__ = ["CriterionPairWiseforWholeFeatAfterPool", "CriterionPixelWise"]


class CriterionPixelWise(nn.Module):
    """SKD's pixel-wise distillation on the first outputs: the cross-entropy
    Σ_pixels Σ_c −p_t log q_s summed over all N·H·W pixels and divided by H·W (not by N),
    p_t = softmax_C(preds_T[0]), q_s = softmax_C(preds_S[0]), no temperature.

    Computed as N · (KL(p_t ‖ q_s) + H(p_t)) averaged over pixels, both from the fused
    ``kdops.pixel_kl``: the entropy as H(p_t) = log C − KL(p_t ‖ uniform), the KL against a
    zero logit map. The teacher is not detached (SKD's ``preds_T[0].detach()`` discards its
    result): it receives the cross-entropy's gradient when it requires grad. The constructor
    arguments are SKD's and unused, as upstream.

    forward(preds_S, preds_T): sequences whose [0] is (N, C, H, W) logits → scalar.
    """

    def __init__(self, ignore_index=255, use_weight=True, reduce=True, *, backend: str | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.use_weight = use_weight
        self.reduce = reduce
        self.backend = backend

    def forward(self, preds_S, preds_T) -> torch.Tensor:
        student, teacher = pick("preds_S", preds_S, 0), pick("preds_T", preds_T, 0)
        _checks.tensor("preds_S[0]", student, ndim=4)
        _checks.tensor("preds_T[0]", teacher, ndim=4)
        if student.shape != teacher.shape:
            raise ValueError(
                f"preds_T[0] must have the shape of preds_S[0] {tuple(student.shape)}, got {tuple(teacher.shape)}"
            )
        teacher = like(teacher, student)
        n, c = student.shape[:2]
        kl = kdops.pixel_kl(student, teacher, 1.0, backend=self.backend)
        kl_to_uniform = kdops.pixel_kl(torch.zeros_like(teacher), teacher, 1.0, backend=self.backend)
        return n * (kl + (math.log(c) - kl_to_uniform))


class CriterionPairWiseforWholeFeatAfterPool(nn.Module):
    """SKD's pair-wise distillation of ``preds[feat_ind]``: both features max-pooled with
    kernel = stride = (⌊H·scale⌋, ⌊W·scale⌋) (the teacher's H, W; ceil mode), then
    Σ (A_s − A_t)² / (N·L²), A = X̂ᵀX̂ the cosine affinity of the pooled positions, with the
    per-pixel norm a constant for the gradient (SKD divides by ``L2(feat).detach()``). SKD adds
    1e-8 to the norm where kdops clamps it at 1e-12, and casts to float32 where kdops keeps
    float64 inputs in float64. The teacher is not detached (SKD's ``feat_T.detach()`` discards
    its result).

    forward(preds_S, preds_T): sequences whose [feat_ind] is (N, C, H, W) → scalar.
    """

    def __init__(self, scale, feat_ind, *, backend: str | None = None):
        super().__init__()
        self.scale = _checks.positive_finite("scale", scale)
        self.feat_ind = feat_ind
        self.backend = backend

    def forward(self, preds_S, preds_T) -> torch.Tensor:
        feat_S = pick("preds_S", preds_S, self.feat_ind)
        feat_T = pick("preds_T", preds_T, self.feat_ind)
        same_spatial(f"preds_S[{self.feat_ind}]", feat_S, f"preds_T[{self.feat_ind}]", feat_T)
        kernel = (int(feat_T.shape[2] * self.scale), int(feat_T.shape[3] * self.scale))
        if min(kernel) < 1:
            raise ValueError(
                f"scale={self.scale} makes a pooling kernel of {kernel} on features of size "
                f"{tuple(feat_T.shape[2:])}: it must be at least 1 × 1"
            )
        student = F.max_pool2d(feat_S, kernel, kernel, ceil_mode=True)
        teacher = F.max_pool2d(like(feat_T, feat_S), kernel, kernel, ceil_mode=True)
        return kdops.pairwise_affinity_loss(student, teacher, detach_norm=True, backend=self.backend)
