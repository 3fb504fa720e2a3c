"""Helpers shared by the op tests: devices, backends, tolerances, input layouts."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdops import backend as kd_backend


def cpu_and_cuda():
    """Parametrise over "cpu" and "cuda"; the CUDA case skips where there is no GPU."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def fused_backends(op: str, device: str) -> list[str]:
    """The non-reference backends that implement ``op`` and can run on ``device`` here."""
    out = []
    for name in ("cpu", "cuda", "triton"):
        reason = kd_backend.unavailable_reason(op, name, device, torch.float32)
        if reason is None:
            out.append(name)
    return out


def backend_params(op: str):
    """(device, backend) pairs for ``op``: every fused backend, on each device that runs it.

    A backend that implements the op but cannot run here (CUDA absent, extension not built)
    shows up as a skipped case that says why, so a missing build is never silently green.
    """
    params = []
    for device, marks in (("cpu", ()), ("cuda", (pytest.mark.needs_cuda,))):
        for name in ("cpu", "cuda", "triton"):
            if kd_backend.OPS[op].implementation_path(name) is None:
                continue
            if name in ("cpu", "cuda") and name != device:
                continue
            reason = None
            if device == "cpu" or torch.cuda.is_available():
                reason = kd_backend.unavailable_reason(op, name, device, torch.float32)
            case_marks = list(marks)
            if reason is not None:
                case_marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(device, name, marks=case_marks, id=f"{device}-{name}"))
    return params


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖a − e‖ / ‖e‖ in float64 (‖a − e‖ when e is zero)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: "contiguous", "channels_last", "strided"."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        assert x.dim() == 4
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # Every other element of a twice-as-long buffer along the last dim of size > 1
        # (a size-1 dim's stride does not make a tensor non-contiguous).
        dims = [d for d in range(x.dim()) if x.shape[d] > 1]
        if not dims:
            return x.contiguous()
        dim = dims[-1]
        shape = list(x.shape)
        shape[dim] *= 2
        wide = torch.empty(shape, dtype=x.dtype, device=x.device)
        view = wide.narrow(dim, 0, shape[dim]).unfold(dim, 1, 2).squeeze(-1)
        view.copy_(x)
        assert not view.is_contiguous() and view.shape == x.shape
        return view
    raise ValueError(layout)


LAYOUTS = ("contiguous", "channels_last", "strided")

# Tolerances of DESIGN.md against the float64 reference: (dtype, loss rtol, grad rel-norm).
TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-4, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-4, 1e-2, id="bf16"),
]


class OpCalls(TorchDispatchMode):
    """Records (args, outputs) of every call of the ops named (``torch.ops`` names without the
    namespace or overload, e.g. "pixel_kl_backward") while the mode is active: which gradients a
    backward op was asked for, and what it returned."""

    def __init__(self, *names: str):
        super().__init__()
        self.names = names
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.names:
            self.calls.append((args, out))
        return out
