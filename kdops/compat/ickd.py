"""ICKD, inter-channel correlation distillation (ADLab-AutoDrive/ICKD,
``Cifar100/distiller_zoo/ICKD.py``): the drop-in ``ICKDLoss``.

``from distiller_zoo import ICKDLoss`` → ``from kdops.compat.ickd import ICKDLoss``; built as
ICKD's ``train_student.py`` does: ``opt.s_dim``, ``opt.feat_dim`` (= the teacher's width) set,
then ``ICKDLoss(opt)`` and ``criterion.embed_s`` put in the optimizer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kdops
from kdops.losses._common import ICKDEmbed, like

__all__ = ["Embed", "ICKDLoss"]


class Embed(ICKDEmbed):
    """ICKD's student embedding: bias-free 1×1 conv ``dim_in → dim_out``, then BatchNorm
    (named ``conv2d`` and ``l2norm`` as in ICKD, so its state dicts load)."""

    def __init__(self, dim_in: int = 256, dim_out: int = 128):
        super().__init__(dim_in, dim_out)


class ICKDLoss(nn.Module):
    """Inter-channel correlation: for each pair of the input lists, the student through
    ``embed_s`` (always, at equal widths too), then Σ (G_s − G_t)² / (C·N), G the
    row-normalised C × C Gram matrix = ``kdops.channel_correlation_loss(embed_s(f_s), f_t)``.
    The teacher is not detached.

    opt: any object with ``s_dim`` (student width) and ``feat_dim`` (the teacher's width).
    forward(g_s, g_t): sequences of (N, C_s, H, W) and (N, feat_dim, H', W') → list of scalars.
    """

    def __init__(self, opt, *, backend: str | None = None):
        super().__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.backend = backend

    def forward(self, g_s, g_t) -> list[torch.Tensor]:
        return [self.batch_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def batch_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s = self.embed_s(f_s)
        return kdops.channel_correlation_loss(f_s, like(f_t, f_s), "row", backend=self.backend)
