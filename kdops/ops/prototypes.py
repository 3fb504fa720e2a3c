"""Class prototypes: ``prototype_pool``, ``prototype_kl`` (APD), ``class_variation_loss`` (IFVD).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`.
Math: :mod:`kdops.reference.prototypes`.
"""
from __future__ import annotations

import torch

from kdops import _checks, backend as _backend


def _check_classes(num_classes, ignore_index) -> tuple[int, int]:
    num_classes = _checks.integer("num_classes", num_classes, minimum=1)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    return num_classes, ignore_index


def _check_labels(labels, like: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """labels: integer (N, H_l, W_l), any H_l, W_l ≥ 1, on the device of ``like``."""
    _checks.labels(
        "labels", labels, batch=like.shape[0], num_classes=num_classes, ignore_index=ignore_index
    )
    if labels.dim() != 3 or labels.numel() == 0:
        raise ValueError(
            f"labels must have shape (N, H, W) with H, W >= 1, got {tuple(labels.shape)}"
        )
    if labels.device != like.device:
        raise ValueError(
            f"labels must be on the device of the features ({like.device}), got {labels.device}"
        )


def _check_features(student, teacher) -> None:
    """Two (N, C, H, W) features of one dtype and device, same N, H, W; C may differ."""
    _checks.tensor("student", student, ndim=4)
    _checks.tensor("teacher", teacher, ndim=4)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the N, H, W of student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )


def _check_protos(name: str, protos, features: torch.Tensor, features_name: str) -> None:
    """(N, K, C) or (K, C) prototypes of ``features`` (N, C, H, W), on their device."""
    _checks.tensor(name, protos)
    if protos.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (N, K, C) or (K, C), got {tuple(protos.shape)}")
    if protos.dim() == 3 and protos.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} must have N={features.shape[0]} images like {features_name}, "
            f"got {tuple(protos.shape)}"
        )
    if protos.shape[-1] != features.shape[1]:
        raise ValueError(
            f"{name} must have C={features.shape[1]} channels like {features_name}, "
            f"got {tuple(protos.shape)}"
        )
    _checks.same_device(features_name, features, name, protos)


def prototype_pool(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    per_image: bool = True,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes: the mean feature of each class's pixels.

    x: (N, C, H, W); labels: (N, H_l, W_l) integers in [0, num_classes) or ``ignore_index``,
    resized to (H, W) by nearest neighbour as ``F.interpolate(mode="nearest")``.
    Returns (protos, counts): protos[n, k] = mean of x[n, :, i] over the pixels i of class k,
    (N, K, C), or over the whole batch when ``per_image=False``, (K, C), in float32 (float64
    for float64 x); counts: int64 pixel counts, (N, K) or (K,). A class with count 0 has a
    zero prototype.
    """
    _checks.tensor("x", x, ndim=4)
    num_classes, ignore_index = _check_classes(num_classes, ignore_index)
    if not isinstance(per_image, bool):
        raise TypeError(f"per_image must be a bool, got {type(per_image).__name__}")
    _check_labels(labels, x, num_classes, ignore_index)
    return _backend.dispatch("prototype_pool", backend, x)(
        x, labels, num_classes, ignore_index, per_image
    )


def prototype_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_protos: torch.Tensor,
    teacher_protos: torch.Tensor,
    counts: torch.Tensor,
    tau: float = 0.1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """APD's observation KL: mean over pixels of KL(softmax(O_t) ‖ softmax(O_s)).

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; student_protos (N, K, C_s)
    or (K, C_s) and teacher_protos of the same kind with C_t (any floating dtype, e.g. from
    :func:`prototype_pool`); counts (N, K) or (K,) integers: the classes with count > 0 are
    present. O[k] = cos(x, P_k) / τ per pixel over the present classes. Returns a float32
    scalar (float64 for float64 features); an image with no present class contributes 0.
    Gradients flow to the features and to both prototype tensors.
    """
    _check_features(student, teacher)
    _check_protos("student_protos", student_protos, student, "student")
    _check_protos("teacher_protos", teacher_protos, teacher, "teacher")
    if teacher_protos.shape[:-1] != student_protos.shape[:-1]:
        raise ValueError(
            f"teacher_protos must have the leading shape {tuple(student_protos.shape[:-1])} of "
            f"student_protos, got {tuple(teacher_protos.shape)}"
        )
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
    if counts.shape != student_protos.shape[:-1]:
        raise ValueError(
            f"counts must have shape {tuple(student_protos.shape[:-1])} to match student_protos, "
            f"got {tuple(counts.shape)}"
        )
    _checks.same_device("student", student, "counts", counts)
    tau = _checks.positive_finite("tau", tau)
    return _backend.dispatch("prototype_kl", backend, student)(
        student, teacher, student_protos, teacher_protos, counts, tau
    )


def class_variation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """IFVD intra-class feature variation: mean over N·H·W of (m_s − m_t)².

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; labels: (N, H_l, W_l)
    integers in [0, num_classes) or ``ignore_index``, resized to (H, W) by nearest neighbour.
    m[n, i] = cos(x[n, :, i], P[n, y_i]) with P the per-image class prototypes of that feature;
    m = 1 at ignored pixels. Returns a float32 scalar (float64 for float64 features). Equals
    IFVD / CIRKD ``CriterionIFV(num_classes)`` (whose 1e-6 in the mean's denominator only
    scales the centre, which the cosine ignores).
    """
    _check_features(student, teacher)
    num_classes, ignore_index = _check_classes(num_classes, ignore_index)
    _check_labels(labels, student, num_classes, ignore_index)
    return _backend.dispatch("class_variation_loss", backend, student)(
        student, teacher, labels, num_classes, ignore_index
    )
