"""Does each recipe help, beyond seed noise? The multi-seed gains benchmark.

    python -m benchmarks.gains                                  # every recipe, 3 seeds, scenes + lanes
    python -m benchmarks.gains --seeds 5 --recipes cwd sad      # some recipes, more seeds
    python -m benchmarks.gains --datasets lanes --steps 100     # the lane set only, another schedule
    python -m benchmarks.report                                 # README table + chart from the results

For each data set (the built-in synthetic ``scenes`` and ``lanes``) it trains, through the
command-line tools and their caching:

* the teacher once (seed 0): ``kdops-train`` of PSPNet-ResNet-18 for the recipes with a model
  teacher, of LGAD's label teacher for ``lgad``; every seed's students read the same teacher
  (``kdops-distill --teacher-weights``), so the seeds measure the students' noise only;
* per seed ``s``: the plain student (``kdops-train --seed s``) and each recipe's student
  (``kdops-distill --recipe R --seed s --no-baseline``), which starts from the plain
  student's initialisation and sees the same batches (both are functions of the seed).

A finished run is reused when the benchmark is run again (the run folders are named and keyed
by their settings, as the CLI does), and keeps the wall time it took the first time.

The result per recipe: the mean ± sample standard deviation over seeds of the metric (mIoU on
scenes, lane F1 on lanes) and of the seed-paired gain ``metric(R, s) - metric(plain, s)``,
and a verdict: "gain > 1 sd" when the mean paired gain exceeds the standard deviation of the
paired gains, "loss > 1 sd" when it is below minus that, else "within noise". Pairing by
seed removes the part of the noise that the recipe and the plain student share (the same
initialisation and data order).

Students: DeepLabV3-ResNet-18 on scenes, ERFNet on lanes (the CLI's defaults). Lanes run
``plain`` + sad, mad, lgad and sad-upstream (the published SAD form) by default; scenes
every method's recipe. The schedule is the CLI's on scenes; on lanes it is longer (600 steps
at lr 0.1, see :data:`DEFAULT_LR`): at kdops-distill's lane default ERFNet has not yet left
the background-only plateau. About an hour on one CPU core (2-core machine, others busy). Writes ``benchmarks/results/<device>-gains.json``: the machine,
threads, load average, versions, the settings, every command with its wall time, and the
summary rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATASETS = {"scenes": "synthetic", "lanes": "synthetic_lanes"}
STUDENTS = {"scenes": ("deeplabv3", "resnet18"), "lanes": ("erfnet", None)}
TEACHER = ("pspnet", "resnet18")
PLAIN = "plain"
SCENE_RECIPES = ("kd", "cwd", "skd", "ifvd", "at", "ickd", "camd", "apd", "acfd", "sad", "mad", "lgad")
# On the lanes: the lane recipes in this library's form, and SAD in its published form for
# comparison (mad-upstream and lgad-upstream on request: --recipes; each lane run costs about
# two minutes on one core, and the whole benchmark is sized for about an hour).
LANE_RECIPES = ("sad", "mad", "lgad", "sad-upstream")
# The schedule of this benchmark (see README "Gains over the plain student"): the CLI's
# defaults (teacher 150 steps, students 80 on scenes and 100 on lanes, 1200 training images
# at 48x48, batch 8), which fit the budget of about an hour on one CPU core.
DEFAULT_STEPS = {"scenes": 80, "lanes": 600}  # kdops-distill's DEFAULT_STEPS, DEFAULT_LANE_STEPS
DEFAULT_TEACHER_STEPS = {"model": 150, "labels": 600}  # DEFAULT_TEACHER_STEPS, DEFAULT_LABEL_TEACHER_STEPS
# Learning rate of every run on the data set (None: the CLI's per model). On the lanes every
# run, the label teacher's included, trains at the lane recipes' lr (kdops-train's own default
# for the label teacher is the PSPNet/DeepLab 0.01).
DEFAULT_LR = {"scenes": None, "lanes": 0.1}
SCHEDULE_NOTES = {
    "scenes": "kdops-distill's default schedule",
    "lanes": "kdops-distill's default lane schedule; its earlier default, 100 steps at lr 0.05, left ERFNet "
             "predicting background only (mIoU 17.0, lane F1 0)",
}
# Lane F1 of kdops.train.metrics.LaneF1 at 48x48: the masks dilated to 3 px before the IoU
# (at this size a one-pixel offset of a 2-px lane halves its IoU; CULane draws both as wide
# lines for the same reason), IoU >= 0.5 for a true positive.
LANE_F1 = {"iou_threshold": 0.5, "line_width": 3}
VERDICT_GAIN, VERDICT_LOSS, VERDICT_NOISE = "gain > 1 sd", "loss > 1 sd", "within noise"


# -- statistics ----------------------------------------------------------------------------------
def paired_differences(values: dict[int, float], baseline: dict[int, float]) -> dict[int, float]:
    """Per seed present in both: ``values[s] - baseline[s]``. Raises ``ValueError`` when no
    seed is shared (nothing to pair)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError(f"no seed in common: values has {sorted(values)}, baseline {sorted(baseline)}")
    return {s: values[s] - baseline[s] for s in seeds}


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator); the std is NaN for one
    value (no spread can be estimated from it)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def verdict(mean_gain: float, std_gain: float) -> str:
    """"gain > 1 sd" when the mean paired gain exceeds one standard deviation of the paired
    gains, "loss > 1 sd" when it is below minus one, else "within noise" (also with one seed,
    whose std is NaN: a single run cannot tell a gain from noise)."""
    if math.isnan(std_gain) or math.isnan(mean_gain):
        return VERDICT_NOISE
    if mean_gain > std_gain:
        return VERDICT_GAIN
    if mean_gain < -std_gain:
        return VERDICT_LOSS
    return VERDICT_NOISE


def summarize(runs: list[dict], metric) -> list[dict]:
    """Rows per (dataset, recipe), in the order first seen, from run records ``{"dataset",
    "recipe", "seed", ...}``; ``metric``: a record's key, or a function of the record. Each
    row: the seeds, the mean/std of the metric and, for a recipe (not ``plain``), the
    seed-paired gains over the ``plain`` runs of the same data set, their mean/std and the
    :func:`verdict`."""
    pick = metric if callable(metric) else (lambda r: r[metric])
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        of = [r for r in runs if r["dataset"] == dataset]
        plain = {r["seed"]: pick(r) for r in of if r["recipe"] == PLAIN}
        for recipe in dict.fromkeys(r["recipe"] for r in of):
            values = {r["seed"]: pick(r) for r in of if r["recipe"] == recipe}
            mean, std = mean_std(values.values())
            row = {"dataset": dataset, "recipe": recipe, "seeds": sorted(values), "values": values,
                   "mean": mean, "std": std}
            if recipe != PLAIN and plain:
                gains = paired_differences(values, plain)
                g_mean, g_std = mean_std(gains.values())
                row.update(gains=gains, gain_mean=g_mean, gain_std=g_std, verdict=verdict(g_mean, g_std))
            rows.append(row)
    return rows


# -- running -------------------------------------------------------------------------------------
def _device_name(device: str) -> str:
    import torch

    return "cpu" if device == "cpu" else torch.cuda.get_device_name()


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def _recipe_teacher(recipe: str) -> str | None:
    from kdops.train.recipes import get_recipe

    return get_recipe(recipe).teacher


class Runner:
    """Runs the CLI in this process (one torch import for the whole benchmark) and records
    each command, its wall time and its result."""

    def __init__(self, work_dir: str, common: list[str], *, quiet: bool = True):
        self.work_dir = work_dir
        self.common = common
        self.quiet = quiet
        self.records: list[dict] = []

    def _call(self, prog: str, argv: list[str]) -> float:
        from kdops.train.cli import distill_main, train_main

        main = train_main if prog == "kdops-train" else distill_main
        out = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(out) if self.quiet else contextlib.nullcontext():
            code = main(argv)
        wall = time.perf_counter() - started
        if code != 0:
            sys.stderr.write(out.getvalue())
            raise RuntimeError(f"{prog} {shlex.join(argv)} exited with {code}")
        return wall

    def run(self, prog: str, argv: list[str], name: str) -> dict:
        """Run ``prog argv --name name`` (plus the common options); returns the run's
        metrics.json with the command and its wall time in this call."""
        from kdops.train.pipeline import run_state

        argv = [*argv, *self.common, "--work-dir", self.work_dir, "--name", name]
        command = f"{prog} {shlex.join(argv)}"
        try:
            state = run_state(os.path.join(self.work_dir, name))
        except ValueError:
            state = None
        finished_before = state is not None and state.finished
        print(f"[gains] {command}", file=sys.stderr, flush=True)
        wall = self._call(prog, argv)
        with open(os.path.join(self.work_dir, name, "metrics.json")) as f:
            metrics = json.load(f)
        print(f"[gains]   {wall:.1f} s this call (first run: {metrics.get('wall_seconds', wall):.1f} s)",
              file=sys.stderr, flush=True)
        return {"command": command, "call_seconds": wall, "metrics": metrics, "reused": finished_before}


def lane_f1(run_dir: str, student: tuple[str, str | None], data_spec) -> float:
    """Lane F1 (:data:`LANE_F1`) of the student saved in ``run_dir`` on the validation set."""
    import torch
    import torch.nn.functional as F

    from kdops.train.metrics import LaneF1
    from kdops.train.pipeline import ModelSpec, load_checkpoint_file

    _, val_set = data_spec.build()
    model = ModelSpec(*student).build(val_set.num_classes, val_set.ignore_index)
    model.load_state_dict(load_checkpoint_file(os.path.join(run_dir, "checkpoint.pt"))["model"])
    model.eval()
    metric = LaneF1(num_lanes=val_set.num_classes - 1, ignore_index=val_set.ignore_index, **LANE_F1)
    loader = torch.utils.data.DataLoader(val_set, batch_size=16)
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)["logits"]
            logits = F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False)
            metric.update(logits, labels)
    return float(metric.compute()["f1"])


def run_dataset(runner: Runner, dataset: str, recipes: list[str], seeds: list[int], *, steps: int,
                teacher_steps: dict[str, int], data_args: list[str], lr: float | None) -> list[dict]:
    """Teacher(s) once, then per seed the plain student and every recipe; one record per run."""
    from kdops.train.pipeline import DataSpec

    data_name = DATASETS[dataset]
    student = STUDENTS[dataset]
    student_args = ["--student", student[0]] + (["--student-backbone", student[1]] if student[1] else [])
    model_args = ["--model", student[0]] + (["--backbone", student[1]] if student[1] else [])
    data = ["--dataset", data_name, *data_args, *(["--lr", str(lr)] if lr else [])]
    lanes = dataset == "lanes"
    records = []

    teachers = {}
    for kind in dict.fromkeys(_recipe_teacher(r) for r in recipes):
        if kind is None:
            continue
        if kind == "labels":
            argv = ["--model", "label_teacher"]
        else:
            argv = ["--model", TEACHER[0], "--backbone", TEACHER[1]]
        name = f"teacher-{kind}-{dataset}"
        rec = runner.run("kdops-train", [*argv, *data, "--steps", str(teacher_steps[kind]), "--seed", "0"], name)
        teachers[kind] = os.path.join(runner.work_dir, name, "checkpoint.pt")
        records.append(_record(dataset, f"teacher:{kind}", 0, rec, runner.work_dir, name, None))

    def finish(record, name):
        if lanes:
            spec = DataSpec(data_name, None, (record["size"], record["size"]), record["train_samples"],
                            record["val_samples"], 0)
            record["lane_f1"] = lane_f1(os.path.join(runner.work_dir, name), student, spec)
        records.append(record)
        value = record["lane_f1"] if lanes else record["miou"]
        print(f"[gains]   {dataset} {record['recipe']} seed {record['seed']}: "
              f"{'lane F1' if lanes else 'mIoU'} {100 * value:.1f}", file=sys.stderr, flush=True)

    for seed in seeds:
        name = f"plain-{dataset}-s{seed}"
        rec = runner.run("kdops-train", [*model_args, *data, "--steps", str(steps), "--seed", str(seed)], name)
        finish(_record(dataset, PLAIN, seed, rec, runner.work_dir, name, student), name)
        for recipe in recipes:
            kind = _recipe_teacher(recipe)
            argv = ["--recipe", recipe, *student_args, *data, "--steps", str(steps), "--seed", str(seed),
                    "--no-baseline"]
            if kind is not None:
                argv += ["--teacher-weights", teachers[kind]]
            name = f"{recipe}-{dataset}-s{seed}"
            rec = runner.run("kdops-distill", argv, name)
            finish(_record(dataset, recipe, seed, rec, runner.work_dir, name, student), name)
    return records


def _record(dataset: str, recipe: str, seed: int, rec: dict, work_dir: str, name: str, student) -> dict:
    m = rec["metrics"]
    data = m["data"]
    metrics = m["metrics"]
    return {
        "dataset": dataset, "recipe": recipe, "seed": seed, "command": rec["command"],
        "miou": metrics.get("miou"), "pixel_acc": metrics.get("pixel_acc"),
        "train_seconds": m.get("train_seconds"), "wall_seconds": m.get("wall_seconds", rec["call_seconds"]),
        "call_seconds": rec["call_seconds"], "reused": rec.get("reused", False),
        "run_dir": os.path.join(work_dir, name),
        "size": data["crop_size"][0], "train_samples": data["train_samples"], "val_samples": data["val_samples"],
    }


def run(args) -> dict:
    import torch

    from kdops.info import package_version

    started = time.perf_counter()
    load_start = _loadavg()
    seeds = list(range(args.seeds))
    common = ["--threads", str(args.threads), "--no-progress", "--device", args.device]
    runner = Runner(args.work_dir, common, quiet=not args.verbose)
    data_args = []
    if args.train_samples is not None:
        data_args += ["--train-samples", str(args.train_samples)]
    if args.val_samples is not None:
        data_args += ["--val-samples", str(args.val_samples)]
    records = []
    settings = {}
    for dataset in args.datasets:
        default = SCENE_RECIPES if dataset == "scenes" else LANE_RECIPES
        recipes = [r for r in (args.recipes or default) if args.recipes or r in default]
        steps = args.steps or DEFAULT_STEPS[dataset]
        teacher_steps = {k: args.teacher_steps or v for k, v in DEFAULT_TEACHER_STEPS.items()}
        lr = args.lr or DEFAULT_LR[dataset]
        records += run_dataset(runner, dataset, recipes, seeds, steps=steps, teacher_steps=teacher_steps,
                               data_args=data_args, lr=lr)
        students = [r for r in records if r["dataset"] == dataset and not r["recipe"].startswith("teacher:")]
        settings[dataset] = {
            "data": DATASETS[dataset], "student": "/".join(x for x in STUDENTS[dataset] if x),
            "teacher": "/".join(TEACHER), "steps": steps, "teacher_steps": teacher_steps,
            "size": students[0]["size"], "train_samples": students[0]["train_samples"],
            "val_samples": students[0]["val_samples"], "batch_size": 8, "recipes": recipes, "lr": lr,
            "metric": "lane_f1" if dataset == "lanes" else "miou",
            "schedule": SCHEDULE_NOTES[dataset] if steps == DEFAULT_STEPS[dataset] and lr == DEFAULT_LR[dataset]
            else "a schedule set on the command line",
        }
    students = [r for r in records if not r["recipe"].startswith("teacher:")]
    rows = summarize(students, lambda r: r["lane_f1"] if r["dataset"] == "lanes" else r["miou"])
    # On the lanes the mIoU is reported beside the lane F1 (F1 saturates near 90 at this size).
    by_key = {(r["dataset"], r["recipe"]): r for r in summarize(students, "miou")}
    for row in rows:
        if row["dataset"] == "lanes":
            other = by_key[(row["dataset"], row["recipe"])]
            row["miou"] = {k: other[k] for k in ("mean", "std", "gain_mean", "gain_std", "verdict") if k in other}
    wall = time.perf_counter() - started
    return {
        "device": _device_name(args.device),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "threads": args.threads,
        "niced": os.nice(0),
        "versions": {"torch": torch.__version__, "kdops": package_version("kdops")},
        "command": args.command,
        "wall_seconds": wall,
        "train_seconds": sum(r["train_seconds"] or 0.0 for r in records),
        "seeds": seeds,
        "settings": settings,
        "lane_f1": LANE_F1,
        "runs": records,
        "rows": rows,
    }


def results_path(device_name: str) -> str:
    return os.path.join(RESULTS_DIR, f"{_slug(device_name)}-gains.json")


def main(argv=None) -> None:
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per recipe (default: 3)")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="RECIPE",
                        help="recipes to run on every data set (default: all on scenes; "
                             f"{' '.join(LANE_RECIPES)} on lanes)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--steps", type=int, default=None,
                        help=f"student steps (default: {DEFAULT_STEPS['scenes']} on scenes, "
                             f"{DEFAULT_STEPS['lanes']} on lanes)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help=f"teacher steps (default: {DEFAULT_TEACHER_STEPS['model']}; label teacher "
                             f"{DEFAULT_TEACHER_STEPS['labels']})")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of every run (default: the CLI's on scenes, "
                             f"{DEFAULT_LR['lanes']} on lanes)")
    parser.add_argument("--train-samples", type=int, default=None, help="synthetic training samples (default: CLI's)")
    parser.add_argument("--val-samples", type=int, default=None, help="synthetic validation samples (default: CLI's)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work-dir", default=os.path.join("runs", "gains"),
                        help="where the runs go; finished runs there are reused (default: runs/gains)")
    parser.add_argument("--output", default=None, help="results file (default: benchmarks/results/<device>-gains.json)")
    parser.add_argument("--no-save", action="store_true", help="print the summary only")
    parser.add_argument("--verbose", action="store_true", help="show each run's own output")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.recipes:
        from kdops.train.recipes import UnknownRecipeError, get_recipe

        for recipe in args.recipes:
            try:
                get_recipe(recipe)
            except UnknownRecipeError as e:
                parser.error(str(e))
    args.command = "python -m benchmarks.gains" + (" " + shlex.join(argv) if argv else "")
    result = run(args)
    from benchmarks.report import gains_table

    print(gains_table(result))
    print(f"wall time: {result['wall_seconds']:.0f} s")
    if args.no_save:
        return
    path = args.output or results_path(result["device"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=lambda x: None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
