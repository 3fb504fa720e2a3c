"""The command line: every mistake is one line and exit code 2 before any training (the cheap
ones before torch is imported), --help, progress lines, Ctrl-C, run folders, tiny end-to-end
runs. Runs here are tiny (a few 32x32 samples, 1-2 steps): CI has a time budget."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from kdops.models import BACKBONE_NAMES, MODEL_NAMES, build_model
from kdops.train import cli, names
from kdops.train.cli import distill_main, gain_line, train_main
from kdops.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tiny runs of the default models: 32x32 images, a handful of samples and steps.
TINY = ["--train-samples", "8", "--val-samples", "4", "--crop-size", "32", "--batch-size", "4", "--no-progress"]


def _error(capsys, main, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


# -- the names the CLI knows without importing torch --------------------------------------------
def test_cli_names_mirror_the_registries():
    from kdops.backend import BACKENDS
    from kdops.train.data import DATASET_NAMES
    from kdops.train.recipes import get_recipe, recipe_names

    assert names.BACKENDS == BACKENDS
    assert names.MODEL_NAMES == MODEL_NAMES and names.BACKBONE_NAMES == BACKBONE_NAMES
    assert names.DATASET_NAMES == DATASET_NAMES
    assert list(names.RECIPE_NAMES) == recipe_names()
    lane = [n for n in recipe_names() if get_recipe(n).defaults.get("dataset") == "synthetic_lanes"]
    assert list(names.LANE_RECIPES) == lane
    assert all(get_recipe(n).defaults.get("lr") == cli.DEFAULT_LANE_LR for n in lane)


# -- stage 1: cheap errors, before torch is imported -------------------------------------------
CHEAP_ERRORS = [
    (["--recipe", "nope"], "unknown recipe 'nope'; choose from acfd, apd"),
    (["--recipe", "cwd+nope"], "unknown recipe 'nope'"),
    (["--recipe", "cwd+"], "unknown recipe '' (an empty name)"),
    ([], "the following arguments are required: --recipe"),
    (["--recipe", "cwd", "--step", "10"], "unrecognized arguments: --step 10"),
    (["--recipe", "cwd", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--recipe", "cwd", "--dataset", "voc"], "--dataset voc needs --data-root"),
    (["--recipe", "cwd", "--dataset", "cityscapes", "--data-root", "/no/such/folder"],
     "--data-root: data folder not found: /no/such/folder"),
    (["--recipe", "cwd", "--dataset", "synthetic", "--data-root", "/tmp"], "is generated"),
    (["--recipe", "cwd", "--student", "unet"], "--student: unknown model 'unet'"),
    (["--recipe", "cwd", "--teacher-backbone", "vgg16"], "--teacher-backbone: unknown backbone 'vgg16'"),
    (["--recipe", "cwd", "--student", "erfnet", "--student-backbone", "resnet18"], "takes no backbone"),
    (["--recipe", "cwd", "--teacher-weights", "/no/such.pt"], "--teacher-weights: file not found: /no/such.pt"),
    (["--recipe", "cwd", "--weight", "cwd/logits"], "TERM=VALUE"),
    (["--recipe", "cwd", "--weight", "cwd/logits=-1"], "TERM=VALUE"),
    (["--recipe", "cwd", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--recipe", "cwd", "--teacher-steps", "0"], "--teacher-steps must be >= 1, got 0"),
    (["--recipe", "cwd", "--teacher-steps", "-5"], "--teacher-steps must be >= 1, got -5"),
    (["--recipe", "cwd", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--recipe", "cwd", "--log-every", "0"], "--log-every must be >= 1"),
    (["--recipe", "cwd", "--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
    (["--recipe", "cwd", "--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--recipe", "cwd", "--lr", "0"], "--lr must be a finite number > 0"),
    (["--recipe", "cwd", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["--recipe", "cwd", "--momentum", "1"], "--momentum must be a finite number >= 0.0 and < 1.0"),
    (["--recipe", "cwd", "--crop-size", "32", "32", "32"], "--crop-size takes one or two"),
    (["--recipe", "cwd", "--background-weight", "-1"], "--background-weight must be"),
    (["--recipe", "cwd", "--threads", "0"], "--threads must be >= 1"),
    (["--recipe", "cwd", "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["--recipe", "cwd", "--work-dir", "/dev/null/runs"], "--work-dir /dev/null/runs: /dev/null is not a folder"),
    (["--recipe", "cwd", "--name", "../elsewhere"], "--name must be a plain folder name"),
    (["--recipe", "cwd", "--resume", "--overwrite"], "not allowed with argument"),
    (["--recipe", "cwd", "--backend", "cuda-ish"], "invalid choice: 'cuda-ish'"),
]


@pytest.mark.parametrize("argv,message", [pytest.param(a, m, id=m[:40]) for a, m in CHEAP_ERRORS])
def test_distill_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert message in _error(capsys, distill_main, argv)


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--model", "unet"], "--model: unknown model 'unet'", id="unknown-model"),
    pytest.param(["--model", "erfnet", "--backbone", "resnet18"], "takes no backbone", id="erfnet-backbone"),
    pytest.param(["--dataset", "culane", "--data-root", "/no/such/folder"], "data folder not found",
                 id="missing-data-folder"),
    pytest.param(["--work-dir", "/dev/null/runs"], "/dev/null is not a folder", id="work-dir"),
    pytest.param(["--steps", "-3"], "--steps must be >= 1, got -3", id="steps"),
])
def test_train_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    assert message in _error(capsys, train_main, argv)


def test_cheap_errors_are_answered_without_importing_torch():
    """In a fresh interpreter: every cheap mistake exits 2 before torch is imported (that
    import alone takes seconds on a small machine), each in a few milliseconds."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from kdops.train.cli import distill_main
        out = []
        for argv in {[a for a, _ in CHEAP_ERRORS]!r}:
            start = time.perf_counter()
            code = distill_main(argv)
            out.append([code, time.perf_counter() - start, "torch" in sys.modules])
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for (argv, _), (code, seconds, torch_imported) in zip(CHEAP_ERRORS, json.loads(result.stdout)):
        assert code == 2, argv
        assert not torch_imported, argv
        assert seconds < 0.5, (argv, seconds)
    assert len(result.stderr.strip().splitlines()) == len(CHEAP_ERRORS)


def test_console_script_exit_code():
    result = subprocess.run([sys.executable, "-m", "kdops.train", "distill", "--recipe", "nope"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("kdops-distill: error: unknown recipe 'nope'")
    assert "Traceback" not in result.stderr


# -- stage 2: errors that need torch, still before any training --------------------------------
@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    files = {}
    files["erfnet3"] = folder / "erfnet3.pt"
    torch.save(build_model("erfnet", 3).state_dict(), files["erfnet3"])
    files["erfnet8"] = folder / "erfnet8.pt"
    torch.save({"model": build_model("erfnet", 8).state_dict()}, files["erfnet8"])  # a checkpoint layout
    files["psp_mobilenet"] = folder / "psp_mobilenet.pt"
    torch.save(build_model("pspnet", 8, backbone="mobilenetv2").state_dict(), files["psp_mobilenet"])
    files["random"] = folder / "random.bin"
    files["random"].write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())
    files["text"] = folder / "notes.txt"
    files["text"].write_text("my notes\n")
    files["pickle"] = folder / "pickled.pt"
    torch.save({"model": build_model("erfnet", 8).state_dict(), "optimizer": torch.optim.SGD}, files["pickle"])
    files["foreign"] = folder / "foreign.pt"
    torch.save({"weight": torch.ones(3)}, files["foreign"])
    return {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("file,argv,message", [
    pytest.param("erfnet3", ["--teacher", "erfnet"], "class-count mismatch: --teacher-weights {} predicts 3 classes, "
                 "the data set has 8", id="classes"),
    pytest.param("psp_mobilenet", [], "--teacher-weights {} holds pspnet/mobilenetv2 weights, not pspnet/resnet18: "
                 "pass --teacher-backbone mobilenetv2", id="other-backbone"),
    pytest.param("erfnet8", [], "--teacher-weights {} holds erfnet weights, not pspnet/resnet18: pass --teacher "
                 "erfnet", id="other-model"),
    pytest.param("random", [], "--teacher-weights {}: not a PyTorch weights file", id="random-bytes"),
    pytest.param("text", [], "--teacher-weights {}: not a PyTorch weights file", id="text-file"),
    pytest.param("pickle", [], "--teacher-weights {}: the file holds pickled Python objects", id="pickled-code"),
    pytest.param("foreign", [], "--teacher-weights {} does not fit pspnet/resnet18 nor any other kdops model",
                 id="no-kdops-model"),
    pytest.param("erfnet8", ["--teacher", "erfnet", "--teacher-steps", "5"], "--teacher-steps trains a teacher",
                 id="steps-and-weights"),
])
def test_weights_files_are_checked_before_training(capsys, tmp_path, weights_files, file, argv, message):
    path = weights_files[file]
    line = _error(capsys, distill_main, ["--recipe", "cwd", "--teacher-weights", path, "--work-dir", str(tmp_path),
                                         *argv, *TINY])
    assert message.format(path) in line
    assert os.listdir(tmp_path) == []


def test_backend_without_a_kernel_for_a_recipe_op(capsys, tmp_path, monkeypatch):
    # Which ops have CPU kernels changes as kernels land: take one away for the test.
    from dataclasses import replace

    from kdops import backend

    monkeypatch.setitem(backend.OPS, "channel_kl", replace(backend.OPS["channel_kl"], cpu=None))
    backend._resolve_cached.cache_clear()  # resolution is cached: forget the answers for the real OPS ...
    try:
        line = _error(capsys, distill_main, ["--recipe", "cwd", "--backend", "cpu", "--work-dir", str(tmp_path),
                                             *TINY])
    finally:
        backend._resolve_cached.cache_clear()  # ... and those for this one
    assert line.startswith("kdops-distill: error: --backend cpu: backend='cpu' cannot run kdops.channel_kl on cpu")
    assert line.endswith("the cpu backend does not implement channel_kl")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--recipe", "cwd", "--backend", "cuda", "--device", "cpu"],
                 "the cuda backend runs on cuda tensors, not cpu",
                 id="cuda-on-cpu"),
    pytest.param(["--recipe", "lgad+cwd"], "need different teachers", id="teacher-conflict"),
    pytest.param(["--recipe", "cwd", "--weight", "kd/logits=1"], "has no term 'kd/logits'", id="weight-term"),
    pytest.param(["--recipe", "sad", "--teacher", "pspnet"], "self-distillation and takes no teacher",
                 id="teacher-for-sad"),
])
def test_recipe_and_backend_errors_before_training(capsys, tmp_path, argv, message):
    assert message in _error(capsys, distill_main, [*argv, "--work-dir", str(tmp_path), *TINY])
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_triton_backend_on_a_machine_without_gpu(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as for a user (the test session interprets Triton on CPU)
    line = _error(capsys, distill_main, ["--recipe", "cwd", "--backend", "triton", "--work-dir", str(tmp_path),
                                         *TINY])
    assert line.startswith("kdops-distill: error: --backend triton: backend='triton' cannot run kdops.channel_kl")
    assert "Triton kernels run on CUDA tensors" in line or "triton is not installed" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    line = _error(capsys, distill_main, ["--recipe", "cwd", "--device", "cuda", "--work-dir", str(tmp_path), *TINY])
    assert "--device cuda: CUDA is not available on this machine" in line


def test_kdops_backend_variable_is_checked(capsys, monkeypatch):
    monkeypatch.setenv("KDOPS_BACKEND", "fast")
    assert "KDOPS_BACKEND='fast' is not a backend" in _error(capsys, distill_main, ["--recipe", "cwd"])


# -- help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser", [cli._train_parser, cli._distill_parser], ids=["kdops-train", "kdops-distill"])
def test_every_option_has_help_with_its_default(parser):
    for action in parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert action.required or "default" in action.help, action.option_strings


def test_train_help_mentions_no_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    assert "recipe" not in capsys.readouterr().out


def test_module_help():
    result = subprocess.run([sys.executable, "-m", "kdops.train", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0 and "distill" in result.stdout and "train" in result.stdout
    result = subprocess.run([sys.executable, "-m", "kdops.train"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


# -- output -------------------------------------------------------------------------------------
@pytest.mark.parametrize("miou,baseline,line", [
    pytest.param(0.07449, 0.07351, "distillation: +0.0 mIoU over the student trained alone", id="same-rows"),
    pytest.param(0.0752, 0.0734, "distillation: +0.2 mIoU over the student trained alone", id="rows-differ"),
    pytest.param(0.30449, 0.26551, "distillation: +3.8 mIoU over the student trained alone", id="gain"),
    pytest.param(0.2, 0.25, "distillation: -5.0 mIoU over the student trained alone", id="loss"),
])
def test_gain_is_the_difference_of_the_rows(miou, baseline, line):
    assert gain_line(miou, baseline) == line
    shown = float(cli._pct(miou)) - float(cli._pct(baseline))  # the rows of the table
    assert line.split()[1] == f"{shown:+.1f}"


def test_progress_lines_when_not_a_terminal(tmp_path, capsys):
    assert train_main(["--model", "erfnet", "--dataset", "synthetic", "--steps", "3", "--log-every", "2",
                       "--work-dir", str(tmp_path), *[a for a in TINY if a != "--no-progress"]]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err
    steps = [line for line in captured.err.splitlines() if ": step " in line]
    assert [s.split(": step ")[1].split()[0] for s in steps] == ["2/3", "3/3"]
    assert "img/s" in steps[0] and "ETA" in steps[0] and "total" in steps[0]
    assert captured.out.startswith("erfnet on synthetic")  # no leading blank line
    assert "wall time:" in captured.out


def test_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert train_main(["--model", "erfnet", "--dataset", "synthetic", "--steps", "2", "--log-every", "1",
                       "--work-dir", str(tmp_path), *[a for a in TINY if a != "--no-progress"]]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "2/2" in err  # tqdm redraws its line
    assert ": step " not in err


# -- Ctrl-C, --resume, run folders ----------------------------------------------------------------
def _interrupt_at(monkeypatch, step: int):
    """Send SIGINT to this process during training step ``step`` (1-based), as Ctrl-C would."""
    original = Trainer.train_step

    def train_step(self, images, labels):
        record = original(self, images, labels)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    argv = ["--model", "erfnet", "--dataset", "synthetic", "--steps", "4", "--name", "run", "--work-dir",
            str(tmp_path), *TINY]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        assert train_main(argv) == 130
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    assert line == (f"kdops-train: interrupted after step 2/4; checkpoint {checkpoint}; continue with: kdops-train "
                    f"{' '.join(argv)} --resume")
    assert torch.load(checkpoint, weights_only=True)["step"] == 2

    # Without --resume the unfinished run is not overwritten ...
    assert "pass --resume to continue it or --overwrite to start over" in _error(capsys, train_main, argv)
    # ... with it, training continues from step 2 to the end.
    assert train_main([*argv, "--resume"]) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [0, 1, 2, 3]


def test_resume_with_nothing_to_resume(capsys, tmp_path):
    line = _error(capsys, distill_main, ["--recipe", "cwd", "--resume", "--work-dir", str(tmp_path), *TINY])
    assert "--resume: nothing to continue: no checkpoint in" in line
    line = _error(capsys, train_main, ["--model", "erfnet", "--resume", "--work-dir", str(tmp_path), *TINY])
    assert "--resume: nothing to continue: no checkpoint in" in line
    assert os.listdir(tmp_path) == []


def test_distill_end_to_end_reuse_and_overwrite(tmp_path, capsys):
    # ERFNet teacher and student: the cheapest models (the default ones are built by the
    # tests above and run by the main job).
    argv = ["--recipe", "cwd+kd", "--teacher", "erfnet", "--student", "erfnet", "--steps", "2", "--teacher-steps",
            "2", "--work-dir", str(tmp_path), *TINY]
    assert distill_main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert out.startswith("kdops-distill --recipe cwd+kd on synthetic")
    assert "erfnet  " in out and "erfnet + cwd+kd" in out and "KD losses:" in out
    assert "(cached)" not in out and "wall time:" in out
    assert captured.err.count("training 2 steps") == 3
    metrics_files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path) for f in fs if f == "metrics.json"]
    assert len(metrics_files) == 3  # teacher, plain student, distilled student
    (run,) = [p for p in metrics_files if "cache" not in p]
    summary = json.load(open(run))
    assert summary["recipe"] == "cwd+kd" and summary["terms"] == {"cwd/logits": 3.0, "kd/logits": 1.0}
    assert {"miou", "baseline_miou", "teacher_miou", "kd_loss_ms_per_step", "kd_loss_saved_bytes",
            "wall_seconds"} <= set(summary)
    assert {"task", "cwd/logits", "kd/logits"} <= set(summary["history"][0])
    checkpoint = os.path.join(os.path.dirname(run), "checkpoint.pt")
    before = os.stat(checkpoint).st_mtime_ns

    # Again: all three runs are reused, nothing is retrained or rewritten.
    assert distill_main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.count("(cached)") == 3 and "training" not in captured.err
    assert os.stat(checkpoint).st_mtime_ns == before
    assert json.load(open(run)) == summary  # the record of the run that trained, untouched

    # Other settings: a new folder, and the phase line says why the finished run is not reused.
    assert distill_main([*argv, "--weight", "kd/logits=2"]) == 0
    err = capsys.readouterr().err
    assert f"(not reusing {os.path.dirname(run)}: other settings)" in err

    # --overwrite retrains the distilled run (only), to the same result: same seed.
    assert distill_main([*argv, "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("(cached)") == 2 and "training 2 steps (--overwrite)" in captured.err
    assert os.stat(checkpoint).st_mtime_ns != before
    assert json.load(open(run))["history"][-1]["total"] == summary["history"][-1]["total"]


def test_a_named_folder_of_another_run_is_not_overwritten(tmp_path, capsys):
    base = ["--model", "erfnet", "--dataset", "synthetic", "--name", "mine", "--work-dir", str(tmp_path), *TINY]
    assert train_main([*base, "--steps", "1"]) == 0
    capsys.readouterr()
    line = _error(capsys, train_main, [*base, "--steps", "2"])
    assert "holds a run with other settings (step 1/1); pass --overwrite to replace it or --name" in line
    assert train_main([*base, "--steps", "2", "--overwrite"]) == 0


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
