"""Runs behind the CLI: train a model (cached by its configuration), distill a student.

A run lives in a folder holding ``checkpoint.pt`` and ``metrics.json``. Teachers and plain
students go under ``<work_dir>/cache/<name>-<hash>``, where the hash covers everything that
determines the result (models, data, hyper-parameters, seed, process count): a second
``kdops-distill`` with the same settings reuses them, and an interrupted one resumes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
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


def finished_checkpoint(run_dir: str, steps: int) -> dict | None:
    """The checkpoint in ``run_dir`` if it holds a completed, evaluated run, else None."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    evaluations = state.get("evaluations") or []
    if state.get("step") == steps and evaluations and evaluations[-1].get("step") == steps:
        return state
    return None


def train_run(model, distiller_kwargs: dict, data, config: TrainConfig, run_dir: str, *, ctx: DistContext,
              meta: dict, resume: bool = True) -> tuple[RunResult, Trainer]:
    """Train ``model`` (wrapped in a :class:`Distiller` with ``distiller_kwargs``) in ``run_dir``,
    resuming its checkpoint. The adapters are initialised from ``config.seed``; dropout draws
    from (seed, rank)."""
    train_set, val_set = data
    seed_everything(config.seed)
    distiller = Distiller(model, num_classes=train_set.num_classes, ignore_index=train_set.ignore_index,
                          total_steps=config.steps, **distiller_kwargs)
    trainer = Trainer(distiller, train_set, val_set, config, run_dir=run_dir, ctx=ctx, meta=meta)
    seed_everything(config.seed + 1_000_003 * ctx.rank)
    metrics = trainer.fit(resume=resume)
    result = RunResult(run_dir, metrics, trainer.train_seconds)
    return result, trainer


def cached_model_run(spec: ModelSpec, data_spec: DataSpec, data, config: TrainConfig, work_dir: str, role: str,
                     *, ctx: DistContext, student_input: str = "image",
                     class_weights: list[float] | None = None) -> tuple[RunResult, torch.nn.Module]:
    """Train ``spec`` with cross-entropy alone, or reuse the finished run of the same
    configuration under ``<work_dir>/cache``; returns the result and the trained model."""
    train_set = data[0]
    key = config_hash(role, asdict(spec), asdict(data_spec), config.identity(), ctx.world_size, class_weights)
    run_dir = os.path.join(work_dir, "cache", f"{role}-{spec.label.replace('/', '-')}-{data_spec.name}-{key}")
    seed_everything(config.seed)
    model = spec.build(train_set.num_classes, train_set.ignore_index)
    state = finished_checkpoint(run_dir, config.steps)
    if state is not None:
        model.load_state_dict(state["model"])
        return RunResult(run_dir, state["evaluations"][-1], state["train_seconds"], cached=True), model
    meta = {"role": role, "model": asdict(spec), "data": asdict(data_spec)}
    result, trainer = train_run(model, {"student_input": student_input, "class_weights": class_weights}, data,
                                config, run_dir, ctx=ctx, meta=meta)
    if ctx.is_main:
        write_json(os.path.join(run_dir, "metrics.json"), {
            "role": role, "model": spec.label, "data": asdict(data_spec), "config": asdict(config),
            "metrics": result.metrics, "train_seconds": result.train_seconds, "history": trainer.history,
        })
    return result, model


def distill_run(recipe: Recipe, student_spec: ModelSpec, teacher, data_spec: DataSpec, data,
                config: TrainConfig, run_dir: str, *, ctx: DistContext, resume: bool,
                backend: str | None = None, class_weights: list[float] | None = None,
                meta: dict | None = None) -> tuple[RunResult, Trainer]:
    """Distill a fresh ``student_spec`` from ``teacher`` with ``recipe`` in ``run_dir``; also
    profiles the recipe's losses (time and memory per step) on one training batch."""
    train_set = data[0]
    seed_everything(config.seed)  # the initialisation of the plain student of the same seed
    student = student_spec.build(train_set.num_classes, train_set.ignore_index)
    kwargs = {"recipe": recipe, "teacher": teacher, "backend": backend, "class_weights": class_weights}
    started = time.perf_counter()
    result, trainer = train_run(student, kwargs, data, config, run_dir, ctx=ctx, meta=meta or {}, resume=resume)
    images, labels = next(iter(trainer.loader(0, 0)))
    images, labels = trainer.to_device(images, labels)
    with trainer.autocast():
        profile = trainer.distiller.profile_losses(images, labels)
    mean_step_ms = 1000 * trainer.train_seconds / max(1, trainer.step)
    result.extra = {"kd_profile": profile, "mean_step_ms": mean_step_ms,
                    "wall_seconds": time.perf_counter() - started}
    return result, trainer

