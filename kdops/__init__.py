"""kdops: fused kernels for knowledge-distillation losses in semantic segmentation.

Every op takes ``backend=`` ("auto", "reference", "triton", "cuda", "cpu"; default
``$KDOPS_BACKEND`` or "auto"); see :mod:`kdops.backend`.

The public names below are imported on first use (PEP 562): ``import kdops`` alone does not
import torch, so the command-line tools (``kdops.train.cli``) answer ``--help`` and argument
errors at once. ``kdops.channel_kl`` (or ``from kdops import channel_kl``) imports them all.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BACKENDS": "kdops.backend",
    "BackendUnavailableError": "kdops.backend",
    "attention_loss": "kdops.ops.attention",
    "attention_map": "kdops.ops.attention",
    "class_attention_loss": "kdops.ops.attention",
    "class_attention_map": "kdops.ops.attention",
    "channel_correlation": "kdops.ops.correlation",
    "channel_correlation_loss": "kdops.ops.correlation",
    "pairwise_affinity_loss": "kdops.ops.correlation",
    "class_variation_loss": "kdops.ops.prototypes",
    "prototype_kl": "kdops.ops.prototypes",
    "prototype_pool": "kdops.ops.prototypes",
    "channel_kl": "kdops.ops.softmax_kl",
    "pixel_kl": "kdops.ops.softmax_kl",
}

__all__ = sorted(_EXPORTS)
# Submodules reachable as attributes after a bare ``import kdops`` (as when it imported them).
_SUBMODULES = ("backend", "ops", "reference", "losses", "compat", "info", "train", "models", "triton")


def _load_all() -> None:
    # All at once, as the eager import did: the first use of any op registers every op.
    for name, module in _EXPORTS.items():
        globals()[name] = getattr(importlib.import_module(module), name)


def __getattr__(name: str):
    if name in _EXPORTS:
        _load_all()
        return globals()[name]
    if name in _SUBMODULES:
        return importlib.import_module(f"kdops.{name}")
    raise AttributeError(f"module 'kdops' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
