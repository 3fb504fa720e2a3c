"""Channel correlations: ``channel_correlation``, ``channel_correlation_loss`` (ICKD) and
``pairwise_affinity_loss`` (SKD pair-wise distillation).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`.
Math: :mod:`kdops.reference.correlation`.
"""
from __future__ import annotations

import torch

from kdops import _checks, backend as _backend
from kdops.reference.correlation import NORMS


def _check_pair(student, teacher) -> None:
    _checks.tensor("student", student, min_dim=3)
    _checks.tensor("teacher", teacher, min_dim=3)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher must have the batch size of student ({student.shape[0]}), "
            f"got shape {tuple(teacher.shape)}"
        )


def channel_correlation(
    x: torch.Tensor, norm: str = "row", *, backend: str | None = None
) -> torch.Tensor:
    """Channel correlation (Gram) matrices G = X Xᵀ, X = x as (N, C, L).

    x: (N, C, *spatial). ``norm``: "row" divides each row of G by max(its L2 norm, 1e-12)
    (ICKD), "l" divides G by L, "none" leaves it. Returns (N, C, C) in float32 (float64 for
    float64 input).
    """
    _checks.tensor("x", x, min_dim=3)
    _checks.choice("norm", norm, NORMS)
    return _backend.dispatch("channel_correlation", backend, x)(x, norm)


def channel_correlation_loss(
    student: torch.Tensor, teacher: torch.Tensor, norm: str = "row", *, backend: str | None = None
) -> torch.Tensor:
    """Inter-channel correlation distillation (ICKD): Σ (G_s − G_t)² / (N·C).

    student: (N, C, *spatial), teacher: (N, C, *spatial') of one dtype and device; the spatial
    sizes may differ. G as in :func:`channel_correlation` with ``norm``. Returns a float32
    scalar (float64 for float64 inputs). With norm="row" this is ICKD's loss; channel counts
    that differ need an adapter in the loss module first.
    """
    _check_pair(student, teacher)
    if teacher.shape[1] != student.shape[1]:
        raise ValueError(
            f"teacher must have the channels of student ({student.shape[1]}), "
            f"got shape {tuple(teacher.shape)}"
        )
    _checks.choice("norm", norm, NORMS)
    return _backend.dispatch("channel_correlation_loss", backend, student)(student, teacher, norm)


def pairwise_affinity_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """SKD pair-wise distillation: Σ (A_s − A_t)² / (N·L²), A = X̂ᵀ X̂ the L × L cosine affinity
    of positions, x̂ = x / max(‖x‖₂, 1e-12) over channels.

    student: (N, C_s, *spatial), teacher: (N, C_t, *spatial) of one dtype and device; the
    channel counts may differ. Memory is O(C²): no L × L matrix is formed. Returns a float32
    scalar (float64 for float64 inputs).
    """
    _check_pair(student, teacher)
    if teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the spatial shape of student ({tuple(student.shape[2:])}), "
            f"got shape {tuple(teacher.shape)}"
        )
    return _backend.dispatch("pairwise_affinity_loss", backend, student)(student, teacher)
