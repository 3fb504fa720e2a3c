"""Argument checks shared by the public ops: each error names the offending argument."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kdops import _extension

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


# The temperatures the kernels are accurate for: 1/τ and τ² stay far inside float32's range,
# and τ = 1e-6 still gives finite gradients (they scale with 1/τ).
TAU_RANGE = (1e-6, 1e6)


def temperature(name: str, value) -> float:
    """A softmax temperature: a finite number in [1e-6, 1e6]."""
    value = positive_finite(name, value)
    low, high = TAU_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return value


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


def integer_for_labels(name: str, value, label_dtype: torch.dtype) -> int:
    """An int (``ignore_index``) that ``label_dtype`` can hold.

    A value the dtype cannot hold would be wrapped by the comparison with the labels (uint8
    labels against 256 compare with 0), silently ignoring real pixels.
    """
    value = integer(name, value)
    info = torch.iinfo(label_dtype)
    if not info.min <= value <= info.max:
        raise ValueError(
            f"{name}={value} cannot be held by {str(label_dtype).removeprefix('torch.')} labels "
            f"(range [{info.min}, {info.max}])"
        )
    return value


def labels(
    name: str,
    x: torch.Tensor,
    *,
    batch: int,
    num_classes: int,
    ignore_index: int,
    spatial: Sequence[int] | None = None,
    ignore_index_name: str = "ignore_index",
    check_values: bool = True,
) -> int:
    """An integer label map (N, ...) whose values are in [0, num_classes) or ``ignore_index``.

    Returns ``ignore_index`` after checking that the label dtype can hold it. The range check
    reads the labels: on CPU tensors in eager mode it raises at once, naming the first bad
    value; on CUDA tensors (and while ``torch.compile`` traces) it is a device-side assert, so
    the host never waits for the device. ``check_values=False`` leaves the values to a kernel
    that checks them itself as it reads them (the C++ prototype kernels): the same error,
    without a second pass over a label map that may be the image's size.
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
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    ignore_index = integer_for_labels(ignore_index_name, ignore_index, x.dtype)
    if not check_values:
        return ignore_index
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Three small ops (a real step calls this every iteration): the range of the labels
        # with the ignored ones mapped into it.
        low, high = torch.aminmax(x.masked_fill(x == ignore_index, 0))
        if int(low) < 0 or int(high) >= num_classes:
            bad = ((x < 0) | (x >= num_classes)) & (x != ignore_index)
            value = int(x[bad].flatten()[0])
            raise ValueError(
                f"{name} holds {value}, outside [0, {num_classes}) and not "
                f"{ignore_index_name}={ignore_index}"
            )
    else:
        bad = (((x < 0) | (x >= num_classes)) & (x != ignore_index)).any()
        if (x.is_cuda and name in ("labels", "target") and ignore_index_name == "ignore_index"
                and not torch.compiler.is_compiling() and _extension.built_with_cuda()):
            # ATen's CUDA assert drops its message; kdops' names the argument.
            torch.ops.kdops.assert_no_bad_label(bad, name)
        else:
            torch._assert_async(
                torch.logical_not(bad),
                f"{name} holds a label outside [0, num_classes) that is not {ignore_index_name}",
            )
    return ignore_index
