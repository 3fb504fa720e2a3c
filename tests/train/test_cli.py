"""The command line: one-line errors with exit code 2, and tiny end-to-end runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdops.models import build_model
from kdops.train.cli import distill_main, train_main

# Tiny runs of the default models: 32x32 images, a handful of samples and steps.
TINY = ["--train-samples", "8", "--val-samples", "4", "--crop-size", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def erfnet_3_classes(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "erfnet3.pt"
    torch.save(build_model("erfnet", 3).state_dict(), path)
    return str(path)


def _error(capsys, main, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--recipe", "nope"], "unknown recipe 'nope'; choose from acfd, apd", id="unknown-recipe"),
    pytest.param(["--recipe", "cwd+nope"], "unknown recipe 'nope'", id="unknown-recipe-in-sum"),
    pytest.param(["--recipe", "lgad+cwd"], "need different teachers", id="teacher-conflict"),
    pytest.param([], "the following arguments are required: --recipe", id="no-recipe"),
    pytest.param(["--recipe", "cwd", "--dataset", "imagenet"], "invalid choice: 'imagenet'", id="bad-dataset"),
    pytest.param(["--recipe", "cwd", "--dataset", "voc"], "needs --data-root", id="no-data-root"),
    pytest.param(["--recipe", "cwd", "--dataset", "cityscapes", "--data-root", "/no/such/folder"],
                 "data folder not found: /no/such/folder", id="missing-data-folder"),
    pytest.param(["--recipe", "cwd", "--student", "unet"], "unknown student model 'unet'", id="unknown-student"),
    pytest.param(["--recipe", "cwd", "--teacher-backbone", "vgg16"], "unknown teacher backbone 'vgg16'",
                 id="unknown-backbone"),
    pytest.param(["--recipe", "cwd", "--teacher-weights", "/no/such.pt"], "teacher weights file not found",
                 id="missing-weights"),
    pytest.param(["--recipe", "sad", "--teacher", "pspnet"], "self-distillation and takes no teacher",
                 id="teacher-for-sad"),
    pytest.param(["--recipe", "cwd", "--weight", "cwd/logits"], "TERM=VALUE", id="weight-syntax"),
    pytest.param(["--recipe", "cwd", "--weight", "kd/logits=1"], "has no term 'kd/logits'", id="weight-term"),
    pytest.param(["--recipe", "cwd", "--steps", "0"], "--steps must be >= 1", id="steps"),
    pytest.param(["--recipe", "cwd", "--crop-size", "32", "32", "32"], "--crop-size takes one or two",
                 id="crop-size"),
    pytest.param(["--recipe", "cwd", "--dataset", "synthetic", "--data-root", "/tmp"], "is generated",
                 id="root-for-synthetic"),
    pytest.param(["--recipe", "cwd", "--background-weight", "-1"], "--background-weight must be", id="bg-weight"),
    pytest.param(["--recipe", "cwd", "--threads", "0"], "--threads must be >= 1", id="threads"),
])
def test_distill_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert message in _error(capsys, distill_main, argv)


def test_class_count_mismatch_between_teacher_and_student(capsys, erfnet_3_classes):
    line = _error(capsys, distill_main, ["--recipe", "cwd", "--teacher", "erfnet", "--teacher-weights",
                                         erfnet_3_classes])
    assert line == (f"kdops-distill: error: class-count mismatch: the teacher weights {erfnet_3_classes} predict "
                    "3 classes, the data set and student have 8")


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--model", "unet"], "unknown model 'unet'", id="unknown-model"),
    pytest.param(["--model", "erfnet", "--backbone", "resnet18"], "takes no backbone", id="erfnet-backbone"),
    pytest.param(["--dataset", "culane", "--data-root", "/no/such/folder"], "data folder not found",
                 id="missing-data-folder"),
])
def test_train_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert message in _error(capsys, train_main, argv)


def test_console_script_exit_code():
    result = subprocess.run([sys.executable, "-m", "kdops.train", "distill", "--recipe", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kdops-distill: error: unknown recipe 'nope'")
    assert "Traceback" not in result.stderr


def test_distill_end_to_end_and_teacher_cache(tmp_path, capsys):
    argv = ["--recipe", "cwd+kd", "--steps", "2", "--teacher-steps", "2", "--work-dir", str(tmp_path), *TINY]
    assert distill_main(argv) == 0
    out = capsys.readouterr().out
    assert "pspnet/resnet18" in out and "deeplabv3/resnet18 + cwd+kd" in out and "KD losses:" in out
    assert "(cached)" not in out
    metrics_files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == "metrics.json"]
    assert len(metrics_files) == 3  # teacher, plain student, distilled student
    (run,) = [p for p in metrics_files if "cache" not in p]
    summary = json.load(open(run))
    assert summary["recipe"] == "cwd+kd" and summary["terms"] == {"cwd/logits": 3.0, "kd/logits": 1.0}
    assert {"miou", "baseline_miou", "teacher_miou", "kd_loss_ms_per_step", "kd_loss_saved_bytes"} <= set(summary)
    assert {"task", "cwd/logits", "kd/logits"} <= set(summary["history"][0])
    assert os.path.isfile(os.path.join(os.path.dirname(run), "checkpoint.pt"))

    # Again: teacher and plain student come from the cache, the distilled run is redone from
    # the same seed to the same result.
    assert distill_main(argv) == 0
    assert capsys.readouterr().out.count("(cached)") == 2
    again = json.load(open(run))
    assert again["miou"] == summary["miou"] and again["history"][-1]["total"] == summary["history"][-1]["total"]


def test_train_then_distill_from_the_trained_teacher(tmp_path, capsys):
    assert train_main(["--model", "erfnet", "--dataset", "synthetic", "--steps", "2", "--name", "t",
                       "--work-dir", str(tmp_path), *TINY]) == 0
    weights = tmp_path / "t" / "checkpoint.pt"
    assert weights.is_file() and (tmp_path / "t" / "metrics.json").is_file()
    capsys.readouterr()
    assert distill_main(["--recipe", "kd", "--teacher", "erfnet", "--teacher-weights", str(weights),
                         "--student", "erfnet", "--no-baseline", "--steps", "2", "--work-dir", str(tmp_path),
                         *TINY]) == 0
    out = capsys.readouterr().out
    assert "(given)" in out and "erfnet + kd" in out
