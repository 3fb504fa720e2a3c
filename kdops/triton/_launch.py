"""Launcher helpers shared by the Triton op families: output buffers, layouts, devices.

``POISON_OUTPUTS`` is a test hook: while it is true every buffer :func:`new_buffer` makes
starts as NaN (integers: their minimum), so a test proves that the kernels write every
element they return.
"""
from __future__ import annotations

import contextlib
import math

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON_OUTPUTS = False


def check_kernel_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {x.dtype}")


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer under the test hook POISON_OUTPUTS."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        buffer.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return buffer


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) → (N, C, L): a view when the spatial dims merge, else one copy."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def gradient_like(x: torch.Tensor, needed: bool = True) -> torch.Tensor:
    """The gradient of x as the fake kernels promise it: empty_like(x) (NaN under the test hook),
    or an empty (0,) tensor of its own when it is not requested (outputs never alias)."""
    if not needed:
        return x.new_empty(0)
    grad = torch.empty_like(x)
    if POISON_OUTPUTS:
        grad.fill_(float("nan"))
    return grad


class GradBuffer:
    """The gradient of x (``result``, laid out as :func:`gradient_like` gives it) and the
    (N, C, L) tensor the kernels write (``flat``): a view of the result when its spatial dims
    merge, else a contiguous buffer that :meth:`finish` copies in (H and W strides swapped, say).
    When the gradient is not requested both are the same empty (0,) tensor (strides() reads
    zeros)."""

    def __init__(self, x: torch.Tensor, needed: bool = True):
        self.result = gradient_like(x, needed)
        self.copy = False
        if not needed:
            self.flat = self.result
            return
        n, c = x.shape[:2]
        try:
            self.flat = self.result.view(n, c, -1)
        except RuntimeError:
            self.flat = new_buffer((n, c, math.prod(x.shape[2:])), x.dtype, x.device)
            self.copy = True

    def finish(self) -> torch.Tensor:
        """The gradient, once the kernels have written ``flat``."""
        if self.copy:
            self.result.copy_(self.flat.view(self.result.shape))
        return self.result


def strides(flat: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, l) strides of an (N, C, L) buffer; zeros for an unused, empty one."""
    return tuple(flat.stride()) if flat.dim() == 3 else (0, 0, 0)


def device_guard(x: torch.Tensor):
    """Launch on x's GPU: Triton launches on the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
