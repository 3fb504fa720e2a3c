"""Command-line entry points: ``kdops-train`` and ``kdops-distill``.

``kdops-train`` trains one model (a teacher, a plain student, LGAD's label teacher) with
cross-entropy. ``kdops-distill --recipe NAME[+NAME...]`` trains (or reuses) the teacher, the
student without distillation, and the student with the recipe, then prints a summary: the
mIoU of each, and the time and memory the distillation losses cost. With no data argument
both run on the built-in synthetic set, so ``kdops-distill --recipe cwd`` works out of the box.

Both run under ``torchrun --nproc_per_node N`` (DistributedDataParallel; ``--batch-size``
is per process). Bad arguments end with a one-line message and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch

from kdops.backend import BACKENDS
from kdops.models import BACKBONE_NAMES, MODEL_NAMES
from kdops.train.data import DATASET_NAMES
from kdops.train.distributed import DistContext, init_from_env
from kdops.train.pipeline import (
    SYNTHETIC,
    DataSpec,
    ModelSpec,
    RunResult,
    cached_model_run,
    config_hash,
    distill_run,
    seed_everything,
    train_run,
    write_json,
)
from kdops.train.recipes import Recipe, get_recipe, recipe_names
from kdops.train.trainer import TrainConfig

# The built-in main job: small enough to train teacher, plain student and distilled student
# in a few minutes on two CPU cores, with a teacher clearly better than the student.
DEFAULT_TEACHER = ModelSpec("pspnet", "resnet18")
DEFAULT_STUDENT = ModelSpec("deeplabv3", "resnet18")
DEFAULT_LANE_STUDENT = ModelSpec("erfnet")
DEFAULT_STEPS = 100
DEFAULT_TEACHER_STEPS = 200
DEFAULT_LABEL_TEACHER_STEPS = 100
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 0.01
DEFAULT_SYNTHETIC_SAMPLES = (1200, 200)
DEFAULT_SYNTHETIC_SIZE = (48, 48)


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints a usage block; one line is clearer
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- arguments ---------------------------------------------------------------------------------
def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASET_NAMES, default=None,
                       help="data set (default: synthetic, or synthetic_lanes for the lane recipes)")
    group.add_argument("--data-root", default=None, help="folder of a real data set (voc, cityscapes, culane)")
    group.add_argument("--crop-size", type=int, nargs="+", default=None, metavar="SIZE",
                       help="H [W]: training crop / synthetic image size (synthetic default 48)")
    group.add_argument("--train-samples", type=int, default=None, help="synthetic: number of training samples")
    group.add_argument("--val-samples", type=int, default=None, help="synthetic: number of validation samples")
    group.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed")
    group.add_argument("--background-weight", type=float, default=None,
                       help="cross-entropy weight of class 0 (default 0.4 on lane data, as SCNN / ENet-SAD; else 1)")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    group.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="batch size per process")
    group.add_argument("--lr", type=float, default=None,
                       help="initial learning rate, poly schedule with power 0.9 (default 0.01; 0.05 for the "
                            "lane recipes)")
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, default=1e-4)
    group.add_argument("--clip-grad", type=float, default=10.0, help="gradient-norm clip (0: off)")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and dropout")
    group.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    group.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps")
    group.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument("--threads", type=int, default=None,
                       help="intra-op CPU threads per process (default on CPU: 1, which is fastest for these small "
                            "models on shared cores and what torchrun uses; raise it on an idle many-core machine)")
    group.add_argument("--no-amp", action="store_true", help="no autocast on CUDA")
    group.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    group.add_argument("--backend", choices=("auto",) + BACKENDS, default=None,
                       help="kdops backend of the loss ops (default: $KDOPS_BACKEND or auto)")
    group.add_argument("--work-dir", default="runs", help="where runs and cached models go (default: runs)")
    group.add_argument("--resume", action="store_true", help="continue the run's checkpoint if there is one")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _crop(values) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"--crop-size takes one or two positive sizes, got {values}")
    return (values[0], values[-1])


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def _data_spec(args, default_dataset: str) -> DataSpec:
    name = args.dataset or default_dataset
    _positive("--train-samples", args.train_samples)
    _positive("--val-samples", args.val_samples)
    if name in SYNTHETIC:
        if args.data_root is not None:
            raise UsageError(f"--data-root is for the real data sets; {name!r} is generated")
        train_samples, val_samples = DEFAULT_SYNTHETIC_SAMPLES
        size = _crop(args.crop_size) or DEFAULT_SYNTHETIC_SIZE
        return DataSpec(name, None, size, args.train_samples or train_samples, args.val_samples or val_samples,
                        args.data_seed)
    if args.data_root is None:
        raise UsageError(f"--dataset {name} needs --data-root (the folder holding the data)")
    if not os.path.isdir(args.data_root):
        raise UsageError(f"data folder not found: {args.data_root}")
    return DataSpec(name, args.data_root, _crop(args.crop_size))


LANE_DATASETS = ("synthetic_lanes", "culane")


def _class_weights(args, data_spec: DataSpec, num_classes: int) -> list[float] | None:
    """Cross-entropy class weights: the background's from --background-weight."""
    weight = args.background_weight
    if weight is None:
        weight = 0.4 if data_spec.name in LANE_DATASETS else 1.0
    if not 0.0 <= weight < math.inf:
        raise UsageError(f"--background-weight must be a finite number >= 0, got {weight}")
    return None if weight == 1.0 else [weight] + [1.0] * (num_classes - 1)


def _train_config(args, steps: int, desc: str, default_lr: float = DEFAULT_LR) -> TrainConfig:
    _positive("--steps", steps)
    _positive("--batch-size", args.batch_size)
    try:
        return TrainConfig(
            steps=steps, batch_size=args.batch_size, lr=default_lr if args.lr is None else args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay, clip_grad=args.clip_grad or None, amp=not args.no_amp,
            channels_last=not args.no_channels_last, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, seed=args.seed, num_workers=args.num_workers,
            progress=not args.no_progress, desc=desc,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _build_data(spec: DataSpec):
    try:
        return spec.build()
    except FileNotFoundError as e:
        raise UsageError(f"data folder problem: {e}") from None
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _weights_classes(path: str) -> int | None:
    """The class count a weights file was trained for (its classifier's rows), if readable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported as a usage error
        raise UsageError(f"cannot read weights file {path}: {e}") from None
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    for key, value in state.items() if isinstance(state, dict) else ():
        if isinstance(key, str) and key.endswith("classifier.weight") and "aux" not in key and value.dim() == 4:
            return int(value.shape[0])
    return None


def _check_model(spec: ModelSpec, role: str, num_classes: int) -> None:
    """``role``: "student", "teacher", or "" for kdops-train's model."""
    who = f"{role} " if role else ""
    if spec.name not in MODEL_NAMES:
        raise UsageError(f"unknown {who}model {spec.name!r}; choose from {', '.join(MODEL_NAMES)}")
    if spec.backbone is not None and spec.backbone not in BACKBONE_NAMES:
        raise UsageError(f"unknown {who}backbone {spec.backbone!r}; choose from {', '.join(BACKBONE_NAMES)}")
    for path in (spec.weights, spec.backbone_weights):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{who}weights file not found: {path}")
    if spec.weights is not None:
        classes = _weights_classes(spec.weights)
        if classes is not None and classes != num_classes:
            owner = "the data set and student have" if role == "teacher" else "the data set has"
            raise UsageError(f"class-count mismatch: the {who}weights {spec.weights} predict {classes} classes, "
                             f"{owner} {num_classes}")
    try:
        spec.build(num_classes)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise UsageError(f"{role or 'model'}: {e}") from None


def _model_spec(name, backbone, weights, backbone_weights=None) -> ModelSpec:
    if name in ("erfnet", "label_teacher"):
        if backbone is not None:
            raise UsageError(f"{name} has a fixed encoder and takes no backbone (got {backbone!r})")
        return ModelSpec(name, None, weights, backbone_weights)
    return ModelSpec(name, backbone or "resnet18", weights, backbone_weights)


def _context(args) -> DistContext:
    _positive("--threads", args.threads)
    try:
        ctx = init_from_env(args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.threads is not None or ctx.device.type == "cpu":
        # Two OpenMP threads on two cores that another process also uses run many times
        # slower than one (they spin-wait for each other); one thread per process is robust.
        torch.set_num_threads(args.threads or 1)
    return ctx


# -- output ------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _seconds(result: RunResult) -> str:
    return f"{result.train_seconds:.0f} s" + (" (cached)" if result.cached else "")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _describe_data(spec: DataSpec, data) -> str:
    train, val = data
    size = f", {spec.crop_size[0]}x{spec.crop_size[1]}" if spec.crop_size else ""
    return f"{spec.name} ({len(train)} train / {len(val)} val{size}, {train.num_classes} classes)"


# -- kdops-train -------------------------------------------------------------------------------
def _train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdops-train", description="Train a segmentation model (a teacher or a plain "
                     "student) with cross-entropy.")
    parser.add_argument("--model", default="pspnet", help=f"one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--backbone", default=None, help=f"one of {', '.join(BACKBONE_NAMES)} (pspnet/deeplabv3)")
    parser.add_argument("--weights", default=None, help="full-model weights file to start from")
    parser.add_argument("--backbone-weights", default=None, help="torchvision-format backbone weights file")
    parser.add_argument("--name", default=None, help="run folder name under --work-dir")
    _add_data_args(parser)
    _add_train_args(parser)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    """``kdops-train``: returns the exit code (2 for bad arguments)."""
    try:
        args = _train_parser().parse_args(argv)
        spec = _model_spec(args.model, args.backbone, args.weights, args.backbone_weights)
        data_spec = _data_spec(args, "synthetic_lanes" if spec.name == "erfnet" else "synthetic")
        data = _build_data(data_spec)
        num_classes = data[0].num_classes
        _check_model(spec, "", num_classes)
        class_weights = _class_weights(args, data_spec, num_classes)
        config = _train_config(args, args.steps, spec.label)
        ctx = _context(args)
    except UsageError as e:
        print(f"kdops-train: error: {e}", file=sys.stderr)
        return 2
    name = args.name or f"{spec.label.replace('/', '-')}-{data_spec.name}-s{args.seed}"
    run_dir = os.path.join(args.work_dir, name)
    seed_everything(config.seed)
    model = spec.build(num_classes, data[0].ignore_index)
    student_input = "labels" if spec.name == "label_teacher" else "image"
    meta = {"role": "model", "model": asdict(spec), "data": asdict(data_spec)}
    result, trainer = train_run(model, {"student_input": student_input, "class_weights": class_weights}, data,
                                config, run_dir, ctx=ctx, meta=meta, resume=args.resume)
    if ctx.is_main:
        metrics_path = os.path.join(run_dir, "metrics.json")
        write_json(metrics_path, {"model": spec.label, "data": asdict(data_spec), "config": asdict(config),
                                  "metrics": result.metrics, "train_seconds": result.train_seconds,
                                  "history": trainer.history})
        print(f"\n{spec.label} on {_describe_data(data_spec, data)}")
        print(_table([("model", "mIoU", "pixel acc", "train time"),
                      (spec.label, _pct(result.metrics.get("miou")), _pct(result.metrics.get("pixel_acc")),
                       _seconds(result))]))
        print(f"checkpoint: {os.path.join(run_dir, 'checkpoint.pt')}\nmetrics:    {metrics_path}")
    return 0


# -- kdops-distill -----------------------------------------------------------------------------
def _distill_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdops-distill", description="Distill a segmentation student with a recipe "
                     f"({', '.join(recipe_names())}; combine with '+', e.g. cwd+kd).")
    parser.add_argument("--recipe", required=True, help="recipe name(s) joined by '+'")
    parser.add_argument("--weight", action="append", default=[], metavar="TERM=VALUE",
                        help="override a term's weight, e.g. cwd/logits=1 (repeatable)")
    parser.add_argument("--teacher", default=None, help="teacher model (default pspnet; label_teacher for lgad)")
    parser.add_argument("--teacher-backbone", default=None)
    parser.add_argument("--teacher-weights", default=None, help="trained teacher weights (skips teacher training)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help=f"steps to train the teacher when no weights are given (default {DEFAULT_TEACHER_STEPS}, "
                             f"label teacher {DEFAULT_LABEL_TEACHER_STEPS})")
    parser.add_argument("--student", default=None, help="student model (default deeplabv3; erfnet on lanes)")
    parser.add_argument("--student-backbone", default=None)
    parser.add_argument("--student-backbone-weights", default=None, help="torchvision-format backbone weights")
    parser.add_argument("--no-baseline", action="store_true", help="skip the student trained without distillation")
    parser.add_argument("--name", default=None, help="run folder name under --work-dir")
    _add_data_args(parser)
    _add_train_args(parser)
    return parser


def _recipe(args) -> Recipe:
    try:
        recipe = get_recipe(args.recipe)
    except ValueError as e:
        raise UsageError(str(e)) from None
    weights = {}
    for item in args.weight:
        term, sep, value = item.partition("=")
        try:
            weights[term.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not 0.0 <= weights[term.strip()] < math.inf:
            raise UsageError(f"--weight takes TERM=VALUE with a finite VALUE >= 0, got {item!r}")
    try:
        return recipe.with_weights(weights)
    except ValueError as e:
        raise UsageError(str(e)) from None


def distill_main(argv: list[str] | None = None) -> int:
    """``kdops-distill``: returns the exit code (2 for bad arguments)."""
    wall_start = time.perf_counter()
    try:
        args = _distill_parser().parse_args(argv)
        recipe = _recipe(args)
        data_spec = _data_spec(args, recipe.defaults.get("dataset", "synthetic"))
        data = _build_data(data_spec)
        num_classes = data[0].num_classes
        lanes = data_spec.name in LANE_DATASETS
        class_weights = _class_weights(args, data_spec, num_classes)
        student_default = DEFAULT_LANE_STUDENT if lanes else DEFAULT_STUDENT
        student = _model_spec(args.student or student_default.name,
                              args.student_backbone or (student_default.backbone if not args.student else None),
                              None, args.student_backbone_weights)
        _check_model(student, "student", num_classes)
        teacher_spec = None
        if recipe.teacher == "labels":
            if args.teacher not in (None, "label_teacher"):
                raise UsageError(f"recipe {recipe.name!r} distills from LGAD's label teacher; --teacher must be "
                                 f"label_teacher, got {args.teacher!r}")
            teacher_spec = _model_spec("label_teacher", args.teacher_backbone, args.teacher_weights)
        elif recipe.teacher == "model":
            default_backbone = DEFAULT_TEACHER.backbone if not args.teacher else None
            teacher_spec = _model_spec(args.teacher or DEFAULT_TEACHER.name, args.teacher_backbone or default_backbone,
                                       args.teacher_weights)
        elif args.teacher or args.teacher_weights:
            raise UsageError(f"recipe {recipe.name!r} is self-distillation and takes no teacher")
        if teacher_spec is not None:
            _check_model(teacher_spec, "teacher", num_classes)
        default_teacher_steps = DEFAULT_LABEL_TEACHER_STEPS if recipe.teacher == "labels" else DEFAULT_TEACHER_STEPS
        # A recipe's usual learning rate belongs to its usual data set and student.
        usual = recipe.defaults
        usual_setting = data_spec.name == usual.get("dataset") and student.name == usual.get("student")
        default_lr = usual.get("lr", DEFAULT_LR) if usual_setting else DEFAULT_LR
        teacher_config = _train_config(args, args.teacher_steps or default_teacher_steps,
                                       f"teacher {teacher_spec.label}" if teacher_spec else "teacher", default_lr)
        student_config = _train_config(args, args.steps, f"student {student.label}", default_lr)
        distill_config = replace(student_config, desc=f"student {student.label} + {recipe.name}")
        ctx = _context(args)
    except UsageError as e:
        print(f"kdops-distill: error: {e}", file=sys.stderr)
        return 2

    teacher_result = teacher = None
    if teacher_spec is not None:
        if teacher_spec.weights is not None:
            teacher = teacher_spec.build(num_classes, data[0].ignore_index)
        else:
            role = "label_teacher" if recipe.teacher == "labels" else "teacher"
            teacher_result, teacher = cached_model_run(
                teacher_spec, data_spec, data, teacher_config, args.work_dir, role, ctx=ctx,
                student_input="labels" if recipe.teacher == "labels" else "image", class_weights=class_weights)
    baseline = None
    if not args.no_baseline:
        baseline, _ = cached_model_run(student, data_spec, data, student_config, args.work_dir, "student", ctx=ctx,
                                       class_weights=class_weights)

    weights = {t.name: t.weight for t in recipe.terms}
    key = config_hash(recipe.name, weights, asdict(student), asdict(teacher_spec) if teacher_spec else None,
                      teacher_result.run_dir if teacher_result else None, asdict(data_spec),
                      distill_config.identity(), ctx.world_size, class_weights)
    name = args.name or f"{recipe.name}-{student.label.replace('/', '-')}-{data_spec.name}-{key}"
    run_dir = os.path.join(args.work_dir, name)
    meta = {"role": "distilled", "recipe": recipe.name, "weights": weights, "student": asdict(student),
            "teacher": asdict(teacher_spec) if teacher_spec else None, "data": asdict(data_spec)}
    result, trainer = distill_run(recipe, student, teacher, data_spec, data, distill_config, run_dir, ctx=ctx,
                                  resume=args.resume, backend=args.backend, class_weights=class_weights, meta=meta)
    if not ctx.is_main:
        return 0

    profile = result.extra["kd_profile"]
    summary = {
        "recipe": recipe.name, "terms": weights, "student": student.label,
        "teacher": teacher_spec.label if teacher_spec else None, "data": asdict(data_spec),
        "config": asdict(distill_config), "processes": ctx.world_size, "class_weights": class_weights,
        "metrics": result.metrics,
        "baseline_metrics": baseline.metrics if baseline else None,
        "teacher_metrics": teacher_result.metrics if teacher_result else None,
        "miou": result.miou, "baseline_miou": baseline.miou if baseline else None,
        "teacher_miou": teacher_result.miou if teacher_result else None,
        "train_seconds": result.train_seconds, "mean_step_ms": result.extra["mean_step_ms"],
        "kd_loss_ms_per_step": profile.get("ms"), "kd_loss_saved_bytes": profile.get("saved_bytes"),
        "kd_loss_peak_cuda_bytes": profile.get("peak_bytes"),
        "wall_seconds": time.perf_counter() - wall_start,
        "history": trainer.history, "evaluations": trainer.evaluations,
    }
    metrics_path = os.path.join(run_dir, "metrics.json")
    write_json(metrics_path, summary)

    rows = [("model", "role", "mIoU", "pixel acc", "train time")]
    if teacher_spec is not None:
        if teacher_result is not None:
            rows.append((teacher_spec.label, "teacher", _pct(teacher_result.miou),
                         _pct(teacher_result.metrics.get("pixel_acc")), _seconds(teacher_result)))
        else:
            rows.append((teacher_spec.label, "teacher", "—", "—", "(given)"))
    if baseline is not None:
        rows.append((student.label, "student", _pct(baseline.miou), _pct(baseline.metrics.get("pixel_acc")),
                     _seconds(baseline)))
    rows.append((f"{student.label} + {recipe.name}", "distilled", _pct(result.miou),
                 _pct(result.metrics.get("pixel_acc")), _seconds(result)))
    print(f"\nkdops-distill --recipe {recipe.name} on {_describe_data(data_spec, data)}")
    print(_table(rows))
    if baseline is not None:
        print(f"distillation: {100 * (result.miou - baseline.miou):+.1f} mIoU over the student trained alone")
    if profile:
        memory = f"{profile['saved_bytes'] / 2**20:.2f} MiB saved for backward"
        if profile.get("peak_bytes") is not None:
            memory += f", {profile['peak_bytes'] / 2**20:.1f} MiB peak CUDA"
        share = 100 * profile["ms"] / result.extra["mean_step_ms"] if result.extra["mean_step_ms"] else float("nan")
        print(f"KD losses: {profile['ms']:.2f} ms per step forward+backward ({share:.2g}% of a training step), "
              f"{memory}")
    print(f"total time: {summary['wall_seconds']:.0f} s\ncheckpoint: {os.path.join(run_dir, 'checkpoint.pt')}\n"
          f"metrics:    {metrics_path}")
    return 0

