"""torchdistill (yoshitomo-matsubara/torchdistill, ``torchdistill/losses/mid_level.py``, 1.x):
drop-in middle-level losses with torchdistill's io-dict forward.

``from torchdistill.losses.mid_level import KDLoss`` → ``from kdops.compat.torchdistill import
KDLoss``; YAML configs (``key: 'KDLoss'``) build the kdops classes after :func:`register`.
A feature is read as torchdistill reads it: ``io_dict[path][io]``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops.compat._common import not_installed_error, same_spatial
from kdops.losses._common import like

__all__ = ["ATLoss", "ChSimLoss", "KDLoss", "register"]

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")
AT_MODES = ("code", "paper")


def _extract_feature_map(io_dict, feature_map_config) -> torch.Tensor:
    return io_dict[feature_map_config["path"]][feature_map_config["io"]]


class KDLoss(nn.Module):
    """Standard KD (Hinton et al.) on logits read from the io-dicts.

    soft_loss = ``nn.KLDivLoss(reduction)(log_softmax(s/T, 1), softmax(t/T, 1))`` — *without*
    T² — from ``kdops.pixel_kl`` (for 'batchmean' Σ KL / N, 'sum' Σ KL, 'mean' Σ KL / numel;
    'none' the elementwise terms, elementwise PyTorch). When ``alpha`` is None or 0 or no
    ``targets`` are given the loss is soft_loss; otherwise
    ``alpha · CrossEntropyLoss(reduction', **kwargs)(s, targets) + beta · T² · soft_loss``,
    reduction' = 'mean' for 'batchmean', beta = 1 − alpha unless given. The teacher is not
    detached. (Upstream computes ``1 - alpha`` even when alpha is None, a TypeError unless
    beta is given; here beta then stays None, unused since the loss is soft_loss.)

    forward(student_io_dict, teacher_io_dict, targets=None) → scalar.
    """

    def __init__(self, student_module_path, student_module_io, teacher_module_path, teacher_module_io,
                 temperature, alpha=None, beta=None, reduction="batchmean", *, backend: str | None = None,
                 **kwargs):
        super().__init__()
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.temperature = temperature
        self.alpha = alpha
        self.beta = (None if alpha is None else 1 - alpha) if beta is None else beta
        cel_reduction = "mean" if reduction == "batchmean" else reduction
        self.cross_entropy_loss = nn.CrossEntropyLoss(reduction=cel_reduction, **kwargs)
        self.backend = backend

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        tau = self.temperature
        teacher_logits = like(teacher_logits, student_logits)
        if self.reduction == "none":
            return F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.softmax(teacher_logits / tau, dim=1),
                            reduction="none")
        n, c = student_logits.shape[:2]
        student = student_logits.reshape(n, c, -1)
        teacher = teacher_logits.reshape(teacher_logits.shape[0], teacher_logits.shape[1], -1)
        positions = student.shape[2]
        # pixel_kl = T² · Σ_i KL_i / (N·L): undo T² and the mean to get KLDivLoss's reduction.
        loss = kdops.pixel_kl(student, teacher, tau, backend=self.backend) / tau**2
        if self.reduction == "batchmean":
            return loss * positions
        if self.reduction == "sum":
            return loss * (n * positions)
        return loss / c

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs) -> torch.Tensor:
        student_logits = student_io_dict[self.student_module_path][self.student_module_io]
        teacher_logits = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        soft_loss = self.soft_loss(student_logits, teacher_logits)
        if self.alpha is None or self.alpha == 0 or targets is None:
            return soft_loss
        hard_loss = self.cross_entropy_loss(student_logits, targets)
        return self.alpha * hard_loss + self.beta * (self.temperature**2) * soft_loss


class ATLoss(nn.Module):
    """Attention transfer over the ``at_pairs`` of the io-dicts, each pair weighted by its
    ``weight`` (default 1). ``mode='code'`` (the AT authors' code): Σ weight · mean over N·H·W
    of (a_s − a_t)², a the L2-normalised channel mean of x² (``kdops.attention_loss``);
    ``mode='paper'`` (the paper's Eq. 2): Σ weight · Σ_n ‖a_s[n] − a_t[n]‖₂ / N, a the
    L2-normalised channel sum of x² (``kdops.attention_map``), N the first pair's batch size.
    No detach.

    forward(student_io_dict, teacher_io_dict) → scalar.
    """

    def __init__(self, at_pairs, mode="code", *, backend: str | None = None, **kwargs):
        super().__init__()
        self.at_pairs = at_pairs
        self.mode = mode
        if mode not in AT_MODES:
            raise ValueError("mode `{}` is not expected".format(mode))
        self.backend = backend

    def pair_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        same_spatial("student feature", student, "teacher feature", teacher)
        teacher = like(teacher, student)
        if self.mode == "code":
            return kdops.attention_loss(student, teacher, 2, "mean", "l2", backend=self.backend)
        a_s = kdops.attention_map(student, 2, "sum", "l2", backend=self.backend)
        a_t = kdops.attention_map(teacher, 2, "sum", "l2", backend=self.backend)
        return torch.linalg.vector_norm((a_s - a_t).flatten(1), dim=1).sum()

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        at_loss = 0
        batch_size = None
        for pair_config in self.at_pairs.values():
            student = _extract_feature_map(student_io_dict, pair_config["student"])
            teacher = _extract_feature_map(teacher_io_dict, pair_config["teacher"])
            at_loss = at_loss + pair_config.get("weight", 1) * self.pair_loss(student, teacher)
            if batch_size is None:
                batch_size = len(student)
        return at_loss / batch_size if self.mode == "paper" else at_loss


class ChSimLoss(nn.Module):
    """ICKD's inter-channel correlation loss over the ``feature_pairs`` of the io-dicts:
    Σ weight · Σ (G_s − G_t)² / (C·N²), G the row-normalised C × C Gram matrix (torchdistill
    divides ICKD's batch loss once more by N) = ``kdops.channel_correlation_loss(s, t) / N``.
    The student's embedding is a module of the student wrapper (torchdistill's
    ``Student4ICKD``), not of this loss. No detach.

    forward(student_io_dict, teacher_io_dict) → scalar.
    """

    def __init__(self, feature_pairs, *, backend: str | None = None, **kwargs):
        super().__init__()
        self.feature_pairs = feature_pairs
        self.backend = backend

    def batch_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        loss = kdops.channel_correlation_loss(f_s, like(f_t, f_s), "row", backend=self.backend)
        return loss / f_s.shape[0]

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs) -> torch.Tensor:
        chsim_loss = 0
        for pair_config in self.feature_pairs.values():
            teacher = _extract_feature_map(teacher_io_dict, pair_config["teacher"])
            student = _extract_feature_map(student_io_dict, pair_config["student"])
            chsim_loss = chsim_loss + pair_config.get("weight", 1) * self.batch_loss(student, teacher)
        return chsim_loss


LOSSES = (ATLoss, ChSimLoss, KDLoss)


def register(registry=None, *, prefix: str = "") -> dict[str, type]:
    """Registers ``ATLoss``, ``ChSimLoss`` and ``KDLoss`` as torchdistill middle-level losses,
    under ``prefix + class name``.

    registry: a decorator factory like torchdistill's ``register_mid_level_loss``, called as
    ``registry(key=name)(cls)``; default torchdistill's own (torchdistill ≥ 1.0). With the
    default ``prefix=""`` the kdops classes replace torchdistill's under the same keys, so
    YAML configs (``key: 'KDLoss'``) build them unchanged. Returns {registered name: class}.
    Raises ImportError when no registry is given and torchdistill (1.x) is not installed.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    if registry is None:
        try:
            from torchdistill.losses.registry import register_mid_level_loss as registry
        except ImportError:
            raise not_installed_error("torchdistill") from None
    if not callable(registry):
        raise TypeError(f"registry must be callable as registry(key=name)(cls), got {type(registry).__name__}")
    registered = {}
    for cls in LOSSES:
        name = prefix + cls.__name__
        registry(key=name)(cls)
        registered[name] = cls
    return registered
