"""IFVD, intra-class feature variation distillation (YukangWang/IFVD, ``utils/criterion.py``):
the drop-in ``CriterionIFV``, taking the models' output lists.

``from utils.criterion import CriterionIFV`` → ``from kdops.compat.ifvd import CriterionIFV``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from kdops import _checks
from kdops.compat._common import pick
from kdops.compat.cirkd import intra_class_variation

__all__ = ["CriterionIFV"]


class CriterionIFV(nn.Module):
    """Intra-class feature variation distillation of ``preds[2]`` (the PSPNet feature in
    IFVD's model outputs): mean over N·H·W of (m_s − m_t)², m the cosine of each pixel's
    feature to its class's per-image mean feature (labels resized by nearest neighbour; a
    pixel of no class — any label outside [0, classes), e.g. 255 — has m = 1)
    = ``kdops.class_variation_loss``. The teacher is not detached (IFVD's
    ``feat_T.detach()`` discards its result).

    forward(preds_S, preds_T, target (N, H_l, W_l)) → scalar.
    """

    def __init__(self, classes, *, backend: str | None = None):
        super().__init__()
        self.num_classes = _checks.integer("classes", classes, minimum=1)
        self.backend = backend

    def forward(self, preds_S, preds_T, target: torch.Tensor) -> torch.Tensor:
        feat_S, feat_T = pick("preds_S", preds_S, 2), pick("preds_T", preds_T, 2)
        return intra_class_variation(feat_S, feat_T, target, self.num_classes, self.backend)
