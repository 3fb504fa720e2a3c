"""Launcher helpers shared by the Triton op families: output buffers, layouts, devices.

``POISON_OUTPUTS`` is a test hook: while it is true every buffer :func:`new_buffer` makes
starts as NaN (integers: their minimum), so a test proves that the kernels write every
element they return.
"""
from __future__ import annotations

import contextlib

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


def grad_buffers(x: torch.Tensor, needed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of x shaped like x, its (N, C, L) view that the kernels write).

    Channels-last when x is (stride 1 over C, as the autograd engine likes a gradient laid
    out like its input), contiguous otherwise — what empty_like(x) gives, as the fake kernels
    promise; an empty (0,) tensor, twice, when the gradient is not requested.
    """
    if not needed:
        empty = x.new_empty(0)
        return empty, empty
    flat = flatten(x)
    n, c, length = flat.shape
    if flat.stride(1) == 1 and flat.stride(2) != 1:
        grad_flat = new_buffer((n, length, c), x.dtype, x.device).permute(0, 2, 1)
    else:
        grad_flat = new_buffer((n, c, length), x.dtype, x.device)
    return grad_flat.view(x.shape), grad_flat


def strides(flat: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, l) strides of an (N, C, L) buffer; zeros for an unused, empty one."""
    return tuple(flat.stride()) if flat.dim() == 3 else (0, 0, 0)


def device_guard(x: torch.Tensor):
    """Launch on x's GPU: Triton launches on the current device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
