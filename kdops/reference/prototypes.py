"""Reference class-prototype ops: prototype pooling, APD's observation KL, IFVD's class variation.

A prototype is the mean feature of the pixels of one class, per image or over the batch.
Label maps are resized to the feature resolution by nearest neighbour; pixels labelled
``ignore_index`` belong to no class. A class with no pixel (count 0) has a zero prototype.

Cosines use F.normalize's convention: x̂ = x / max(‖x‖₂, 1e-12) over the channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdops.reference._common import accumulation_dtype, flatten_spatial, normalize


def _nearest_source_index(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out_size,) int64: the source index F.interpolate(mode="nearest") reads for each output."""
    index = torch.arange(in_size, dtype=torch.float32, device=device).view(1, 1, in_size)
    return F.interpolate(index, size=out_size, mode="nearest").view(out_size).long()


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label map: (N, H_l, W_l) -> (N, H, W), same dtype.

    Picks the pixels ``F.interpolate(labels[:, None].float(), size, mode="nearest")`` picks.
    The source rows and columns come from interpolating their own indices and the labels are
    gathered from them, so label values are never rounded through float32 (exact for any
    value, where the float route is exact below 2^24). Returns ``labels`` itself when the
    size already matches.
    """
    h, w = size
    h_l, w_l = labels.shape[-2:]
    if (h_l, w_l) == (h, w):
        return labels
    rows = _nearest_source_index(h_l, h, labels.device)
    cols = _nearest_source_index(w_l, w, labels.device)
    return labels[:, rows[:, None], cols[None, :]]


def _pool(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int, per_image: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """feats (N, C, L), labels (N, L) -> (protos (N, K, C) or (K, C), int64 counts (N, K) or (K,)).

    sums[n, c, k] = Σ_i feats[n, c, i] · [y_i = k] is one batched GEMM with the one-hot label
    map; ignored pixels have an all-zero one-hot row.
    """
    classes = torch.arange(num_classes, device=labels.device)
    one_hot = (labels[..., None] == classes) & (labels != ignore_index)[..., None]  # (N, L, K)
    counts = one_hot.sum(dim=1)  # (N, K), int64
    # Ignored pixels are zeroed first (a select, not a product): 0 · NaN in the GEMM would let
    # whatever they hold reach every prototype.
    feats = torch.where((labels != ignore_index)[:, None, :], feats, 0.0)
    sums = torch.bmm(feats, one_hot.to(feats.dtype)).transpose(1, 2)  # (N, K, C)
    if not per_image:
        sums, counts = sums.sum(dim=0), counts.sum(dim=0)
    # An absent class divides a zero sum by 1: a zero prototype, and a zero gradient.
    protos = sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)
    return protos, counts


def prototype_pool(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    per_image: bool = True,
    normalize_features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes: the mean feature of each class's pixels.

    x: (N, C, H, W); labels: (N, H_l, W_l) integers in [0, K) or ``ignore_index``, resized to
    (H, W) by :func:`resize_labels`. With K = num_classes:
      per_image=True:  protos[n, k] = Σ_{i: y[n,i]=k} x[n, :, i] / counts[n, k], shape (N, K, C);
      per_image=False: protos[k] = Σ_{n, i: y[n,i]=k} x[n, :, i] / counts[k], shape (K, C).
    counts: int64 pixel counts, (N, K) or (K,). protos are in the accumulation dtype;
    a class with count 0 has a zero prototype.
    normalize_features=True pools the unit features x̂ = x / max(‖x‖₂, 1e-12) (over C, per
    pixel) instead of x: APD's prototypes of L2-normalised features, without a normalised copy.
    """
    n, _, h, w = x.shape
    flat_labels = resize_labels(labels, (h, w)).reshape(n, h * w)
    feats = flatten_spatial(x)
    if normalize_features:
        # Ignored pixels are zeroed before the normalisation too: NaN there would otherwise
        # reach the gradient through normalize's backward (0 · ∂x̂/∂x at a NaN pixel is NaN).
        valid = (flat_labels != ignore_index)[:, None, :]
        feats = normalize(torch.where(valid, feats, 0.0), dim=1)
    return _pool(feats, flat_labels, num_classes, ignore_index, per_image)


def _observations(x: torch.Tensor, protos: torch.Tensor, tau: float) -> torch.Tensor:
    """O[n, k, i] = cos(x[n, :, i], P_k) / τ, shape (N, K, L); P_k per image or shared."""
    acc = accumulation_dtype(x)
    x_hat = normalize(flatten_spatial(x), dim=1)  # (N, C, L)
    protos_hat = normalize(protos.to(acc), dim=-1)  # (N, K, C) or (K, C)
    return torch.matmul(protos_hat, x_hat) / tau


def _present_log_softmax(
    observations: torch.Tensor, present: torch.Tensor, in_softmax: torch.Tensor
) -> torch.Tensor:
    """log-softmax over the classes (dim 1) in ``in_softmax``; 0 (not −inf) at absent classes.

    The zeros keep p·(log p − log q) and its gradient finite where p = 0.
    """
    log_prob = F.log_softmax(observations.masked_fill(~in_softmax, float("-inf")), dim=1)
    return torch.where(present, log_prob, 0.0)


def prototype_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_protos: torch.Tensor,
    teacher_protos: torch.Tensor,
    counts: torch.Tensor,
    tau: float = 0.1,
) -> torch.Tensor:
    """APD's observation KL between student and teacher.

    student: (N, C_s, H, W), teacher: (N, C_t, H, W); student_protos (N, K, C_s) or (K, C_s),
    teacher_protos likewise with C_t; counts (N, K) or (K,): a class is present where count > 0.
    Observation at each pixel: O[k] = cos(x, P_k) / τ over the present classes k (per image for
    per-image prototypes). With p = softmax(O_t), q = softmax(O_s) over the present classes,
    returns the mean over all N·H·W pixels of KL(p‖q) = Σ_k p_k (log p_k − log q_k), a scalar
    in the accumulation dtype. A pixel whose image has no present class contributes 0.
    """
    num_classes = student_protos.shape[-2]
    present = (counts > 0).reshape(-1, num_classes, 1)  # (N or 1, K, 1)
    # An image with no present class would softmax over nothing (NaN); let every class into its
    # softmax instead: its log-probabilities are all masked to 0 anyway, so it contributes 0.
    in_softmax = present | ~present.any(dim=1, keepdim=True)
    log_p = _present_log_softmax(_observations(teacher, teacher_protos, tau), present, in_softmax)
    log_q = _present_log_softmax(_observations(student, student_protos, tau), present, in_softmax)
    p = log_p.exp() * present
    return (p * (log_p - log_q)).sum(dim=1).mean()


def _class_cosines(
    x: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """m[n, i] = cos(x[n, :, i], P[n, y_i]) with per-image prototypes, 1 at ignored pixels: (N, L).

    x: (N, C, H, W); labels: (N, H, W), already at the resolution of x.
    """
    n = x.shape[0]
    flat_labels = labels.reshape(n, 1, -1)
    # Ignored pixels take no part (m = 1 there): zeroed by a select, so NaN in them reaches
    # neither the prototypes nor, through the normalisation's backward, the gradients.
    feats = torch.where(flat_labels != ignore_index, flatten_spatial(x), 0.0)
    protos, _ = _pool(feats, flat_labels.squeeze(1), num_classes, ignore_index, per_image=True)
    # Cosines to every class (N, K, L) by one GEMM, then each pixel's own class picked out.
    cosines = torch.bmm(normalize(protos, dim=-1), normalize(feats, dim=1))
    labelled = flat_labels != ignore_index
    own_class = cosines.gather(1, torch.where(labelled, flat_labels, 0).long())
    return torch.where(labelled, own_class, 1.0).squeeze(1)


def class_variation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """IFVD intra-class feature variation distillation.

    student: (N, C_s, H, W), teacher: (N, C_t, H, W); labels (N, H_l, W_l), resized to (H, W)
    by :func:`resize_labels`. For each feature, with per-image prototypes P (prototype_pool):
    m[n, i] = cos(x[n, :, i], P[n, y_i]), and m = 1 at ignored pixels.
    Returns the mean over N·H·W of (m_s − m_t)², a scalar in the accumulation dtype.
    """
    labels = resize_labels(labels, student.shape[-2:])
    m_student = _class_cosines(student, labels, num_classes, ignore_index)
    m_teacher = _class_cosines(teacher, labels, num_classes, ignore_index)
    return (m_student - m_teacher).square().mean()
