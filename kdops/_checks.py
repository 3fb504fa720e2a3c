"""Argument checks shared by the public ops: each error names the offending argument."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, x, *, min_dim: int = 1, ndim: int | None = None) -> None:
    """``x`` is a floating tensor with at least ``min_dim`` (or exactly ``ndim``) dims, no empty dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def same_dtype_and_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    same_device(name_a, a, name_b, b)


def positive_finite(name: str, value) -> float:
    """A hyper-parameter that must be a finite number > 0 (tau, p)."""
    finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def size2d(name: str, size) -> tuple[int, int] | None:
    """``None``, an int, or a pair of positive ints (an output H', W')."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list, torch.Size))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise ValueError(f"{name} must be None, an int or a pair of positive ints, got {size!r}")
    return (int(size[0]), int(size[1]))


def labels(
    name: str,
    x: torch.Tensor,
    *,
    batch: int,
    num_classes: int | None,
    ignore_index: int,
    spatial: Sequence[int] | None = None,
) -> None:
    """An integer label map (N, ...) whose values are in [0, num_classes) or ``ignore_index``.

    The range check reads the labels (a device sync on GPU); it is skipped while
    ``torch.compile`` traces, where it would break the graph.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] != batch:
        raise ValueError(f"{name} must have shape (N, H, W) with N={batch}, got {tuple(x.shape)}")
    if spatial is not None and tuple(x.shape[1:]) != tuple(spatial):
        raise ValueError(
            f"{name} must have spatial shape {tuple(spatial)}, got {tuple(x.shape[1:])}"
        )
    if num_classes is None or torch.compiler.is_compiling():
        return
    bad = ((x < 0) | (x >= num_classes)) & (x != ignore_index)
    if bool(bad.any()):
        value = int(x[bad].flatten()[0])
        raise ValueError(
            f"{name} holds {value}, outside [0, num_classes={num_classes}) and not "
            f"ignore_index={ignore_index}"
        )
