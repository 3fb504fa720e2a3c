"""Conventions shared by the reference ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The eps of F.normalize: x / max(||x||, EPS). Every cosine in kdops is taken this way.
NORM_EPS = 1e-12


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit inputs; float64 stays float64 (gradcheck, float64 references)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def flatten_spatial(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, L) in the accumulation dtype."""
    return x.reshape(x.shape[0], x.shape[1], -1).to(accumulation_dtype(x))


def normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=NORM_EPS)
