"""Command-line entry points: ``kdops-train`` and ``kdops-distill``.

``kdops-train`` trains one model (a teacher, a plain student, LGAD's label teacher) with
cross-entropy. ``kdops-distill --recipe NAME[+NAME...]`` trains (or reuses) the teacher, the
student without distillation, and the student with the recipe, then prints a summary: the
mIoU of each, the time and memory the distillation losses cost, and the wall time. With no
data argument both run on the built-in synthetic set, so ``kdops-distill --recipe cwd``
works out of the box.

Both run under ``torchrun --nproc_per_node N`` (DistributedDataParallel; ``--batch-size``
is per process).

Every argument is checked before any work, in two stages: what needs no torch (names,
numbers, paths, the device string) before torch is even imported, so a typo is answered in
a fraction of a second; then what needs it (weights files against the models, the backend
against the recipe's ops on the device, run folders). A bad argument ends with one line on
stderr and exit code 2; Ctrl-C with a checkpoint and one line saying how to ``--resume``
(exit code 130).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time

from kdops.train.model_files import UsageError, build_checked
from kdops.train.names import (
    BACKBONE_NAMES,
    BACKENDS,
    DATASET_NAMES,
    LANE_DATASETS,
    LANE_RECIPES,
    MODEL_NAMES,
    MODELS_WITHOUT_BACKBONE,
    RECIPE_NAMES,
    SYNTHETIC_DATASETS,
)

# The built-in main job, ``kdops-distill --recipe cwd``: teacher, plain student and distilled
# student in about 2.5 minutes on two idle CPU cores, with a gain of +3.3 mIoU. Chosen by
# measurement (README, "The main job on its default"): at 48x48, batch 8, one thread, a step
# costs 0.34 s (teacher), 0.35 s (student), 0.43 s (distillation) of CPU time; the student at
# 60 steps gained +2.9, at 80 +3.4 (+3.3 with the shift-safe CWD kernel) from a 150-step
# teacher (30.8 mIoU). Smaller students (DeepLabV3-MobileNetV2: -1.1; ERFNet at its own
# learning rate: +0.4) learn as much alone.
DEFAULT_TEACHER = ("pspnet", "resnet18")
DEFAULT_STUDENT = ("deeplabv3", "resnet18")
DEFAULT_LANE_STUDENT = ("erfnet", None)
DEFAULT_TRAIN_STEPS = 100  # kdops-train
DEFAULT_STEPS = 80  # kdops-distill's students (plain and distilled)
# ERFNet students on lane data (cheap steps: ~0.12 s at 48x48, batch 8, one thread). ERFNet
# sits at background-only for its first ~250 steps on synthetic_lanes: after 100 steps at lr
# 0.05 (the earlier default) it still predicts no lane pixel (mIoU 17.0, lane F1 0), after 600
# at lr 0.1 it has learnt them (mIoU 55.9, lane F1 89.8; seed 0, benchmarks.gains).
DEFAULT_LANE_STEPS = 600
DEFAULT_TEACHER_STEPS = 150
# LGAD's label teacher must reproduce the labels it reads: on synthetic_lanes at lr 0.1 it
# reaches mIoU 69.0 after 100 steps, 84.7 after 300, 90.0 after 600 (66 s on one core).
DEFAULT_LABEL_TEACHER_STEPS = 600
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 0.01
DEFAULT_LANE_LR = 0.1  # the lane recipes' usual learning rate (kdops.train.recipes.methods)
# Each model trains at its own usual learning rate: ERFNet from scratch with SGD needs a larger
# step than PSPNet/DeepLabV3 (at 0.01 it stays near background only, measured on synthetic).
MODEL_LR = {"erfnet": 0.1}
DEFAULT_SYNTHETIC_SAMPLES = (1200, 200)
DEFAULT_SYNTHETIC_SIZE = 48
DEFAULT_LOG_EVERY = 10
DEFAULT_CHECKPOINT_EVERY = 100
DEFAULT_WORK_DIR = "runs"

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        # allow_abbrev=False: "--step 10" must not silently mean "--steps 10".
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse prints a usage block; one line is clearer
        raise UsageError(f"{message} (see {self.prog} --help)")


# -- arguments ---------------------------------------------------------------------------------
def _add_data_args(parser: argparse.ArgumentParser, default_dataset: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASET_NAMES, default=None, help=f"data set (default: {default_dataset})")
    group.add_argument("--data-root", default=None,
                       help="folder of a real data set: voc, cityscapes, culane (default: none; the synthetic "
                            "sets are generated)")
    group.add_argument("--crop-size", type=int, nargs="+", default=None, metavar="SIZE",
                       help=f"H [W]: training crop, or the synthetic image size (default: {DEFAULT_SYNTHETIC_SIZE} "
                            "on the synthetic sets; voc 512, cityscapes 512 1024, culane 288 800)")
    group.add_argument("--train-samples", type=int, default=None,
                       help=f"synthetic: number of training samples (default: {DEFAULT_SYNTHETIC_SAMPLES[0]})")
    group.add_argument("--val-samples", type=int, default=None,
                       help=f"synthetic: number of validation samples (default: {DEFAULT_SYNTHETIC_SAMPLES[1]})")
    group.add_argument("--data-seed", type=int, default=0, help="synthetic: generator seed (default: 0)")
    group.add_argument("--background-weight", type=float, default=None,
                       help="cross-entropy weight of class 0 (default: 0.4 on lane data, as SCNN / ENet-SAD; "
                            "else 1)")


def _add_train_args(parser: argparse.ArgumentParser, lr_help: str, steps_help: str, name_help: str) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {steps_help})")
    group.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"batch size per process (default: {DEFAULT_BATCH_SIZE})")
    group.add_argument("--lr", type=float, default=None,
                       help=f"initial learning rate, poly schedule with power 0.9 (default: {lr_help})")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay (default: 1e-4)")
    group.add_argument("--clip-grad", type=float, default=10.0, help="gradient-norm clip, 0: off (default: 10)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of initialisation, data order and dropout (default: 0)")
    group.add_argument("--eval-every", type=int, default=0,
                       help="evaluate every N steps, 0: at the end only (default: 0)")
    group.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                       help=f"checkpoint every N steps, 0: at the end only; Ctrl-C always writes one "
                            f"(default: {DEFAULT_CHECKPOINT_EVERY})")
    group.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes (default: 0)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    group.add_argument("--threads", type=int, default=None,
                       help="intra-op CPU threads per process (default on CPU: 1, which is fastest for these small "
                            "models on shared cores and what torchrun uses; raise it on an idle many-core machine)")
    group.add_argument("--no-amp", action="store_true", help="no autocast on CUDA (default: bfloat16/float16 autocast)")
    group.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA (default: channels_last)")
    group.add_argument("--backend", choices=("auto",) + BACKENDS, default=None,
                       help="kdops backend of the loss ops (default: $KDOPS_BACKEND, else auto)")
    group.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                       help=f"where runs and cached models go (default: {DEFAULT_WORK_DIR})")
    group.add_argument("--name", default=None, help=f"run folder name under --work-dir (default: {name_help})")
    again = group.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run of these settings from its checkpoint (default: off)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace what the run folder holds (default: off; a finished run of the same settings "
                            "is reused, any other is never overwritten silently)")
    group.add_argument("--log-every", type=int, default=DEFAULT_LOG_EVERY,
                       help=f"when stderr is not a terminal, one progress line every N steps (default: "
                            f"{DEFAULT_LOG_EVERY}; on a terminal: a progress bar)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar or lines (default: off)")


def _train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdops-train", description="Train a segmentation model (a teacher or a plain "
                     "student) with cross-entropy.")
    parser.add_argument("--model", default="pspnet", help=f"one of {', '.join(MODEL_NAMES)} (default: pspnet)")
    parser.add_argument("--backbone", default=None,
                        help=f"one of {', '.join(BACKBONE_NAMES)}, for pspnet/deeplabv3 (default: resnet18)")
    parser.add_argument("--weights", default=None, help="full-model weights file to start from (default: none)")
    parser.add_argument("--backbone-weights", default=None,
                        help="torchvision-format backbone weights file (default: none)")
    _add_data_args(parser, "synthetic; synthetic_lanes for erfnet")
    _add_train_args(parser, f"{DEFAULT_LR}; {MODEL_LR['erfnet']} for erfnet", f"{DEFAULT_TRAIN_STEPS}",
                    "MODEL-BACKBONE-DATASET-sSEED")
    return parser


def _distill_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdops-distill", description="Distill a segmentation student with a recipe "
                     f"({', '.join(RECIPE_NAMES)}; combine with '+', e.g. cwd+kd).")
    parser.add_argument("--recipe", required=True, help="recipe name(s) joined by '+' (required)")
    parser.add_argument("--weight", action="append", default=[], metavar="TERM=VALUE",
                        help="override a term's weight, e.g. cwd/logits=1; repeatable (default: the recipe's)")
    teacher = parser.add_argument_group("teacher")
    teacher.add_argument("--teacher", default=None,
                         help=f"teacher model, one of {', '.join(MODEL_NAMES)} (default: {DEFAULT_TEACHER[0]}; "
                              "label_teacher for lgad)")
    teacher.add_argument("--teacher-backbone", default=None,
                         help=f"teacher backbone, one of {', '.join(BACKBONE_NAMES)} (default: {DEFAULT_TEACHER[1]})")
    teacher.add_argument("--teacher-weights", default=None,
                         help="trained teacher weights, e.g. a kdops-train checkpoint.pt (default: none: train "
                              "the teacher, cached under --work-dir)")
    teacher.add_argument("--teacher-steps", type=int, default=None,
                         help=f"steps to train the teacher when no weights are given (default: "
                              f"{DEFAULT_TEACHER_STEPS}; label teacher {DEFAULT_LABEL_TEACHER_STEPS})")
    student = parser.add_argument_group("student")
    student.add_argument("--student", default=None,
                         help=f"student model, one of {', '.join(MODEL_NAMES)} (default: {DEFAULT_STUDENT[0]}; "
                              f"{DEFAULT_LANE_STUDENT[0]} on lane data)")
    student.add_argument("--student-backbone", default=None,
                         help=f"student backbone, one of {', '.join(BACKBONE_NAMES)} (default: {DEFAULT_STUDENT[1]})")
    student.add_argument("--student-backbone-weights", default=None,
                         help="torchvision-format backbone weights for the student (default: none)")
    student.add_argument("--no-baseline", action="store_true",
                         help="skip the student trained without distillation (default: train it, cached)")
    _add_data_args(parser, f"synthetic; synthetic_lanes for {', '.join(LANE_RECIPES)}")
    _add_train_args(parser, f"{DEFAULT_LR} for pspnet/deeplabv3 and {MODEL_LR['erfnet']} for erfnet, each model at "
                            f"its own; {DEFAULT_LANE_LR} for all of {', '.join(LANE_RECIPES)} on lane data",
                    f"{DEFAULT_STEPS} for the students; {DEFAULT_LANE_STEPS} on lane data",
                    "RECIPE-STUDENT-DATASET- and a hash of the settings")
    return parser


# -- stage 1: checks without torch -------------------------------------------------------------
def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{name} must be >= {low}, got {value}")


def _finite(name: str, value: float | None, low: float, *, strict: bool = False, high: float = math.inf) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value > low if strict else value >= low) and value < high
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        upper = f" and < {high}" if high != math.inf else ""
        raise UsageError(f"{name} must be a finite number {bound}{upper}, got {value}")


def _check_model_name(name: str | None, option: str) -> None:
    if name is not None and name not in MODEL_NAMES:
        raise UsageError(f"{option}: unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def _check_backbone_name(backbone: str | None, option: str) -> None:
    if backbone is not None and backbone not in BACKBONE_NAMES:
        raise UsageError(f"{option}: unknown backbone {backbone!r}; choose from {', '.join(BACKBONE_NAMES)}")


def _check_file(path: str | None, option: str) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise UsageError(f"{option}: file not found: {path}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option}: file not readable: {path}")


def _check_work_dir(path: str) -> None:
    """The work dir, or its nearest existing ancestor, must be a writable folder. Nothing is
    created here: a rejected command leaves no trace."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"--work-dir {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--work-dir {path}: {probe} is not writable")


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def _check_common(args, prog: str) -> None:
    """Everything about the data and training options that needs no torch."""
    for option in ("steps", "batch_size", "train_samples", "val_samples", "threads", "log_every"):
        _at_least("--" + option.replace("_", "-"), getattr(args, option), 1)
    for option in ("num_workers", "eval_every", "checkpoint_every"):
        _at_least("--" + option.replace("_", "-"), getattr(args, option), 0)
    _finite("--lr", args.lr, 0.0, strict=True)
    _finite("--momentum", args.momentum, 0.0, high=1.0)
    _finite("--weight-decay", args.weight_decay, 0.0)
    _finite("--clip-grad", args.clip_grad, 0.0)
    _finite("--background-weight", args.background_weight, 0.0)
    if args.crop_size is not None and (len(args.crop_size) not in (1, 2) or min(args.crop_size) < 1):
        raise UsageError(f"--crop-size takes one or two positive sizes, got {' '.join(map(str, args.crop_size))}")
    if args.device is not None and not _DEVICE.fullmatch(args.device):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.dataset in SYNTHETIC_DATASETS and args.data_root is not None:
        raise UsageError(f"--data-root is for the real data sets; {args.dataset!r} is generated")
    if args.dataset is not None and args.dataset not in SYNTHETIC_DATASETS:
        if args.data_root is None:
            raise UsageError(f"--dataset {args.dataset} needs --data-root (the folder holding the data)")
        if not os.path.isdir(args.data_root):
            raise UsageError(f"--data-root: data folder not found: {args.data_root}")
    elif args.data_root is not None and args.dataset is None:
        raise UsageError("--data-root needs --dataset (voc, cityscapes or culane)")
    if args.name is not None and (args.name in ("", ".", "..") or "/" in args.name or os.sep in args.name):
        raise UsageError(f"--name must be a plain folder name (it goes under --work-dir), got {args.name!r}")
    _check_work_dir(args.work_dir)
    env_backend = os.environ.get("KDOPS_BACKEND")
    if args.backend is None and env_backend not in (None, "auto", *BACKENDS):
        raise UsageError(f"KDOPS_BACKEND={env_backend!r} is not a backend; choose from auto, {', '.join(BACKENDS)}")


def _parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        term, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not term.strip() or not 0.0 <= number < math.inf:
            raise UsageError(f"--weight takes TERM=VALUE with a finite VALUE >= 0, got {item!r}")
        weights[term.strip()] = number
    return weights


def _check_distill_args(args) -> None:
    names = [part.strip().lower() for part in args.recipe.split("+")]
    for name in names:
        if name not in RECIPE_NAMES:
            shown = repr(name) if name else "'' (an empty name)"
            raise UsageError(f"unknown recipe {shown}; choose from {', '.join(RECIPE_NAMES)} "
                             f"(combine with '+', e.g. cwd+kd)")
    _parse_weights(args.weight)
    _at_least("--teacher-steps", args.teacher_steps, 1)
    _check_model_name(args.teacher, "--teacher")
    _check_model_name(args.student, "--student")
    _check_backbone_name(args.teacher_backbone, "--teacher-backbone")
    _check_backbone_name(args.student_backbone, "--student-backbone")
    if args.teacher in MODELS_WITHOUT_BACKBONE and args.teacher_backbone is not None:
        raise UsageError(f"--teacher-backbone: {args.teacher} has a fixed encoder and takes no backbone")
    if args.student in MODELS_WITHOUT_BACKBONE and (args.student_backbone or args.student_backbone_weights):
        raise UsageError(f"--student-backbone: {args.student} has a fixed encoder and takes no backbone")
    _check_file(args.teacher_weights, "--teacher-weights")
    _check_file(args.student_backbone_weights, "--student-backbone-weights")
    _check_common(args, "kdops-distill")


def _check_train_args(args) -> None:
    _check_model_name(args.model, "--model")
    _check_backbone_name(args.backbone, "--backbone")
    if args.model in MODELS_WITHOUT_BACKBONE and (args.backbone or args.backbone_weights):
        raise UsageError(f"--backbone: {args.model} has a fixed encoder and takes no backbone")
    _check_file(args.weights, "--weights")
    _check_file(args.backbone_weights, "--backbone-weights")
    _check_common(args, "kdops-train")


# -- stage 2: checks with torch (still before any training) ------------------------------------
def _model_spec(name, backbone, weights=None, backbone_weights=None):
    from kdops.train.pipeline import ModelSpec

    if name in MODELS_WITHOUT_BACKBONE:
        return ModelSpec(name, None, weights, backbone_weights)
    return ModelSpec(name, backbone or "resnet18", weights, backbone_weights)


def _data_spec(args, name: str):
    from kdops.train.pipeline import DataSpec

    crop = None if args.crop_size is None else (args.crop_size[0], args.crop_size[-1])
    if name in SYNTHETIC_DATASETS:
        train_samples, val_samples = DEFAULT_SYNTHETIC_SAMPLES
        return DataSpec(name, None, crop or (DEFAULT_SYNTHETIC_SIZE, DEFAULT_SYNTHETIC_SIZE),
                        args.train_samples or train_samples, args.val_samples or val_samples, args.data_seed)
    return DataSpec(name, args.data_root, crop)


def _build_data(spec):
    try:
        return spec.build()
    except FileNotFoundError as e:
        raise UsageError(f"--data-root: {e}") from None
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _class_weights(args, data_spec, num_classes: int) -> list[float] | None:
    """Cross-entropy class weights: the background's from --background-weight."""
    weight = args.background_weight
    if weight is None:
        weight = 0.4 if data_spec.name in LANE_DATASETS else 1.0
    return None if weight == 1.0 else [weight] + [1.0] * (num_classes - 1)


def _context(args):
    import torch

    from kdops.train.distributed import init_from_env

    if args.device and args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
        index = int(args.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        ctx = init_from_env(args.device)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None
    if args.threads is not None or ctx.device.type == "cpu":
        # Two OpenMP threads on two cores that another process also uses run many times
        # slower than one (they spin-wait for each other); one thread per process is robust.
        torch.set_num_threads(args.threads or 1)
    return ctx


def _model_lr(args, model: str) -> float:
    return args.lr if args.lr is not None else MODEL_LR.get(model, DEFAULT_LR)


def _train_config(args, steps: int, desc: str, lr: float):
    from kdops.train.trainer import TrainConfig

    try:
        return TrainConfig(
            steps=steps, batch_size=args.batch_size, lr=lr, momentum=args.momentum,
            weight_decay=args.weight_decay, clip_grad=args.clip_grad or None, amp=not args.no_amp,
            channels_last=not args.no_channels_last, eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed,
            num_workers=args.num_workers, progress=not args.no_progress, desc=desc,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_backend(recipe, student, teacher, data, ctx, backend: str | None) -> None:
    """Run the recipe's losses once, on a two-image batch and throwaway models, with the
    chosen backend on the training device: a backend that cannot run one of the recipe's ops
    there is an argument error now, not a traceback at the first distillation step."""
    import torch

    from kdops.backend import BackendUnavailableError
    from kdops.train.distiller import Distiller

    train_set = data[0]
    if len(train_set) < 2:
        return  # the trainer refuses such a set with its own message
    samples = [train_set[i] for i in range(2)]
    images = torch.stack([s[0] for s in samples]).to(ctx.device)
    labels = torch.stack([torch.as_tensor(s[1]) for s in samples]).long().to(ctx.device)
    distiller = Distiller(student, num_classes=train_set.num_classes, ignore_index=train_set.ignore_index,
                          recipe=recipe, teacher=teacher, backend=backend).to(ctx.device)
    chosen = backend or os.environ.get("KDOPS_BACKEND", "auto")
    option = "--backend" if backend else "KDOPS_BACKEND"
    try:
        with torch.no_grad():
            distiller(images, labels, step=distiller.total_steps)  # every term active
    except BackendUnavailableError as e:
        raise UsageError(f"{option} {chosen}: {e}") from None
    except ValueError as e:
        raise UsageError(f"recipe {recipe.name}: {e}") from None


def _run_action(run_dir: str, key: str, args):
    from kdops.train.pipeline import RunFolderError, plan_run

    try:
        return plan_run(run_dir, key, resume=args.resume, overwrite=args.overwrite)
    except RunFolderError as e:
        raise UsageError(str(e)) from None


# -- output ------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def gain_line(miou: float, baseline_miou: float) -> str:
    """The distillation gain, as the difference of the two numbers the table shows (rounded
    to 0.1 first), so that the line and the rows always agree."""
    if miou != miou or baseline_miou != baseline_miou:
        return "distillation: no mIoU to compare"
    gain = float(_pct(miou)) - float(_pct(baseline_miou))
    return f"distillation: {gain:+.1f} mIoU over the student trained alone"


def _seconds(result) -> str:
    return f"{result.train_seconds:.0f} s" + (" (cached)" if result.cached else "")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _describe_data(spec, data) -> str:
    train, val = data
    size = f", {spec.crop_size[0]}x{spec.crop_size[1]}" if spec.crop_size else ""
    return f"{spec.name} ({len(train)} train / {len(val)} val{size}, {train.num_classes} classes)"


def _status(prog: str, message: str, ctx=None) -> None:
    """A phase line on stderr (stdout holds the results)."""
    if ctx is None or ctx.is_main:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


def _phase(prog: str, what: str, run_dir: str, action: str, steps: int, ctx, note: str = "") -> None:
    verb = {"new": f"training {steps} steps", "restart": f"training {steps} steps (--overwrite)",
            "resume": "resuming the unfinished run", "reuse": "reusing the finished run"}[action]
    _status(prog, f"{what}: {verb} in {run_dir}{note}", ctx)


def _other_settings(run_dir: str) -> str:
    """Why a distilled run is not reused: runs of the same recipe, student and data set with
    other settings (their folder names differ only in the settings' hash)."""
    folder, name = os.path.split(run_dir)
    prefix = name.rsplit("-", 1)[0] + "-"
    try:
        others = sorted(f for f in os.listdir(folder or ".") if f.startswith(prefix) and f != name
                        and os.path.isfile(os.path.join(folder, f, "checkpoint.pt")))
    except FileNotFoundError:
        return ""
    if not others:
        return ""
    return f" (not reusing {os.path.join(folder, others[-1])}" + (f" and {len(others) - 1} more" if len(others) > 1
                                                                    else "") + ": other settings)"


def _resume_command(invocation: str, argv: list[str]) -> str:
    words = [a for a in argv if a != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return " ".join([invocation, *map(shlex.quote, words)])


def _interrupted(prog: str, invocation: str, argv: list[str], error) -> int:
    where = f" after step {error.step}/{error.steps}" if error is not None else ""
    saved = f"; checkpoint {error.checkpoint}" if error is not None and error.checkpoint else ""
    print(f"{prog}: interrupted{where}{saved}; continue with: {_resume_command(invocation, argv)}",
          file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _main(prog: str, argv: list[str] | None, parse, prepare, run, invocation: str | None = None) -> int:
    """Parse and check (exit 2 on a bad argument), then run; Ctrl-C exits 130 with one line
    giving the command that continues (``invocation``: how the user started it, default
    ``prog``)."""
    wall_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        plan = prepare(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before training started", file=sys.stderr)
        return EXIT_INTERRUPTED
    from kdops.train.trainer import TrainingInterrupted

    try:
        return run(plan, wall_start)
    except TrainingInterrupted as e:
        return _interrupted(prog, invocation or prog, argv, e)
    except KeyboardInterrupt:  # outside a training loop (data, evaluation), or a second Ctrl-C
        return _interrupted(prog, invocation or prog, argv, None)


# -- kdops-train -------------------------------------------------------------------------------
def _parse_train(argv):
    args = _train_parser().parse_args(argv)
    _check_train_args(args)
    return args


def _prepare_train(args) -> dict:
    from dataclasses import asdict

    from kdops.train.pipeline import config_hash

    spec = _model_spec(args.model, args.backbone, args.weights, args.backbone_weights)
    data_spec = _data_spec(args, args.dataset or ("synthetic_lanes" if spec.name == "erfnet" else "synthetic"))
    data = _build_data(data_spec)
    num_classes, ignore_index = data[0].num_classes, data[0].ignore_index
    build_checked(spec, ("--model", "--backbone", "--weights"), num_classes, ignore_index)
    class_weights = _class_weights(args, data_spec, num_classes)
    steps = DEFAULT_TRAIN_STEPS if args.steps is None else args.steps
    config = _train_config(args, steps, spec.label, _model_lr(args, spec.name))
    ctx = _context(args)
    name = args.name or f"{spec.label.replace('/', '-')}-{data_spec.name}-s{args.seed}"
    run_dir = os.path.join(args.work_dir, name)
    key = config_hash("model", asdict(spec), asdict(data_spec), config.identity(), ctx.world_size, class_weights)
    action = _run_action(run_dir, key, args)
    if args.resume and action == "new":
        raise UsageError(f"--resume: nothing to continue: no checkpoint in {run_dir}; run without --resume to start")
    return {"args": args, "spec": spec, "data_spec": data_spec, "data": data, "class_weights": class_weights,
            "config": config, "ctx": ctx, "run_dir": run_dir, "key": key, "action": action}


def _run_train(plan: dict, wall_start: float) -> int:
    from dataclasses import asdict

    from kdops.train.pipeline import seed_everything, train_run, write_json

    spec, data_spec, data, config, ctx = plan["spec"], plan["data_spec"], plan["data"], plan["config"], plan["ctx"]
    run_dir = plan["run_dir"]
    seed_everything(config.seed)
    model = spec.build(data[0].num_classes, data[0].ignore_index)
    student_input = "labels" if spec.name == "label_teacher" else "image"
    meta = {"role": "model", "model": asdict(spec), "data": asdict(data_spec), "run_key": plan["key"]}
    _phase("kdops-train", spec.label, run_dir, plan["action"], config.steps, ctx)
    result, trainer = train_run(model, {"student_input": student_input, "class_weights": plan["class_weights"]},
                                data, config, run_dir, ctx=ctx, meta=meta, action=plan["action"])
    if not ctx.is_main:
        return 0
    wall = time.perf_counter() - wall_start
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not (result.cached and os.path.isfile(metrics_path)):  # a reused run keeps its record (and wall time)
        write_json(metrics_path, {"model": spec.label, "data": asdict(data_spec), "config": asdict(config),
                                  "metrics": result.metrics, "train_seconds": result.train_seconds,
                                  "wall_seconds": wall, "history": trainer.history})
    print(f"{spec.label} on {_describe_data(data_spec, data)}")
    print(_table([("model", "mIoU", "pixel acc", "train time"),
                  (spec.label, _pct(result.metrics.get("miou")), _pct(result.metrics.get("pixel_acc")),
                   _seconds(result))]))
    print(f"wall time: {wall:.0f} s\ncheckpoint: {os.path.join(run_dir, 'checkpoint.pt')}\nmetrics:    {metrics_path}")
    return 0


def train_main(argv: list[str] | None = None, *, invocation: str | None = None) -> int:
    """``kdops-train``: returns the exit code (2 for bad arguments, 130 after Ctrl-C)."""
    return _main("kdops-train", argv, _parse_train, _prepare_train, _run_train, invocation)


# -- kdops-distill -----------------------------------------------------------------------------
def _parse_distill(argv):
    args = _distill_parser().parse_args(argv)
    _check_distill_args(args)
    return args


def _prepare_distill(args) -> dict:
    from dataclasses import asdict, replace

    from kdops.train.pipeline import cached_run_dir, config_hash, run_state
    from kdops.train.recipes import get_recipe

    try:
        recipe = get_recipe(args.recipe).with_weights(_parse_weights(args.weight))
    except ValueError as e:
        raise UsageError(str(e)) from None
    data_spec = _data_spec(args, args.dataset or recipe.defaults.get("dataset", "synthetic"))
    data = _build_data(data_spec)
    num_classes, ignore_index = data[0].num_classes, data[0].ignore_index
    lanes = data_spec.name in LANE_DATASETS
    class_weights = _class_weights(args, data_spec, num_classes)

    default_student = DEFAULT_LANE_STUDENT if lanes else DEFAULT_STUDENT
    student = _model_spec(args.student or default_student[0],
                          args.student_backbone or (default_student[1] if not args.student else None),
                          None, args.student_backbone_weights)
    student_model = build_checked(student, ("--student", "--student-backbone", "--student-backbone-weights"),
                                   num_classes, ignore_index)
    teacher_spec = teacher_model = None
    if recipe.teacher == "labels":
        if args.teacher not in (None, "label_teacher"):
            raise UsageError(f"recipe {recipe.name!r} distills from LGAD's label teacher; --teacher must be "
                             f"label_teacher, got {args.teacher!r}")
        teacher_spec = _model_spec("label_teacher", None, args.teacher_weights)
    elif recipe.teacher == "model":
        backbone = args.teacher_backbone or (DEFAULT_TEACHER[1] if not args.teacher else None)
        teacher_spec = _model_spec(args.teacher or DEFAULT_TEACHER[0], backbone, args.teacher_weights)
    elif args.teacher or args.teacher_weights or args.teacher_backbone or args.teacher_steps:
        raise UsageError(f"recipe {recipe.name!r} is self-distillation and takes no teacher")
    if teacher_spec is not None:
        teacher_model = build_checked(teacher_spec, ("--teacher", "--teacher-backbone", "--teacher-weights"),
                                       num_classes, ignore_index)
        if teacher_spec.weights is not None and args.teacher_steps is not None:
            raise UsageError("--teacher-steps trains a teacher; --teacher-weights gives a trained one: pass one")

    # A recipe's usual learning rate belongs to its usual data set and student.
    usual = recipe.defaults
    usual_setting = data_spec.name == usual.get("dataset") and student.name == usual.get("student")
    def lr(model: str) -> float:
        return usual["lr"] if args.lr is None and usual_setting and "lr" in usual else _model_lr(args, model)

    teacher_steps = args.teacher_steps
    if teacher_steps is None:
        teacher_steps = DEFAULT_LABEL_TEACHER_STEPS if recipe.teacher == "labels" else DEFAULT_TEACHER_STEPS
    teacher_config = _train_config(args, teacher_steps, f"teacher {teacher_spec.label}" if teacher_spec else "teacher",
                                   lr(teacher_spec.name if teacher_spec else student.name))
    steps = args.steps if args.steps is not None else DEFAULT_LANE_STEPS if lanes else DEFAULT_STEPS
    student_config = _train_config(args, steps, f"student {student.label}", lr(student.name))
    distill_config = replace(student_config, desc=f"student {student.label} + {recipe.name}")
    ctx = _context(args)
    _check_backend(recipe, student_model, teacher_model, data, ctx, args.backend)

    teacher_dir = student_dir = None
    train_teacher = teacher_spec is not None and teacher_spec.weights is None
    if train_teacher:
        role = "label_teacher" if recipe.teacher == "labels" else "teacher"
        teacher_dir, _ = cached_run_dir(args.work_dir, role, teacher_spec, data_spec, teacher_config, ctx.world_size,
                                        class_weights)
    if not args.no_baseline:
        student_dir, _ = cached_run_dir(args.work_dir, "student", student, data_spec, student_config,
                                        ctx.world_size, class_weights)
    weights = {t.name: t.weight for t in recipe.terms}
    key = config_hash(recipe.name, weights, asdict(student), asdict(teacher_spec) if teacher_spec else None,
                      teacher_dir, asdict(data_spec), distill_config.identity(), ctx.world_size, class_weights)
    name = args.name or f"{recipe.name}-{student.label.replace('/', '-')}-{data_spec.name}-{key}"
    run_dir = os.path.join(args.work_dir, name)
    action = _run_action(run_dir, key, args)
    if args.resume and action == "new":
        cached = [d for d in (teacher_dir, student_dir) if d and run_state(d) and not run_state(d).finished]
        if not cached:
            raise UsageError(f"--resume: nothing to continue: no checkpoint in {run_dir} (nor an unfinished "
                             f"teacher or student); run without --resume to start")
    return {"args": args, "recipe": recipe, "weights": weights, "data_spec": data_spec, "data": data,
            "class_weights": class_weights, "student": student, "teacher_spec": teacher_spec,
            "train_teacher": train_teacher, "teacher_config": teacher_config, "student_config": student_config,
            "distill_config": distill_config, "ctx": ctx, "run_dir": run_dir, "key": key, "action": action,
            "teacher_dir": teacher_dir, "student_dir": student_dir}


def _run_distill(plan: dict, wall_start: float) -> int:
    from dataclasses import asdict

    from kdops.train.pipeline import cached_model_run, distill_run, plan_cached, write_json

    prog = "kdops-distill"
    args, recipe, data_spec, data, ctx = plan["args"], plan["recipe"], plan["data_spec"], plan["data"], plan["ctx"]
    student, teacher_spec, class_weights = plan["student"], plan["teacher_spec"], plan["class_weights"]
    num_classes, ignore_index = data[0].num_classes, data[0].ignore_index

    teacher_result = teacher = None
    if teacher_spec is not None and not plan["train_teacher"]:
        teacher = teacher_spec.build(num_classes, ignore_index)
    elif teacher_spec is not None:
        labels_teacher = recipe.teacher == "labels"
        _phase(prog, f"teacher {teacher_spec.label}", plan["teacher_dir"], plan_cached(plan["teacher_dir"]),
               plan["teacher_config"].steps, ctx)
        teacher_result, teacher = cached_model_run(
            teacher_spec, data_spec, data, plan["teacher_config"], args.work_dir,
            "label_teacher" if labels_teacher else "teacher", ctx=ctx,
            student_input="labels" if labels_teacher else "image", class_weights=class_weights)
    baseline = None
    if not args.no_baseline:
        _phase(prog, f"student {student.label}", plan["student_dir"], plan_cached(plan["student_dir"]),
               plan["student_config"].steps, ctx)
        baseline, _ = cached_model_run(student, data_spec, data, plan["student_config"], args.work_dir, "student",
                                       ctx=ctx, class_weights=class_weights)

    run_dir, config = plan["run_dir"], plan["distill_config"]
    meta = {"role": "distilled", "recipe": recipe.name, "weights": plan["weights"], "student": asdict(student),
            "teacher": asdict(teacher_spec) if teacher_spec else None, "data": asdict(data_spec),
            "run_key": plan["key"]}
    _phase(prog, f"student {student.label} + {recipe.name}", run_dir, plan["action"], config.steps, ctx,
           _other_settings(run_dir) if plan["action"] == "new" and not args.name else "")
    result, trainer = distill_run(recipe, student, teacher, data_spec, data, config, run_dir, ctx=ctx,
                                  action=plan["action"], backend=args.backend, class_weights=class_weights, meta=meta)
    if not ctx.is_main:
        return 0

    profile = result.extra["kd_profile"]
    wall = time.perf_counter() - wall_start
    summary = {
        "recipe": recipe.name, "terms": plan["weights"], "student": student.label,
        "teacher": teacher_spec.label if teacher_spec else None, "data": asdict(data_spec),
        "config": asdict(config), "processes": ctx.world_size, "class_weights": class_weights,
        "metrics": result.metrics,
        "baseline_metrics": baseline.metrics if baseline else None,
        "teacher_metrics": teacher_result.metrics if teacher_result else None,
        "miou": result.miou, "baseline_miou": baseline.miou if baseline else None,
        "teacher_miou": teacher_result.miou if teacher_result else None,
        "train_seconds": result.train_seconds, "mean_step_ms": result.extra["mean_step_ms"],
        "kd_loss_ms_per_step": profile.get("ms"), "kd_loss_saved_bytes": profile.get("saved_bytes"),
        "kd_loss_peak_cuda_bytes": profile.get("peak_bytes"),
        "wall_seconds": wall, "threads": _threads(),
        "history": trainer.history, "evaluations": trainer.evaluations,
    }
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not (result.cached and os.path.isfile(metrics_path)):  # a reused run keeps its record (and wall time)
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
    print(f"kdops-distill --recipe {recipe.name} on {_describe_data(data_spec, data)}")
    print(_table(rows))
    if baseline is not None:
        print(gain_line(result.miou, baseline.miou))
    if profile:
        memory = f"{profile['saved_bytes'] / 2**20:.2f} MiB saved for backward"
        if profile.get("peak_bytes") is not None:
            memory += f", {profile['peak_bytes'] / 2**20:.1f} MiB peak CUDA"
        share = 100 * profile["ms"] / result.extra["mean_step_ms"] if result.extra["mean_step_ms"] else float("nan")
        print(f"KD losses: {profile['ms']:.2f} ms per step forward+backward ({share:.2g}% of a training step), "
              f"{memory}")
    print(f"wall time: {wall:.0f} s ({ctx.device.type}, {_threads()} thread{'s' if _threads() > 1 else ''})\n"
          f"checkpoint: {os.path.join(run_dir, 'checkpoint.pt')}\nmetrics:    {metrics_path}")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def distill_main(argv: list[str] | None = None, *, invocation: str | None = None) -> int:
    """``kdops-distill``: returns the exit code (2 for bad arguments, 130 after Ctrl-C)."""
    return _main("kdops-distill", argv, _parse_distill, _prepare_distill, _run_distill, invocation)
