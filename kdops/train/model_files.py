"""Model weights files for the command line: read without running code, matched to a model.

A file given with --weights / --teacher-weights is read with ``weights_only=True`` (no code from
it ever runs), checked against the data set's class count and the chosen model's state-dict
shapes, and, when it holds another kdops model's weights, the error says which options select
that model. Every problem is a one-line :class:`UsageError` (exit code 2), never a traceback.
"""
from __future__ import annotations

import functools

from kdops.train.names import BACKBONE_NAMES, MODEL_NAMES, MODELS_WITHOUT_BACKBONE


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


def read_state(path: str, option: str):
    """The tensors of a weights file, or a one-line UsageError saying why not. Read with
    ``weights_only=True`` always: no code in a file from elsewhere ever runs."""
    import pickle
    import zipfile

    from kdops.train.pipeline import load_checkpoint_file

    try:
        state = load_checkpoint_file(path)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path) and "GLOBAL" in str(e):
            raise UsageError(f"{option} {path}: the file holds pickled Python objects, which kdops does not load "
                             f"(torch.load(weights_only=True) runs no code from files); save a plain state dict: "
                             f"torch.save(model.state_dict(), path)") from None
        raise UsageError(f"{option} {path}: not a PyTorch weights file (torch.load cannot read it)") from None
    except Exception:  # noqa: BLE001 - whatever torch.load trips on, the file is not weights
        raise UsageError(f"{option} {path}: not a PyTorch weights file (torch.load cannot read it)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and hasattr(v, "shape") for k, v in state.items()):
        raise UsageError(f"{option} {path}: no state dict in the file (expected a state dict, or a checkpoint with "
                         f"a 'state_dict' or 'model' entry)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def file_classes(state) -> int | None:
    """The class count a state dict was trained for (its classifier's rows), if it says."""
    for key, value in state.items():
        if key.endswith("classifier.weight") and "aux" not in key and value.dim() == 4:
            return int(value.shape[0])
    return None


def state_shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def fits_model(state, model) -> bool:
    return state_shapes(state) == state_shapes(model.state_dict())


@functools.lru_cache(maxsize=None)
def model_shapes(name: str, backbone: str | None, num_classes: int) -> tuple:
    """The state-dict shapes of a kdops model, built on the meta device (no memory, no
    initialisation cost)."""
    import torch

    from kdops.models import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes, **({"backbone": backbone} if backbone else {}))
    return tuple(sorted(state_shapes(model.state_dict()).items()))


def models_that_fit(state, num_classes: int) -> list[tuple[str, str | None]]:
    """The (model, backbone) pairs whose state dict has the file's keys and shapes."""
    given = tuple(sorted(state_shapes(state).items()))
    return [(name, backbone) for name in MODEL_NAMES
            for backbone in ((None,) if name in MODELS_WITHOUT_BACKBONE else BACKBONE_NAMES)
            if model_shapes(name, backbone, num_classes) == given]


def check_weights(spec, options: tuple[str, str, str], num_classes: int, model) -> None:
    """A full-model weights file: readable, of ``num_classes`` classes, and of this model;
    if it is of another kdops model, the message says which options select it.
    ``options``: the (model, backbone, weights) option names of this role."""
    model_option, backbone_option, weights_option = options
    state = read_state(spec.weights, weights_option)
    classes = file_classes(state)
    if classes is not None and classes != num_classes:
        raise UsageError(f"class-count mismatch: {weights_option} {spec.weights} predicts {classes} classes, "
                         f"the data set has {num_classes}")
    if fits_model(state, model):
        return
    fits = models_that_fit(state, num_classes)
    if fits:
        name, backbone = fits[0]
        hint = [] if name == spec.name else [f"{model_option} {name}"]
        if backbone is not None:
            hint.append(f"{backbone_option} {backbone}")
        label = name if backbone is None else f"{name}/{backbone}"
        raise UsageError(f"{weights_option} {spec.weights} holds {label} weights, not {spec.label}: "
                         f"pass {' '.join(hint)}")
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    detail = "; ".join(part for part in (
        f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}, ...)" if unexpected else "",
        f"{len(missing)} missing ({', '.join(missing[:3])}, ...)" if missing else "") if part)
    raise UsageError(f"{weights_option} {spec.weights} does not fit {spec.label} nor any other kdops model"
                     + (f": {detail}" if detail else ": parameter shapes differ"))


def build_checked(spec, options: tuple[str, str, str], num_classes: int, ignore_index: int):
    """Build the model of ``spec`` (its weights checked and loaded): a UsageError, not a
    traceback, when a file does not fit."""
    from kdops.train.pipeline import ModelSpec

    if spec.weights is not None:
        bare = ModelSpec(spec.name, spec.backbone, None, spec.backbone_weights)
        check_weights(spec, options, num_classes, build_checked(bare, options, num_classes, ignore_index))
    try:
        return spec.build(num_classes, ignore_index)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        where = f"{options[1]}-weights {spec.backbone_weights}" if spec.backbone_weights else spec.label
        raise UsageError(f"{where}: {e}") from None
