"""mmrazor (open-mmlab/mmrazor, ``mmrazor/models/losses/``): drop-in loss modules.

``from mmrazor.models.losses import ChannelWiseDivergence`` →
``from kdops.compat.mmrazor import ChannelWiseDivergence``. Config users call
:func:`register` once (``type='ChannelWiseDivergence'`` in a config then builds the kdops
class).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.compat._common import not_installed_error, same_spatial
from kdops.losses._common import like

__all__ = ["ATLoss", "ChannelWiseDivergence", "KLDivergence", "register"]

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")


class ChannelWiseDivergence(nn.Module):
    """CWD: ``loss_weight`` · τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C)
    = ``loss_weight · kdops.channel_kl(s, t, τ)``. The teacher is not detached (mmrazor does
    not): it receives the KL's gradient when it requires grad.

    forward(preds_S (N, C, H, W), preds_T (N, C, H, W)) → scalar.
    """

    def __init__(self, tau=1.0, loss_weight=1.0, *, backend: str | None = None):
        super().__init__()
        self.tau = tau
        self.loss_weight = loss_weight
        self.backend = backend

    def forward(self, preds_S: torch.Tensor, preds_T: torch.Tensor) -> torch.Tensor:
        loss = kdops.channel_kl(preds_S, like(preds_T, preds_S), self.tau, backend=self.backend)
        return self.loss_weight * loss


class KLDivergence(nn.Module):
    """KD: ``loss_weight`` · τ² · ``F.kl_div(log_softmax(s/τ), softmax(t/τ), reduction)``,
    softmax over dim 1, for (N, C) logits or (N, C, *spatial) maps. With KL_i the KL of
    position i (of L = the product of the spatial sizes) summed over C: ``'batchmean'``
    Σ KL_i / N, ``'sum'`` Σ KL_i, ``'mean'`` Σ KL_i / (N·C·L), all from
    ``kdops.pixel_kl``; ``'none'`` the elementwise terms τ² · p_t (log p_t − log q_s), a
    tensor of the input's shape (elementwise PyTorch). ``teacher_detach=True`` (default) stops
    the teacher's gradient.

    forward(preds_S, preds_T) → scalar (a tensor for ``reduction='none'``).
    """

    def __init__(self, tau: float = 1.0, reduction: str = "batchmean", loss_weight: float = 1.0,
                 teacher_detach: bool = True, *, backend: str | None = None):
        super().__init__()
        _checks.choice("reduction", reduction, KL_REDUCTIONS)
        self.tau = tau
        self.loss_weight = loss_weight
        self.teacher_detach = teacher_detach
        self.reduction = reduction
        self.backend = backend

    def forward(self, preds_S: torch.Tensor, preds_T: torch.Tensor) -> torch.Tensor:
        if self.teacher_detach:
            preds_T = preds_T.detach()
        preds_T = like(preds_T, preds_S)
        if self.reduction == "none":
            loss = F.kl_div(F.log_softmax(preds_S / self.tau, dim=1), F.softmax(preds_T / self.tau, dim=1),
                            reduction="none")
            return self.loss_weight * (self.tau**2 * loss)
        _checks.tensor("preds_S", preds_S, min_dim=2)
        n, c = preds_S.shape[:2]
        student = preds_S.reshape(n, c, -1)
        teacher = preds_T.reshape(preds_T.shape[0], preds_T.shape[1], -1)
        positions = student.shape[2]
        # pixel_kl = τ² · Σ_i KL_i / (N·L)
        loss = kdops.pixel_kl(student, teacher, self.tau, backend=self.backend)
        if self.reduction == "batchmean":
            loss = loss * positions
        elif self.reduction == "sum":
            loss = loss * (n * positions)
        else:
            loss = loss / c
        return self.loss_weight * loss


class ATLoss(nn.Module):
    """Attention transfer: ``loss_weight`` · mean over N·H·W of (a_s − a_t)², a the
    L2-normalised channel mean of x² = ``kdops.attention_loss(s, t, 2, "mean", "l2")``.
    No detach.

    forward(s_feature (N, C_s, H, W), t_feature (N, C_t, H, W)) → scalar.
    """

    def __init__(self, loss_weight: float = 1.0, *, backend: str | None = None):
        super().__init__()
        self.loss_weight = loss_weight
        self.backend = backend

    def forward(self, s_feature: torch.Tensor, t_feature: torch.Tensor) -> torch.Tensor:
        same_spatial("s_feature", s_feature, "t_feature", t_feature)
        loss = kdops.attention_loss(s_feature, like(t_feature, s_feature), 2, "mean", "l2", backend=self.backend)
        return self.loss_weight * loss


LOSSES = (ATLoss, ChannelWiseDivergence, KLDivergence)


def register(registry=None, *, prefix: str = "", force: bool = True) -> dict[str, type]:
    """Registers ``ATLoss``, ``ChannelWiseDivergence`` and ``KLDivergence`` in an mmrazor
    registry, under ``prefix + class name``.

    registry: an object with mmengine's ``register_module(name=, module=, force=)``; default
    mmrazor's own (``mmrazor.registry.MODELS`` in mmrazor 1.x, ``mmrazor.models.builder.LOSSES``
    in 0.x). With the default ``prefix=""`` and ``force=True`` the kdops classes replace
    mmrazor's under the same names, so existing configs (``type='ChannelWiseDivergence'``)
    build them unchanged; ``prefix="Kdops"`` adds ``KdopsChannelWiseDivergence`` etc. beside
    them. Returns {registered name: class}. Raises ImportError when no registry is given and
    mmrazor is not installed.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if registry is None:
        registry = _mmrazor_registry()
    if not callable(getattr(registry, "register_module", None)):
        raise TypeError(f"registry must have a register_module method, got {type(registry).__name__}")
    registered = {}
    for cls in LOSSES:
        name = prefix + cls.__name__
        registry.register_module(name=name, module=cls, force=force)
        registered[name] = cls
    return registered


def _mmrazor_registry():
    try:
        from mmrazor.registry import MODELS  # mmrazor 1.x
        return MODELS
    except ImportError:
        pass
    try:
        from mmrazor.models.builder import LOSSES as registry  # mmrazor 0.x
        return registry
    except ImportError:
        raise not_installed_error("mmrazor") from None
