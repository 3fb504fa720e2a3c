"""Loading local weight files into models and backbones. Nothing is ever downloaded."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn as nn

# Keys listed per category in an error message; the rest are counted.
_MAX_LISTED = 20


class LoadResult(NamedTuple):
    """Keys that did not match (only non-empty with ``strict=False``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _state_dict_of(checkpoint: object, path: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dict with a 'state_dict' or "
                         f"'model' entry, got {type(checkpoint).__name__}")
    for key, value in checkpoint.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: not a state dict: entry {key!r} is a {type(value).__name__}, "
                             f"not a tensor (a checkpoint needs a 'state_dict' or 'model' entry)")
    return checkpoint


def _strip_module(key: str) -> str:
    # DataParallel / DistributedDataParallel checkpoints prefix every key, possibly repeatedly.
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def load_weights(module: nn.Module, path: str | os.PathLike, *, prefix: str | None = None,
                 strict: bool = True) -> LoadResult:
    """Load a local ``.pth``/``.pt`` file into ``module`` (in place).

    The file may hold a raw state dict or a checkpoint dict whose ``"state_dict"`` or
    ``"model"`` entry is one. It is read with ``torch.load(weights_only=True,
    map_location="cpu")``; ``module.``-prefixes (DataParallel) are stripped. With ``prefix``
    (e.g. ``"backbone."``), only keys starting with it are used, with the prefix removed.
    Keys under ``module.ignored_checkpoint_prefixes`` are dropped: backbones declare there
    the torchvision classifier (``fc.*`` / ``classifier.*``) they do not have. Missing
    BatchNorm ``num_batches_tracked`` entries (old torchvision files) are tolerated.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is not a
    state dict, and ``RuntimeError`` listing the offending keys for a shape mismatch, or with
    ``strict`` for missing or unexpected keys. Returns the (missing, unexpected) keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path!r} (weights are never downloaded)")
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path)
    state = {_strip_module(k): v for k, v in state.items()}
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise RuntimeError(f"{path}: no key starts with prefix {prefix!r}")
    ignored = getattr(module, "ignored_checkpoint_prefixes", ())
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}

    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_list(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_list(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    if problems:
        raise RuntimeError(f"cannot load {path} into {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadResult(missing, unexpected)
