"""APD, adaptive perspective distillation (dvlab-research/APD, ``tool/train.py``): the
drop-in loss functions, with APD's signatures (``args`` the training config).

``CriterionKD(pred, soft, new_size, ..., args=args)`` and
``CriterionKmeansInterWhole(pred, soft, target, args, new_size, StuTransConv, TeaTransConv)``
as ``train()`` calls them. ``args`` needs ``temperature`` (KD), and ``classes``,
``kmeans_temp``, ``kmeans_norm``, ``stu_trans``, ``tea_trans`` (the k-means terms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kdops
from kdops import _checks
from kdops.losses._common import like

__all__ = ["CriterionKD", "CriterionKmeansInterWhole"]

IGNORE_LABEL = 255  # APD skips the class 255 (its ignore label) by value


def _resize(x: torch.Tensor, new_size) -> torch.Tensor:
    return F.interpolate(x, size=(new_size[0], new_size[1]), mode="bilinear", align_corners=True)


def CriterionKD(pred, soft, new_size, raw_soft=None, raw_pred=None, target=None, args=None, cur_step=None,
                max_step=None, *, backend: str | None = None) -> torch.Tensor:
    """APD's logit KD: with ``new_size``, both maps bilinearly resized (align_corners=True);
    then T² · ``nn.KLDivLoss()`` (mean over all N·C·H·W elements) of log_softmax(pred/T)
    against softmax(soft/T), T = ``args.temperature`` = ``kdops.pixel_kl(pred, soft, T) / C``.
    The teacher is not detached (APD's ``soft.detach()`` discards its result); ``raw_soft``,
    ``raw_pred``, ``target``, ``cur_step`` and ``max_step`` are unused, as upstream.

    pred, soft: (N, C, h, w) → scalar.
    """
    if args is None:
        raise ValueError("args must be given: CriterionKD reads args.temperature")
    size = (new_size[0], new_size[1]) if new_size else None
    loss = kdops.pixel_kl(pred, like(soft, pred), args.temperature, size=size, align_corners=True,
                          backend=backend)
    return loss / pred.shape[1]


def _present_log_softmax(observations: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """log-softmax over the present classes (dim 1); 0 at the absent ones."""
    log_prob = F.log_softmax(observations.masked_fill(~present, float("-inf")), dim=1)
    return torch.where(present, log_prob, 0.0)


def CriterionKmeansInterWhole(pred, soft, target, args, new_size=None, StuTransConv=None, TeaTransConv=None,
                              *, backend: str | None = None):
    """APD's prototype terms → ``(pred_kl_loss, soft_loss, proto_align_loss)``.

    pred, soft: student and teacher features (N, C, h, w) (through ``StuTransConv`` /
    ``TeaTransConv`` when ``args.stu_trans`` / ``args.tea_trans``; with ``args.kmeans_norm``
    L2-normalised per pixel); target (N, H, W), resized to (h, w) by nearest neighbour, 255
    ignored. One prototype per class present in the batch: the mean feature of its pixels
    over the whole batch (``kdops.prototype_pool(..., per_image=False)``; with kmeans_norm
    normalised), P the number of present classes, κ = ``args.kmeans_temp``.

    * pred_kl_loss: ``nn.KLDivLoss()`` (mean over N·P·h·w) of the student's observations
      κ·cos(s, P_s) against softmax of the teacher's κ·cos(t, P_t) over the present classes,
      the teacher side detached = ``kdops.prototype_kl(..., tau=1/κ) / P``;
    * soft_loss: cross-entropy (ignore 255) of the teacher's per-class scores κ·cos(t, P_t)
      (0 for absent classes), bilinearly resized (align_corners=True) to ``new_size`` against
      ``target`` (without new_size: at (h, w) against the resized target) — the loss that
      trains ``TeaTransConv`` (gradient through the teacher side, not detached);
    * proto_align_loss: mean over the present classes of ½(1 − ⟨P_s, P_t⟩), teacher
      prototypes detached.

    Without kmeans_norm the observations are dot products with the unnormalised prototypes
    (elementwise PyTorch; the fused op takes cosines). A batch with no present class gives
    three zeros (0-dim; upstream returns four (1,)-shaped zeros there, which its caller
    cannot unpack). APD's unused n_c × n_c matrix of each class's features is not formed.
    Labels other than [0, classes) and 255 raise (upstream drops the whole batch's terms).
    """
    if args.stu_trans:
        pred = StuTransConv(pred)
    if args.tea_trans:
        soft = TeaTransConv(soft)
    _checks.tensor("pred", pred, ndim=4)
    _checks.tensor("soft", soft, ndim=4)
    if pred.shape[0] != soft.shape[0] or pred.shape[2:] != soft.shape[2:]:
        raise ValueError(
            f"soft must have the batch size and spatial shape of pred {tuple(pred.shape)}, got {tuple(soft.shape)}"
        )
    num_classes = args.classes
    kmeans_temp = args.kmeans_temp
    if args.kmeans_norm:
        pred, soft = F.normalize(pred, 2, 1), F.normalize(soft, 2, 1)
    soft = like(soft, pred)
    target = target.long()

    pred_protos, counts = kdops.prototype_pool(pred, target, num_classes, IGNORE_LABEL, per_image=False,
                                               backend=backend)
    soft_protos, _ = kdops.prototype_pool(soft, target, num_classes, IGNORE_LABEL, per_image=False,
                                          backend=backend)
    present = counts > 0
    num_present = present.sum()
    divisor = num_present.clamp(min=1)

    if args.kmeans_norm:
        pred_centres, soft_centres = F.normalize(pred_protos, 2, 1), F.normalize(soft_protos, 2, 1)
        pred_kl_loss = kdops.prototype_kl(pred, soft.detach(), pred_protos, soft_protos.detach(), counts,
                                          1.0 / kmeans_temp, backend=backend) / divisor
    else:
        pred_centres, soft_centres = pred_protos, soft_protos
        mask = present.view(1, -1, 1, 1)
        observed_s = torch.einsum("nchw,kc->nkhw", pred.to(pred_centres.dtype), pred_centres) * kmeans_temp
        with torch.no_grad():
            observed_t = torch.einsum("nchw,kc->nkhw", soft.to(soft_centres.dtype), soft_centres) * kmeans_temp
        log_q = _present_log_softmax(observed_s, mask)
        log_p = _present_log_softmax(observed_t, mask)
        elements = pred.shape[0] * pred.shape[2] * pred.shape[3] * divisor
        pred_kl_loss = (log_p.exp() * mask * (log_p - log_q)).sum() / elements

    alignment = (pred_centres * soft_centres.detach()).sum(1)
    proto_align_loss = (0.5 * (1.0 - alignment) * present).sum() / divisor

    scores = torch.einsum("nchw,kc->nkhw", soft.to(soft_centres.dtype), soft_centres)
    if new_size:
        scores = _resize(scores, new_size)
    else:
        target = F.interpolate(target.unsqueeze(1).float(), size=soft.shape[2:], mode="nearest").squeeze(1).long()
    scores = scores * kmeans_temp
    labelled = target != IGNORE_LABEL
    summed = F.cross_entropy(scores, target, ignore_index=IGNORE_LABEL, reduction="sum")
    soft_loss = summed / labelled.sum().clamp(min=1)
    soft_loss = torch.where(num_present > 0, soft_loss, 0.0)
    return pred_kl_loss, soft_loss, proto_align_loss
