"""Attention maps: ``attention_map`` / ``attention_loss`` (SAD, MAD, LGAD, AT) and
``class_attention_map`` / ``class_attention_loss`` (CAMD).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`. Backends get
canonical arguments: ``size`` as a (H', W') tuple or None, class weights as (K, C).
Math: :mod:`kdops.reference.attention`.
"""
from __future__ import annotations

import torch

from kdops import _checks, backend as _backend

REDUCTIONS = ("sum", "mean")
ATTENTION_NORMS = ("softmax", "l2", "none")
CLASS_ATTENTION_NORMS = ("l2", "softmax", "none")


def _check_pair(student, teacher, *, same_spatial: bool) -> None:
    """Two (N, C, H, W) feature maps of one dtype and device with equal N (and H, W)."""
    _checks.tensor("student", student, ndim=4)
    _checks.tensor("teacher", teacher, ndim=4)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher must have the batch size of student (N={student.shape[0]}), "
            f"got shape {tuple(teacher.shape)}"
        )
    if same_spatial and teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the spatial size of student (H, W = {tuple(student.shape[2:])}), "
            f"got shape {tuple(teacher.shape)}"
        )


def _check_attention_args(p, reduce, norm, size) -> tuple[float, tuple[int, int] | None]:
    p = _checks.positive_finite("p", p)
    _checks.choice("reduce", reduce, REDUCTIONS)
    _checks.choice("norm", norm, ATTENTION_NORMS)
    return p, _checks.size2d("size", size)


def _class_weight(name: str, weight, x_name: str, x: torch.Tensor) -> torch.Tensor:
    """A class weight of shape (K, C) or (K, C, 1, 1) matching x's C, returned as (K, C)."""
    _checks.tensor(name, weight, min_dim=2)
    if not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))):
        raise ValueError(f"{name} must have shape (K, C) or (K, C, 1, 1), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{name} must have C={x.shape[1]} columns (the channels of {x_name}), "
            f"got shape {tuple(weight.shape)}"
        )
    _checks.same_device(x_name, x, name, weight)
    return weight.flatten(1)


def _check_class_bias(name: str, bias, num_classes: int, x_name: str, x: torch.Tensor) -> None:
    if bias is None:
        return
    _checks.tensor(name, bias, ndim=1)
    if bias.shape[0] != num_classes:
        raise ValueError(
            f"{name} must have shape (K,) = ({num_classes},), got {tuple(bias.shape)}"
        )
    _checks.same_device(x_name, x, name, bias)


def attention_map(
    x: torch.Tensor,
    p: float = 2,
    reduce: str = "sum",
    norm: str = "softmax",
    size: int | tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Spatial attention map: a = Σ_c |x_c|^p ("mean": divided by C), resized, normalised.

    x: (N, C, H, W); p: finite > 0 (for 0 < p < 1 the gradient at an exact zero of x is NaN:
    |x|^p has an unbounded derivative there); reduce: "sum" or "mean"; size: an int or
    (H', W') — when it differs from (H, W) the map is resized bilinearly (align_corners=False)
    before normalisation; norm over the H'·W' positions: "softmax", "l2" (a / max(‖a‖₂, 1e-12))
    or "none". Returns (N, H', W') in float32 (float64 for float64 x).
    """
    _checks.tensor("x", x, ndim=4)
    p, size = _check_attention_args(p, reduce, norm, size)
    return _backend.dispatch("attention_map", backend, x)(x, p, reduce, norm, size)


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 2,
    reduce: str = "sum",
    norm: str = "softmax",
    size: int | tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention distillation: mean over N·H'·W' of (A_s − A_t)², A = ``attention_map``.

    student: (N, C_s, H_s, W_s), teacher: (N, C_t, H_t, W_t) of one dtype (C and H, W may
    differ). Both maps are taken at ``size`` (default (H_s, W_s)): a map of another size is
    resized before normalisation. SAD/MAD/LGAD: reduce="sum", norm="softmax" (the deeper
    stage's map resized to the shallower's); attention transfer (Zagoruyko & Komodakis):
    reduce="mean", norm="l2". Returns a float32 scalar (float64 for float64 inputs).
    """
    _check_pair(student, teacher, same_spatial=False)
    p, size = _check_attention_args(p, reduce, norm, size)
    return _backend.dispatch("attention_loss", backend, student)(
        student, teacher, p, reduce, norm, size
    )


def class_attention_map(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: str = "l2",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Class attention maps: M[n, k] = ReLU(Σ_c weight[k, c]·x[n, c] + bias[k]), normalised.

    x: (N, C, H, W); weight: (K, C) or a 1×1 conv's (K, C, 1, 1); bias: (K,) or None; weight
    and bias may have any floating dtype (they are cast to x's accumulation dtype). Each
    (n, k) map is normalised over H·W by ``norm``: "l2", "softmax" or "none". A map the ReLU
    zeroes everywhere gives 0 ("l2", zero gradient) or a uniform map ("softmax").
    Returns (N, K, H, W) in float32 (float64 for float64 x).
    """
    _checks.tensor("x", x, ndim=4)
    weight = _class_weight("weight", weight, "x", x)
    _check_class_bias("bias", bias, weight.shape[0], "x", x)
    _checks.choice("norm", norm, CLASS_ATTENTION_NORMS)
    return _backend.dispatch("class_attention_map", backend, x)(x, weight, bias, norm)


def class_attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    norm: str = "l2",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Class attention map distillation (CAMD): mean over N·K·H·W of (M_s − M_t)².

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; student_weight (K, C_s) and
    teacher_weight (K, C_t), each also accepted as (K, C, 1, 1); biases (K,) or None.
    M = ``class_attention_map`` of each side with ``norm``. Returns a float32 scalar
    (float64 for float64 inputs).
    """
    _check_pair(student, teacher, same_spatial=True)
    student_weight = _class_weight("student_weight", student_weight, "student", student)
    teacher_weight = _class_weight("teacher_weight", teacher_weight, "teacher", teacher)
    num_classes = student_weight.shape[0]
    if teacher_weight.shape[0] != num_classes:
        raise ValueError(
            f"teacher_weight must have the K={num_classes} rows of student_weight, "
            f"got shape {tuple(teacher_weight.shape)}"
        )
    _check_class_bias("student_bias", student_bias, num_classes, "student", student)
    _check_class_bias("teacher_bias", teacher_bias, num_classes, "teacher", teacher)
    _checks.choice("norm", norm, CLASS_ATTENTION_NORMS)
    return _backend.dispatch("class_attention_loss", backend, student)(
        student, teacher, student_weight, teacher_weight, student_bias, teacher_bias, norm
    )
