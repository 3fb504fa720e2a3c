"""Loading of the compiled extension ``kdops._C`` and questions about what it holds.

The package works without the extension (``KDOPS_NO_EXT=1`` installs, failed builds): then
only the reference and Triton backends exist, and :func:`load_error` says why.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from kdops import _C  # noqa: F401  (loading the library registers the kdops:: ops)
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def loaded() -> bool:
    """True when ``kdops._C`` imported (its ops are registered with the dispatcher)."""
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the extension is absent, or None when it loaded."""
    return _load()[1]


def built_with_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    module = _load()[0]
    return bool(getattr(module, "with_cuda", 0)) if module is not None else False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``kdops::<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not loaded():
        return False
    qualname = f"kdops::{op}"
    if not torch._C._dispatch_has_kernel(qualname):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
