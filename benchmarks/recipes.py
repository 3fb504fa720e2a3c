"""The end-to-end number: what each recipe's KD losses cost in a distillation step.

    python -m benchmarks.recipes                      # every recipe, kdops (auto) and reference
    python -m benchmarks.recipes --recipes cwd apd    # some of them
    python -m benchmarks.report                       # README table + chart from the results

For each recipe (DESIGN.md "Benchmarks"): the KD terms' forward+backward time per step
(:meth:`Distiller.profile_losses`: features computed once, the terms alone timed), their
share of a distillation step (plain student step + KD terms), the bytes they save for
backward (their autograd graph beyond the features themselves) and, on GPU, the peak memory
they add — once with ``backend="auto"`` (kdops) and once with ``backend="reference"``.

GPU: PSPNet-ResNet18 student ← PSPNet-ResNet101 teacher, batch 8 at 512×1024, bf16 autocast.
CPU (2 cores): the same networks scaled to batch 2 at 128×256, float32 (the step is ~100×
cheaper than on a GPU, and so is every term). SAD/MAD read the student's stages; LGAD's
teacher is the label teacher. Writes ``benchmarks/results/<device>-recipes.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time

import torch

from kdops.info import package_version
from kdops.models import build_model
from kdops.train.distiller import Distiller
from kdops.train.recipes import get_recipe

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RECIPES = ("kd", "cwd", "at", "ickd", "skd", "ifvd", "camd", "apd", "acfd", "sad", "mad", "lgad")
NUM_CLASSES = 19
SETUPS = {
    "cuda": {"batch": 8, "size": (512, 1024), "student": "resnet18", "teacher": "resnet101",
             "autocast": torch.bfloat16, "repeats": 10},
    "cpu": {"batch": 2, "size": (128, 256), "student": "resnet18", "teacher": "resnet101",
            "autocast": None, "repeats": 3},
}


def _autocast(device: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def student_step_ms(student, images, labels, device: str, setup: dict) -> float:
    """Median ms of a plain student step: forward, task loss, backward (no optimizer)."""
    distiller = Distiller(student, num_classes=NUM_CLASSES).to(device).train()
    times = []
    for i in range(setup["repeats"] + 1):
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, setup["autocast"]):
            loss = distiller(images, labels).total
        loss.backward()
        _sync(device)
        if i > 0:
            times.append(1000 * (time.perf_counter() - start))
        distiller.zero_grad(set_to_none=True)
    return statistics.median(times)


def teacher_for(recipe, setup: dict, device: str):
    if recipe.teacher is None:
        return None
    if recipe.teacher == "labels":
        return build_model("label_teacher", NUM_CLASSES).to(device)
    return build_model("pspnet", NUM_CLASSES, backbone=setup["teacher"]).to(device)


def measure_recipe(name: str, student, teacher, images, labels, device: str, setup: dict, backend: str) -> dict:
    recipe = get_recipe(name)
    distiller = Distiller(student, num_classes=NUM_CLASSES, recipe=recipe, teacher=teacher,
                          backend=backend).to(device)
    profile_repeats = setup["repeats"]
    with _autocast(device, setup["autocast"]):
        profile = distiller.profile_losses(images, labels, repeats=profile_repeats)
    return {
        "ms": profile["ms"],
        "saved_mb": profile["saved_bytes"] / 2**20,
        "peak_mb": None if profile["peak_bytes"] is None else profile["peak_bytes"] / 2**20,
    }


def run(device: str, recipes, *, seed: int = 0, on_update=None) -> dict:
    """Measures ``recipes``; ``on_update(result)`` gets the result so far after every recipe."""
    setup = SETUPS[device]
    torch.manual_seed(seed)
    h, w = setup["size"]
    images = torch.randn(setup["batch"], 3, h, w, device=device)
    labels = torch.randint(0, NUM_CLASSES, (setup["batch"], h, w), device=device)
    labels[:, : h // 8] = 255  # some ignored pixels, as in real label maps
    student = build_model("pspnet", NUM_CLASSES, backbone=setup["student"]).to(device)
    step_ms = student_step_ms(student, images, labels, device, setup)
    print(f"plain student step: {step_ms:.1f} ms", flush=True)
    rows = []
    teachers = {}
    for name in recipes:
        recipe = get_recipe(name)
        key = recipe.teacher
        if key not in teachers:
            teachers[key] = teacher_for(recipe, setup, device)
        row = {"recipe": name}
        for backend in ("auto", "reference"):
            try:
                row[backend] = measure_recipe(name, student, teachers[key], images, labels, device, setup, backend)
                row[backend]["share"] = row[backend]["ms"] / (step_ms + row[backend]["ms"])
            except Exception as exc:  # a recipe that fails is reported, not hidden
                row[backend] = {"error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        a, r = row["auto"], row["reference"]
        if "error" in a or "error" in r:
            print(f"{name:6s} error: {a.get('error') or r.get('error')}", flush=True)
        else:
            print(f"{name:6s} kdops {a['ms']:8.2f} ms ({100 * a['share']:5.1f}%) saved {a['saved_mb']:8.2f} MB | "
                  f"reference {r['ms']:8.2f} ms ({100 * r['share']:5.1f}%) saved {r['saved_mb']:8.2f} MB", flush=True)
        if on_update is not None:
            on_update(_result(device, setup, step_ms, rows))
    return _result(device, setup, step_ms, rows)


def _result(device: str, setup: dict, step_ms: float, rows: list[dict]) -> dict:
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "kdops": package_version("kdops")},
        "setup": {
            "student": f"pspnet-{setup['student']}",
            "teacher": f"pspnet-{setup['teacher']} (label teacher for lgad; none for sad/mad)",
            "batch": setup["batch"], "size": list(setup["size"]),
            "autocast": None if setup["autocast"] is None else str(setup["autocast"]).removeprefix("torch."),
            "repeats": setup["repeats"],
        },
        "student_step_ms": step_ms,
        "command": "python -m benchmarks.recipes",
        "rows": list(rows),
    }


def results_path(device: str) -> str:
    slug = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
    return os.path.join(RESULTS_DIR, f"{slug}-recipes.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES, metavar="RECIPE")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    path = results_path(args.device)

    def save(result: dict) -> None:
        if os.path.exists(path):
            with open(path) as f:  # keep the rows of recipes not (yet) re-measured this time
                old = {row["recipe"]: row for row in json.load(f)["rows"]}
            old.update({row["recipe"]: row for row in result["rows"]})
            result = dict(result, rows=[old[name] for name in RECIPES if name in old])
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    # Saved after every recipe: a run stopped by a time limit (a GPU lease) keeps what it measured.
    run(args.device, args.recipes, on_update=None if args.no_save else save)
    if not args.no_save:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
