"""Prototype losses: adaptive perspective distillation (APD) and IFVD."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.losses._common import like, weight_arg


def _projection(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Sequential:
    # APD's StuTransConv / TeaTransConv: 1×1 conv, ReLU, 1×1 conv (with biases).
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden_channels, out_channels, kernel_size=1),
    )


class AdaptivePerspectiveDistillation(nn.Module):
    """Adaptive perspective distillation (Tian et al., TPAMI 2022; dvlab-research/APD).

    Student and teacher features (the head's fusion feature) go through trainable projections
    (1×1 conv, ReLU, 1×1 conv; the student's maps C_s → C_t), are L2-normalised per pixel,
    and pooled into one prototype per class present in the batch (labels resized by nearest
    neighbour). Each pixel's "observation" is its cosine to every present prototype of its own
    network, divided by τ. The terms, as APD's ``CriterionKmeansInterWhole`` and ``CriterionKD``
    with ``KLDivLoss()``'s mean over all elements:

    * ``observation``: ``observation_weight`` · KL(softmax(O_t) ‖ softmax(O_s)) averaged over
      N·P·h·w (P present classes) = ``prototype_kl(...) / P``; the teacher side detached;
    * ``prototype_align``: ``align_weight`` · mean over present classes of ½(1 − cos(P_s, P_t)),
      teacher prototypes detached;
    * ``logit_kl``: ``logit_weight`` · τ_l² · KL of the logits' class softmax, both logits
      bilinearly upsampled (align_corners=True) to the label size, averaged over N·K·H·W
      = ``pixel_kl(...) / K``.

    The teacher projection is not trained by these terms (they detach it): it has its own
    loss, :meth:`teacher_projection_loss`, stepped by its own optimizer (APD: Adam, lr 1e-5,
    betas (0.9, 0.99), poly schedule), which keeps the projected teacher features
    discriminative. Upstream defaults: all three weights 10, τ = 0.1 (``kmeans_temp`` 10),
    hidden width 512.

    forward(student (N, C_s, h, w), teacher (N, C_t, h, w), student_logits (N, K, h', w'),
    teacher_logits (N, K, h', w'), labels (N, H, W)) → dict of the three weighted scalars.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int, *,
                 hidden_channels: int = 512, tau: float = 0.1, logit_tau: float = 1.0,
                 observation_weight: float = 10.0, align_weight: float = 10.0, logit_weight: float = 10.0,
                 ignore_index: int = 255, backend: str | None = None):
        super().__init__()
        student_channels = _checks.integer("student_channels", student_channels, minimum=1)
        teacher_channels = _checks.integer("teacher_channels", teacher_channels, minimum=1)
        hidden_channels = _checks.integer("hidden_channels", hidden_channels, minimum=1)
        self.num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        self.tau = _checks.positive_finite("tau", tau)
        self.logit_tau = _checks.positive_finite("logit_tau", logit_tau)
        self.observation_weight = weight_arg("observation_weight", observation_weight)
        self.align_weight = weight_arg("align_weight", align_weight)
        self.logit_weight = weight_arg("logit_weight", logit_weight)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.backend = backend
        self.student_projection = _projection(student_channels, hidden_channels, teacher_channels)
        self.teacher_projection = _projection(teacher_channels, hidden_channels, teacher_channels)

    def _pool(self, x: torch.Tensor, labels: torch.Tensor, normalize_features: bool = False):
        return kdops.prototype_pool(x, labels, self.num_classes, self.ignore_index, per_image=False,
                                    normalize_features=normalize_features, backend=self.backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, student_logits: torch.Tensor,
                teacher_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # The projected features are normalised inside the ops (the prototypes are means of the
        # unit features; prototype_kl takes cosines): no normalised copy is formed or saved.
        student = self.student_projection(student)
        with torch.no_grad():
            teacher = like(self.teacher_projection(teacher), student)
        student_protos, counts = self._pool(student, labels, normalize_features=True)
        teacher_protos, _ = self._pool(teacher, labels, normalize_features=True)
        present = counts > 0
        num_present = present.sum().clamp(min=1)

        observation = kdops.prototype_kl(student, teacher, student_protos, teacher_protos, counts,
                                         self.tau, backend=self.backend) / num_present
        cosines = (F.normalize(student_protos, dim=1) * F.normalize(teacher_protos, dim=1)).sum(1)
        align = (0.5 * (1.0 - cosines) * present).sum() / num_present

        # The logits resized to the labels inside the op: the two (N, K, H, W) tensors of
        # F.interpolate (the largest of the recipe) are never stored.
        logit_kl = kdops.pixel_kl(student_logits, like(teacher_logits, student_logits), self.logit_tau,
                                  size=tuple(labels.shape[-2:]), align_corners=True,
                                  backend=self.backend) / self.num_classes
        return {
            "observation": self.observation_weight * observation,
            "prototype_align": self.align_weight * align,
            "logit_kl": self.logit_weight * logit_kl,
        }

    def teacher_projection_loss(self, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """APD's regulariser of the teacher projection (its ``soft_loss``): cross-entropy of
        the projected teacher's per-class cosines to the batch prototypes (0 for absent
        classes), scaled by 1/τ and bilinearly upsampled to the labels (align_corners=True).

        teacher: (N, C_t, h, w) teacher feature (detached here); labels (N, H, W) → scalar.
        Gradients reach only :attr:`teacher_projection`.
        """
        projected = F.normalize(self.teacher_projection(teacher.detach()), dim=1)
        protos, _ = self._pool(projected, labels)
        scores = torch.einsum("nchw,kc->nkhw", projected.to(protos.dtype), F.normalize(protos, dim=1))
        scores = F.interpolate(scores, labels.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(scores / self.tau, labels, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, tau={self.tau}, logit_tau={self.logit_tau}, "
                f"observation_weight={self.observation_weight}, align_weight={self.align_weight}, "
                f"logit_weight={self.logit_weight}")


class IntraClassVariation(nn.Module):
    """Intra-class feature variation distillation (IFVD): ``loss_weight`` · mean over N·H·W of
    (m_s − m_t)², m = cosine of each pixel's feature to its class's per-image prototype.

    Equals IFVD / CIRKD ``CriterionIFV(num_classes)`` times ``loss_weight``.

    forward(student (N, C_s, H, W), teacher (N, C_t, H, W), labels (N, H_l, W_l)) → scalar.
    """

    def __init__(self, num_classes: int, loss_weight: float = 1.0, ignore_index: int = 255,
                 *, backend: str | None = None):
        super().__init__()
        self.num_classes = _checks.integer("num_classes", num_classes, minimum=1)
        self.loss_weight = weight_arg("loss_weight", loss_weight)
        self.ignore_index = _checks.integer("ignore_index", ignore_index)
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = kdops.class_variation_loss(student, like(teacher, student), labels, self.num_classes,
                                          self.ignore_index, backend=self.backend)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, loss_weight={self.loss_weight}"
