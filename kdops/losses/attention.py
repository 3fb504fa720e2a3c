"""Attention-map losses: AT, SAD / MAD, LGAD and CAMD."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

import kdops
from kdops import _checks
from kdops.losses._common import like, weight_arg
from kdops.ops.attention import attention_map_distance

SAD_PAIRS = ("consecutive", "all")
# Normalisations of a stage map over its positions, and how the squared differences of a pair
# are reduced over them (see SelfAttentionDistillation).
MAP_NORMS = ("softmax", "l2")
MAP_POSITIONS = ("mean", "sum")


def _map_distance(student_map: torch.Tensor, teacher_map: torch.Tensor, norm: str, positions: str) -> torch.Tensor:
    """mean over N·H·W (``positions="mean"``) or Σ over H·W, mean over N (``"sum"``) of the
    squared difference of two raw maps normalised by ``norm``, at the student map's size."""
    distance = attention_map_distance(student_map, teacher_map, norm)
    if positions == "sum":
        distance = distance * (student_map.shape[-2] * student_map.shape[-1])
    return distance


def _as_list(name: str, x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, torch.Tensor) for v in x):
        return list(x)
    raise TypeError(f"{name} must be a tensor or a non-empty sequence of tensors, got {type(x).__name__}")


def _pairs(name_s: str, student, name_t: str, teacher) -> list[tuple[torch.Tensor, torch.Tensor]]:
    student, teacher = _as_list(name_s, student), _as_list(name_t, teacher)
    if len(student) != len(teacher):
        raise ValueError(f"{name_s} and {name_t} must hold as many features, got {len(student)} and {len(teacher)}")
    return list(zip(student, teacher))


class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, code form): ``loss_weight`` · Σ over feature
    pairs of mean over N·H·W of (A_s − A_t)², A = l2-normalised mean over channels of |x|^p.

    Equals CIRKD ``CriterionAT()`` for one pair (and the paper code's ``at_loss`` summed over
    groups for several). Channels may differ; a teacher map of another H, W is resized to the
    student's before normalisation.

    The maps have unit norm, so the mean over positions shrinks as 1/(H·W): a weight tuned at
    one resolution is far too strong at a lower one. ``reference_positions=R`` multiplies each
    pair's loss by H·W / R, which keeps the upstream value at H·W = R and the same strength at
    any other resolution (None: the upstream value everywhere).

    forward(student, teacher): each (N, C, H, W) or a sequence of them → scalar.
    """

    def __init__(self, p: float = 2.0, loss_weight: float = 1.0, reference_positions: int | None = None,
                 *, backend: str | None = None):
        super().__init__()
        self.p = _checks.positive_finite("p", p)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.reference_positions = (None if reference_positions is None else
                                    _checks.integer("reference_positions", reference_positions, minimum=1))
        self.backend = backend

    def forward(self, student, teacher) -> torch.Tensor:
        total = 0.0
        for s, t in _pairs("student", student, "teacher", teacher):
            loss = kdops.attention_loss(s, like(t, s), self.p, "mean", "l2", backend=self.backend)
            if self.reference_positions is not None:
                loss = loss * (s.shape[-2] * s.shape[-1] / self.reference_positions)
            total = total + loss
        return self.loss_weight * total

    def extra_repr(self) -> str:
        return f"p={self.p}, loss_weight={self.loss_weight}, reference_positions={self.reference_positions}"


class SelfAttentionDistillation(nn.Module):
    """Self attention distillation within one network (SAD; MAD with ``pairs="all"``).

    ``loss_weight`` · Σ over stage pairs (i shallower than j) of mean over N·H_i·W_i of
    (A_i − A_j)², A = spatial softmax of Σ_c x_c², the deeper map bilinearly resized to the
    shallower's size (as ENet-SAD's ``at_gen``: sum of squares, upsample, softmax, MSE).
    ``pairs="consecutive"`` (SAD): j = i + 1; ``"all"`` (MAD, multi-level): every i < j, so
    each stage learns from all deeper ones. ``detach_target=True`` stops the gradient into the
    deeper stage (SAD lets it flow: both maps belong to the network being trained).

    forward(features): a sequence of (N, C_i, H_i, W_i), shallow to deep, at least two → scalar.

    Each stage's features are read once per step, whatever the number of pairs it is in: its raw
    map Σ_c x_c² (``attention_map(norm="none")``) is computed once and every pair resizes and
    normalises maps only (``attention_map_distance``); the backward reads each stage once more.

    ``norm`` and ``positions`` choose the form of the map-level loss. The defaults,
    ``norm="softmax", positions="mean"``, are ENet-SAD's (spatial softmax, ``MSELoss``
    averaged over the pixels). The softmax of Σ_c x_c² depends on the features' scale: on
    ERFNet's stages, whose Σ_c x_c² are in the hundreds, it is saturated (one position holds
    more than 90% of the mass at every stage, measured on the synthetic lanes), so the maps are
    argmax indicators and little gradient flows. ``norm="l2"`` divides each map by its L2 norm
    over the positions instead (attention transfer's normalisation: scale-free), and
    ``positions="sum"`` sums the squared differences over the H·W positions (mean over the
    batch) rather than averaging them, so that a pair's value, 2 − 2·cos(a_i, a_j) for L2
    maps, does not shrink with the resolution.
    """

    def __init__(self, p: float = 2.0, loss_weight: float = 1.0, pairs: str = "consecutive",
                 detach_target: bool = False, norm: str = "softmax", positions: str = "mean",
                 *, backend: str | None = None):
        super().__init__()
        self.p = _checks.positive_finite("p", p)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        _checks.choice("pairs", pairs, SAD_PAIRS)
        _checks.choice("norm", norm, MAP_NORMS)
        _checks.choice("positions", positions, MAP_POSITIONS)
        self.pairs = pairs
        self.detach_target = bool(detach_target)
        self.norm = norm
        self.positions = positions
        self.backend = backend

    def stage_pairs(self, num_stages: int) -> list[tuple[int, int]]:
        if self.pairs == "consecutive":
            return [(i, i + 1) for i in range(num_stages - 1)]
        return [(i, j) for i in range(num_stages) for j in range(i + 1, num_stages)]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        features = _as_list("features", features)
        if len(features) < 2:
            raise ValueError(f"features must hold at least two stages, got {len(features)}")
        pairs = self.stage_pairs(len(features))
        used = sorted({stage for pair in pairs for stage in pair})
        raw = {stage: kdops.attention_map(like(features[stage], features[0]), self.p, "sum", "none",
                                          backend=self.backend)
               for stage in used}
        total = 0.0
        for i, j in pairs:
            target = raw[j].detach() if self.detach_target else raw[j]
            total = total + _map_distance(raw[i], target, self.norm, self.positions)
        return self.loss_weight * total

    def extra_repr(self) -> str:
        return (f"p={self.p}, loss_weight={self.loss_weight}, pairs={self.pairs!r}, "
                f"detach_target={self.detach_target}, norm={self.norm!r}, positions={self.positions!r}")


class LabelGuidedAttention(nn.Module):
    """Label-guided attention distillation (LGAD): the stage attention maps of a teacher that
    reads the label map supervise the student's stages.

    ``loss_weight`` · Σ over stage pairs of mean over N·H_s·W_s of (A_s − A_t)², A = spatial
    softmax of Σ_c x_c², the teacher's map bilinearly resized to the student's stage size.
    The label teacher is frozen: its maps are computed under ``torch.no_grad()`` (no gradient
    reaches the teacher features, and autograd keeps nothing of them).

    ``norm`` and ``positions``: the form of the map-level loss, as in
    :class:`SelfAttentionDistillation` (defaults: spatial softmax, mean over the pixels, as SAD).

    forward(student, teacher): each a (N, C, H, W) or a sequence of them, paired in order → scalar.
    """

    def __init__(self, p: float = 2.0, loss_weight: float = 1.0, norm: str = "softmax", positions: str = "mean",
                 *, backend: str | None = None):
        super().__init__()
        self.p = _checks.positive_finite("p", p)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        _checks.choice("norm", norm, MAP_NORMS)
        _checks.choice("positions", positions, MAP_POSITIONS)
        self.norm = norm
        self.positions = positions
        self.backend = backend

    def forward(self, student, teacher) -> torch.Tensor:
        total = 0.0
        for s, t in _pairs("student", student, "teacher", teacher):
            student_map = kdops.attention_map(s, self.p, "sum", "none", backend=self.backend)
            with torch.no_grad():
                teacher_map = kdops.attention_map(like(t, s), self.p, "sum", "none", backend=self.backend)
            total = total + _map_distance(student_map, teacher_map, self.norm, self.positions)
        return self.loss_weight * total

    def extra_repr(self) -> str:
        return f"p={self.p}, loss_weight={self.loss_weight}, norm={self.norm!r}, positions={self.positions!r}"


class ClassAttentionDistillation(nn.Module):
    """Class attention map distillation (CAMD): ``loss_weight`` · mean over N·K·H·W of
    (M_s − M_t)², M[n, k] = per-map-normalised ReLU(Σ_c w[k, c] · x[n, c] + b[k]).

    Class weights come either from the caller (a 1×1 classifier acting on the feature, e.g.
    ``model.classifier.weight``: Grad-CAM of the summed class score) or, when not given, from
    the batch's class prototypes ``prototype_pool(x, labels, num_classes, per_image=False)``
    (the mean feature of each class's pixels), which suits intermediate layers of any width.

    forward(student (N, C_s, H, W), teacher (N, C_t, H, W), labels (N, H_l, W_l) or None,
    student_weight (K, C_s) or None, teacher_weight (K, C_t) or None, biases (K,) or None)
    → scalar.
    """

    def __init__(self, num_classes: int | None = None, norm: str = "l2", loss_weight: float = 1.0,
                 ignore_index: int = 255, *, backend: str | None = None):
        super().__init__()
        self.num_classes = None if num_classes is None else _checks.integer("num_classes", num_classes, minimum=1)
        self.norm = norm
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.backend = backend

    def _prototype_weight(self, name: str, x: torch.Tensor, labels) -> torch.Tensor:
        if labels is None or self.num_classes is None:
            raise ValueError(
                f"{name} is None: pass class weights, or build the loss with num_classes and "
                "pass labels to take them from the class prototypes"
            )
        protos, _ = kdops.prototype_pool(x, labels, self.num_classes, self.ignore_index,
                                         per_image=False, backend=self.backend)
        return protos

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
                student_weight: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None) -> torch.Tensor:
        teacher = like(teacher, student)
        if student_weight is None:
            student_weight = self._prototype_weight("student_weight", student, labels)
        if teacher_weight is None:
            teacher_weight = self._prototype_weight("teacher_weight", teacher, labels)
        loss = kdops.class_attention_loss(student, teacher, student_weight, teacher_weight,
                                          student_bias, teacher_bias, self.norm, backend=self.backend)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, norm={self.norm!r}, loss_weight={self.loss_weight}"
