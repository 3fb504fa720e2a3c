"""Helpers shared by the drop-in modules."""
from __future__ import annotations

import torch

from kdops import _checks

# The ignore_index the drop-ins hand the kdops ops after mapping every label outside
# [0, num_classes) to it (the upstream losses treat such pixels as belonging to no class).
NO_CLASS = -1


def same_spatial(name_s: str, s: torch.Tensor, name_t: str, t: torch.Tensor) -> None:
    """The upstream loss subtracts maps of the two: their batch and spatial sizes must agree."""
    _checks.tensor(name_s, s, min_dim=3)
    _checks.tensor(name_t, t, min_dim=3)
    if t.shape[0] != s.shape[0] or t.shape[2:] != s.shape[2:]:
        raise ValueError(
            f"{name_t} must have the batch size and spatial shape of {name_s} {tuple(s.shape)}, "
            f"got shape {tuple(t.shape)}"
        )


def classes_or_no_class(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 labels with every value outside [0, num_classes) set to ``NO_CLASS``.

    IFVD / CIRKD match the label map against each class id in turn, so any other value (255,
    CIRKD's -1) is a pixel of no class. Elementwise: no host synchronisation.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    target = target.long()
    return torch.where((target >= 0) & (target < num_classes), target, NO_CLASS)


def pick(name: str, outputs, index):
    """``outputs[index]`` of a model's output list, with an error naming the argument."""
    try:
        return outputs[index]
    except (IndexError, KeyError, TypeError) as error:
        raise type(error)(f"{name}[{index!r}] does not exist: {error}") from None


def not_installed_error(package: str) -> ImportError:
    return ImportError(
        f"kdops.compat.{package}.register() adds the kdops drop-ins to {package}'s registry, but "
        f"{package} is not installed (pip install {package}); pass registry=... to register them "
        "in another registry"
    )
