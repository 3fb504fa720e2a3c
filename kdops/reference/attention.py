"""Reference attention maps: spatial attention (SAD, MAD, LGAD, AT) and class attention (CAMD).

A spatial attention map aggregates a feature map over channels, a = Σ_c |x_c|^p, and
normalises it over the positions. A class attention map projects the features on K class
weight vectors (a 1×1 classifier), keeps the positive evidence with a ReLU and normalises
each (n, k) map over the positions.

Normalisations over the L positions of one map: "softmax" (spatial softmax), "l2"
(a / max(‖a‖₂, 1e-12), F.normalize's convention) and "none".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdops.reference._common import accumulation_dtype, flatten_spatial, normalize


def _normalize_positions(maps: torch.Tensor, norm: str) -> torch.Tensor:
    """maps: (..., L), normalised over the last dim."""
    if norm == "softmax":
        return torch.softmax(maps, dim=-1)
    if norm == "l2":
        return normalize(maps, dim=-1)
    return maps


def _aggregate(x: torch.Tensor, p: float, reduce: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W): Σ_c |x_c|^p, divided by C for reduce="mean"."""
    x = x.to(accumulation_dtype(x))
    # x·x is exact and its gradient 2x is finite everywhere; |x|^p goes through pow.
    powered = x * x if p == 2 else x.abs().pow(p)
    return powered.mean(dim=1) if reduce == "mean" else powered.sum(dim=1)


def _resize(maps: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """(N, H, W) -> (N, H', W') by bilinear interpolation (align_corners=False)."""
    if size is None or tuple(size) == tuple(maps.shape[-2:]):
        return maps
    resized = F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False)
    return resized.squeeze(1)


def attention_map(
    x: torch.Tensor,
    p: float = 2.0,
    reduce: str = "sum",
    norm: str = "softmax",
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Spatial attention map of a feature map.

    x: (N, C, H, W). a[n] = Σ_c |x[n, c]|^p (divided by C for reduce="mean"), shape (H, W);
    resized to ``size`` = (H', W') by bilinear interpolation (align_corners=False) when it
    differs from (H, W); then normalised over the H'·W' positions by ``norm``.
    Returns (N, H', W') in the accumulation dtype (float32; float64 for float64 x).

    For 0 < p < 1 the derivative of |x|^p is unbounded at x = 0: autograd returns NaN for
    elements that are exactly zero. p = 1 and p ≥ 1 have finite gradients everywhere.
    """
    maps = _resize(_aggregate(x, p, reduce), size)
    n, h, w = maps.shape
    return _normalize_positions(maps.reshape(n, h * w), norm).reshape(n, h, w)


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 2.0,
    reduce: str = "sum",
    norm: str = "softmax",
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention distillation loss: mean over N·H'·W' of (A_s − A_t)².

    student: (N, C_s, H_s, W_s), teacher: (N, C_t, H_t, W_t). Both maps are
    ``attention_map(·, p, reduce, norm, size)`` taken at ``size`` (default (H_s, W_s)), so a
    map of another size is resized before it is normalised. SAD/MAD/LGAD: reduce="sum",
    norm="softmax"; attention transfer (AT): reduce="mean", norm="l2".
    Returns a scalar in the accumulation dtype.
    """
    if size is None:
        size = (student.shape[-2], student.shape[-1])
    student_map = attention_map(student, p, reduce, norm, size)
    teacher_map = attention_map(teacher, p, reduce, norm, size)
    return (student_map - teacher_map).square().mean()


def class_attention_map(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: str = "l2",
) -> torch.Tensor:
    """Class attention maps.

    x: (N, C, H, W); weight: (K, C); bias: (K,) or None.
    M[n, k] = ReLU(Σ_c weight[k, c]·x[n, c] + bias[k]), normalised over the H·W positions of
    each (n, k) by ``norm``. Returns (N, K, H, W) in the accumulation dtype of x; weight and
    bias are cast to it. With no bias and the weight of a 1×1 classifier acting on x this is
    Grad-CAM of the class score summed over the pixels. A map that the ReLU zeroes everywhere
    stays 0 under "l2" (with zero gradient) and is uniform under "softmax".
    """
    acc = accumulation_dtype(x)
    n, _, h, w = x.shape
    scores = torch.matmul(weight.to(acc), flatten_spatial(x))  # (N, K, L)
    if bias is not None:
        scores = scores + bias.to(acc).unsqueeze(-1)
    maps = _normalize_positions(torch.relu(scores), norm)
    return maps.reshape(n, weight.shape[0], h, w)


def class_attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    norm: str = "l2",
) -> torch.Tensor:
    """Class attention map distillation (CAMD): mean over N·K·H·W of (M_s − M_t)².

    student: (N, C_s, H, W), teacher: (N, C_t, H, W); student_weight: (K, C_s),
    teacher_weight: (K, C_t); biases (K,) or None. M_s, M_t are ``class_attention_map``
    of each side with ``norm``. Returns a scalar in the accumulation dtype.
    """
    student_maps = class_attention_map(student, student_weight, student_bias, norm)
    teacher_maps = class_attention_map(teacher, teacher_weight, teacher_bias, norm)
    return (student_maps - teacher_maps).square().mean()
