"""Reference channel correlations: channel Gram matrices (ICKD) and SKD's pair-wise affinity.

X is x as (N, C, L), L the product of the spatial dims.

Every product here is evaluated in float64 and the result rounded to the accumulation dtype
(float32 for 16/32-bit inputs). A float32 matmul is not a fixed computation in torch: the
global precision flags let it run in TF32 on CUDA (``torch.backends.cuda.matmul``) and in
TF32 or bfloat16 through oneDNN on CPU (``torch.backends.mkldnn.matmul``; both are switched by
``torch.set_float32_matmul_precision("high")``). A float64 matmul has no such mode, so the
specification does not depend on flags, device or ``torch.compile``, and needs no global
state to be set and restored. It also keeps the differences G_s − G_t and the cancelling
terms of the pair-wise identity accurate far below float32 rounding of the result. The price
is a float64 copy of the features (twice their float32 size), in this reference only.
"""
from __future__ import annotations

import torch

from kdops.reference._common import NORM_EPS, accumulation_dtype, normalize

# "row": each row of G divided by max(its L2 norm, 1e-12) (ICKD); "l": G / L; "none": G.
NORMS = ("row", "l", "none")


def _features64(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, L) in float64."""
    return x.reshape(x.shape[0], x.shape[1], -1).to(torch.float64)


def _gram64(x: torch.Tensor, norm: str) -> torch.Tensor:
    """The normalised Gram matrix G = X Xᵀ of x, (N, C, C) in float64."""
    features = _features64(x)
    gram = features @ features.transpose(1, 2)
    if norm == "row":
        return normalize(gram, dim=2)
    if norm == "l":
        return gram / features.shape[2]
    if norm == "none":
        return gram
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def channel_correlation(x: torch.Tensor, norm: str = "row") -> torch.Tensor:
    """Channel correlation (Gram) matrix.

    x: (N, C, *spatial). Returns (N, C, C) in the accumulation dtype:
    G[n] = X[n] X[n]ᵀ, then per ``norm``: "row" G[n, i, :] / max(‖G[n, i, :]‖₂, 1e-12),
    "l" G / L, "none" G.
    """
    return _gram64(x, norm).to(accumulation_dtype(x))


def channel_correlation_loss(
    student: torch.Tensor, teacher: torch.Tensor, norm: str = "row"
) -> torch.Tensor:
    """ICKD's inter-channel correlation loss: Σ (G_s − G_t)² / (N·C).

    student: (N, C, *spatial), teacher: (N, C, *spatial') (the spatial sizes may differ: G is
    C × C either way); G as in :func:`channel_correlation` with the same ``norm``.
    Returns a scalar in the accumulation dtype.
    """
    n, c = student.shape[:2]
    diff = _gram64(student, norm) - _gram64(teacher, norm)
    return (diff.square().sum() / (n * c)).to(accumulation_dtype(student))


def pairwise_affinity_loss(
    student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool = False
) -> torch.Tensor:
    """SKD pair-wise distillation loss: Σ (A_s − A_t)² / (N·L²).

    student: (N, C_s, *spatial), teacher: (N, C_t, *spatial). x̂ = x / max(‖x‖₂, 1e-12) over
    channels at each position; A = X̂ᵀ X̂ is the L × L cosine affinity of positions.
    ``detach_norm=True``: the per-pixel norm is a constant for the gradient (SKD's code divides
    by ``L2(feat).detach()``); the loss is the same.
    No L × L matrix is formed: with D = X̂_s − X̂_t and Σ = X̂_s + X̂_t (the narrower side padded
    with zero channels, which leave its affinities unchanged), A_s − A_t = sym(Σᵀ D) and
    Σ (A_s − A_t)² = ½(⟨Σ Σᵀ, D Dᵀ⟩ + ⟨K, Kᵀ⟩) with K = D Σᵀ: C × C products only (memory
    O(N·C² + N·C·L)), each term a product with the small D, so nothing cancels when the student
    is close to the teacher (the identity ‖S‖² − 2‖M‖² + ‖T‖² of the three Grams would subtract
    numbers of order L²/C). Float64. Returns a scalar in the accumulation dtype.
    """
    n = student.shape[0]
    s = _normalize_pixels(_features64(student), detach_norm)
    t = _normalize_pixels(_features64(teacher), detach_norm)
    channels = max(s.shape[1], t.shape[1])
    s = torch.nn.functional.pad(s, (0, 0, 0, channels - s.shape[1]))
    t = torch.nn.functional.pad(t, (0, 0, 0, channels - t.shape[1]))
    length = s.shape[2]
    difference, total_sum = s - t, s + t
    k = difference @ total_sum.transpose(1, 2)
    total = 0.5 * (((total_sum @ total_sum.transpose(1, 2)) * (difference @ difference.transpose(1, 2))).sum()
                   + (k * k.transpose(1, 2)).sum())
    return (total / (n * length * length)).to(accumulation_dtype(student))


def _normalize_pixels(features: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """features (N, C, L) / max(‖·‖₂ over C, 1e-12) per position; the norm detached on request."""
    if not detach_norm:
        return normalize(features, dim=1)
    norms = features.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return features / norms.detach()
