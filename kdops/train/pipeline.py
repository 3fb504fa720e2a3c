"""Runs behind the CLI: train a model (cached by its configuration), distill a student.

A run lives in a folder holding ``checkpoint.pt`` and ``metrics.json``; its checkpoint
records the run's key, a hash of everything that determines the result (models, data,
hyper-parameters, seed, process count). Teachers and plain students go under
``<work_dir>/cache/<role>-<name>-<key>``: a second ``kdops-distill`` with the same settings
reuses them, and an interrupted one resumes them. A named run folder (the distilled student,
``kdops-train``'s model) is never overwritten silently: :func:`plan_run` reuses a finished
run of the same key, and otherwise asks for ``--resume`` or ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Literal
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kdops.models import build_model, load_weights
from kdops.train.data import build_dataset
from kdops.train.distiller import Distiller
from kdops.train.distributed import DistContext
from kdops.train.recipes import Recipe
from kdops.train.trainer import TrainConfig, Trainer

SYNTHETIC = ("synthetic", "synthetic_lanes")


@dataclass(frozen=True)
class ModelSpec:
    """A model by name (``kdops.models.build_model``); ``weights``: a local full-model file
    to start from; ``backbone_weights``: a local (torchvision-format) backbone file."""

    name: str
    backbone: str | None = None
    weights: str | None = None
    backbone_weights: str | None = None

    @property
    def label(self) -> str:
        return self.name if self.backbone is None else f"{self.name}/{self.backbone}"

    def build(self, num_classes: int, ignore_index: int = 255):
        kwargs = {"ignore_index": ignore_index} if self.name == "label_teacher" else {}
        if self.backbone is not None:
            kwargs["backbone"] = self.backbone
        if self.backbone_weights is not None:
            kwargs["backbone_weights"] = self.backbone_weights
        model = build_model(self.name, num_classes, **kwargs)
        if self.weights is not None:
            load_weights(model, self.weights)
        return model


@dataclass(frozen=True)
class DataSpec:
    """A data set: name, folder (real sets), size, and for the synthetic sets the number of
    samples and the generator seed."""

    name: str = "synthetic"
    root: str | None = None
    crop_size: tuple[int, int] | None = None
    train_samples: int | None = None
    val_samples: int | None = None
    data_seed: int = 0

    def build(self):
        kw_train, kw_val = {}, {}
        if self.name in SYNTHETIC:
            kw_train["seed"] = kw_val["seed"] = self.data_seed
            if self.train_samples is not None:
                kw_train["num_samples"] = self.train_samples
            if self.val_samples is not None:
                kw_val["num_samples"] = self.val_samples
        train = build_dataset(self.name, "train", root=self.root, crop_size=self.crop_size, **kw_train)
        val = build_dataset(self.name, "val", root=self.root, crop_size=self.crop_size, **kw_val)
        return train, val


@dataclass
class RunResult:
    """What a finished run produced: its folder, final evaluation, losses and timing."""

    run_dir: str
    metrics: dict
    train_seconds: float
    cached: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def miou(self) -> float:
        return float(self.metrics.get("miou", float("nan")))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def config_hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def write_json(path: str, obj) -> None:
    """JSON written atomically (NaN kept as null)."""
    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    tmp = f"{path}.tmp.{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(clean(obj), f, indent=2)
    os.replace(tmp, path)


Action = Literal["new", "resume", "reuse", "restart"]
RUN_FILES = ("checkpoint.pt", "metrics.json")


class RunFolderError(ValueError):
    """A run folder that holds another run, or no run to resume: the message says what to do."""


@dataclass(frozen=True)
class RunState:
    """What a run folder's ``checkpoint.pt`` says: the step reached of ``steps``, whether
    the run is finished (trained and evaluated at its last step), and its key."""

    step: int
    steps: int
    finished: bool
    key: str | None


def load_checkpoint_file(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def run_state(run_dir: str) -> RunState | None:
    """The state of the run in ``run_dir``; None when it holds no checkpoint."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    try:
        state = load_checkpoint_file(path)
        step, steps = int(state["step"]), int(state["config"]["steps"])
        evaluations = state.get("evaluations") or []
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: say so, never load it as ours
        raise RunFolderError(f"{path} is not a readable kdops checkpoint ({type(e).__name__}); move it away "
                             f"or pass --overwrite") from None
    finished = step == steps and bool(evaluations) and evaluations[-1].get("step") == steps
    return RunState(step, steps, finished, (state.get("meta") or {}).get("run_key"))


def plan_cached(run_dir: str) -> Action:
    """A cache folder (its name holds the key): reuse a finished run, resume an unfinished one."""
    state = run_state(run_dir)
    if state is None:
        return "new"
    return "reuse" if state.finished else "resume"


def plan_run(run_dir: str, key: str, *, resume: bool, overwrite: bool) -> Action:
    """What to do with the named run folder ``run_dir`` for a run of ``key``.

    ``overwrite``: start over ("restart", or "new" if there is nothing); a finished run of
    the same key is reused ("reuse": the same settings give the same result); an unfinished
    one of the same key is continued with ``resume``. Anything else raises
    :class:`RunFolderError` saying which option to pass: a folder is never overwritten
    silently, and ``resume`` with nothing to continue is an error, not a fresh start.
    """
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(run_dir, f))]
    if overwrite:
        return "restart" if existing else "new"
    state = run_state(run_dir)
    if state is None:
        if existing:
            raise RunFolderError(f"{run_dir} holds {', '.join(existing)} but no checkpoint; pass --overwrite to "
                                 f"replace it or --name for another folder")
        return "new"
    progress = f"step {state.step}/{state.steps}"
    if state.key != key:
        raise RunFolderError(f"{run_dir} holds a run with other settings ({progress}); pass --overwrite to "
                             f"replace it or --name for another folder")
    if state.finished:
        return "reuse"
    if resume:
        return "resume"
    raise RunFolderError(f"{run_dir} holds an unfinished run of these settings ({progress}); pass --resume to "
                         f"continue it or --overwrite to start over")


def clear_run(run_dir: str) -> None:
    """Remove the run files of ``run_dir`` (for ``--overwrite``); nothing else in it."""
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)


def cached_run_dir(work_dir: str, role: str, spec: ModelSpec, data_spec: DataSpec, config: TrainConfig,
                   world_size: int, class_weights: list[float] | None) -> tuple[str, str]:
    """(folder, key) of the cached cross-entropy run of ``spec`` under ``<work_dir>/cache``."""
    key = config_hash(role, asdict(spec), asdict(data_spec), config.identity(), world_size, class_weights)
    return os.path.join(work_dir, "cache", f"{role}-{spec.label.replace('/', '-')}-{data_spec.name}-{key}"), key


def train_run(model, distiller_kwargs: dict, data, config: TrainConfig, run_dir: str, *, ctx: DistContext,
              meta: dict, action: Action = "resume") -> tuple[RunResult, Trainer]:
    """Train ``model`` (wrapped in a :class:`Distiller` with ``distiller_kwargs``) in ``run_dir``
    as :func:`plan_run` decided (``action``: "new", "resume" or "reuse" its checkpoint,
    "restart" from scratch). The adapters are initialised from ``config.seed``; dropout
    draws from (seed, rank). Ctrl-C raises :class:`~kdops.train.trainer.TrainingInterrupted`
    after writing a checkpoint."""
    train_set, val_set = data
    if action == "restart" and ctx.is_main:
        clear_run(run_dir)
    seed_everything(config.seed)
    distiller = Distiller(model, num_classes=train_set.num_classes, ignore_index=train_set.ignore_index,
                          total_steps=config.steps, **distiller_kwargs)
    trainer = Trainer(distiller, train_set, val_set, config, run_dir=run_dir, ctx=ctx, meta=meta)
    seed_everything(config.seed + 1_000_003 * ctx.rank)
    metrics = trainer.fit(resume=action in ("resume", "reuse"))
    result = RunResult(run_dir, metrics, trainer.train_seconds, cached=action == "reuse")
    return result, trainer


def cached_model_run(spec: ModelSpec, data_spec: DataSpec, data, config: TrainConfig, work_dir: str, role: str,
                     *, ctx: DistContext, student_input: str = "image",
                     class_weights: list[float] | None = None) -> tuple[RunResult, torch.nn.Module]:
    """Train ``spec`` with cross-entropy alone, or reuse the finished run of the same
    configuration under ``<work_dir>/cache`` (resume an unfinished one); returns the result
    and the trained model."""
    train_set = data[0]
    run_dir, key = cached_run_dir(work_dir, role, spec, data_spec, config, ctx.world_size, class_weights)
    seed_everything(config.seed)
    model = spec.build(train_set.num_classes, train_set.ignore_index)
    action = plan_cached(run_dir)
    if action == "reuse":
        state = load_checkpoint_file(os.path.join(run_dir, "checkpoint.pt"))
        model.load_state_dict(state["model"])
        return RunResult(run_dir, state["evaluations"][-1], state["train_seconds"], cached=True), model
    meta = {"role": role, "model": asdict(spec), "data": asdict(data_spec), "run_key": key}
    result, trainer = train_run(model, {"student_input": student_input, "class_weights": class_weights}, data,
                                config, run_dir, ctx=ctx, meta=meta, action=action)
    if ctx.is_main:
        write_json(os.path.join(run_dir, "metrics.json"), {
            "role": role, "model": spec.label, "data": asdict(data_spec), "config": asdict(config),
            "metrics": result.metrics, "train_seconds": result.train_seconds, "history": trainer.history,
        })
    return result, model


def distill_run(recipe: Recipe, student_spec: ModelSpec, teacher, data_spec: DataSpec, data,
                config: TrainConfig, run_dir: str, *, ctx: DistContext, action: Action,
                backend: str | None = None, class_weights: list[float] | None = None,
                meta: dict | None = None) -> tuple[RunResult, Trainer]:
    """Distill a fresh ``student_spec`` from ``teacher`` with ``recipe`` in ``run_dir`` (``action``
    from :func:`plan_run`; "reuse" loads the finished run); also profiles the recipe's losses
    (time and memory per step) on one training batch."""
    train_set = data[0]
    seed_everything(config.seed)  # the initialisation of the plain student of the same seed
    student = student_spec.build(train_set.num_classes, train_set.ignore_index)
    kwargs = {"recipe": recipe, "teacher": teacher, "backend": backend, "class_weights": class_weights}
    started = time.perf_counter()
    result, trainer = train_run(student, kwargs, data, config, run_dir, ctx=ctx, meta=meta or {}, action=action)
    images, labels = next(iter(trainer.loader(0, 0)))
    images, labels = trainer.to_device(images, labels)
    with trainer.autocast():
        profile = trainer.distiller.profile_losses(images, labels)
    mean_step_ms = 1000 * trainer.train_seconds / max(1, trainer.step)
    result.extra = {"kd_profile": profile, "mean_step_ms": mean_step_ms,
                    "wall_seconds": time.perf_counter() - started}
    return result, trainer

