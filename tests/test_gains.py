"""The gains benchmark (benchmarks/gains.py): its statistics, its report, and a tiny real run."""
from __future__ import annotations

import json
import math
import os

import pytest

from benchmarks import gains, report


# -- statistics ----------------------------------------------------------------------------------
def test_paired_differences_pair_by_seed_not_by_position():
    values = {2: 0.50, 0: 0.40, 1: 0.30}
    baseline = {0: 0.35, 1: 0.32, 2: 0.41}
    diff = gains.paired_differences(values, baseline)
    assert list(diff) == [0, 1, 2]
    assert diff == pytest.approx({0: 0.05, 1: -0.02, 2: 0.09})


def test_paired_differences_keep_only_shared_seeds_and_refuse_none():
    assert gains.paired_differences({0: 1.0, 3: 2.0}, {0: 0.5, 1: 0.1}) == {0: 0.5}
    with pytest.raises(ValueError, match="no seed in common"):
        gains.paired_differences({1: 1.0}, {0: 1.0})


def test_mean_std_is_the_sample_std():
    mean, std = gains.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    mean, std = gains.mean_std([0.3])
    assert mean == 0.3 and math.isnan(std)
    with pytest.raises(ValueError):
        gains.mean_std([])


@pytest.mark.parametrize("mean,std,expected", [
    pytest.param(0.02, 0.01, gains.VERDICT_GAIN, id="gain-beyond-1sd"),
    pytest.param(0.01, 0.01, gains.VERDICT_NOISE, id="gain-equal-1sd-is-noise"),
    pytest.param(0.005, 0.01, gains.VERDICT_NOISE, id="gain-within-1sd"),
    pytest.param(-0.005, 0.01, gains.VERDICT_NOISE, id="loss-within-1sd"),
    pytest.param(-0.02, 0.01, gains.VERDICT_LOSS, id="loss-beyond-1sd"),
    pytest.param(0.0, 0.0, gains.VERDICT_NOISE, id="no-change-no-spread"),
    pytest.param(0.001, 0.0, gains.VERDICT_GAIN, id="same-small-gain-every-seed"),
    pytest.param(0.05, math.nan, gains.VERDICT_NOISE, id="one-seed-no-verdict"),
])
def test_verdict(mean, std, expected):
    assert gains.verdict(mean, std) == expected


def test_pairing_removes_the_noise_the_runs_share():
    """A recipe 1 point better than the plain student on every seed, with seeds 10 points
    apart: unpaired it is noise, paired it is a gain with no spread."""
    runs = [{"dataset": "scenes", "recipe": "plain", "seed": s, "miou": 0.3 + 0.1 * s} for s in range(3)]
    runs += [{"dataset": "scenes", "recipe": "kd", "seed": s, "miou": 0.31 + 0.1 * s} for s in range(3)]
    plain, kd = gains.summarize(runs, "miou")
    assert plain["recipe"] == "plain" and "verdict" not in plain
    assert kd["mean"] - plain["mean"] == pytest.approx(0.01)
    assert kd["std"] == pytest.approx(0.1)  # the unpaired spread dwarfs the gain
    assert kd["gain_mean"] == pytest.approx(0.01) and kd["gain_std"] == pytest.approx(0.0, abs=1e-12)
    assert kd["verdict"] == gains.VERDICT_GAIN


def test_summarize_keeps_data_sets_apart_and_takes_a_metric_function():
    runs = [
        {"dataset": "scenes", "recipe": "plain", "seed": 0, "miou": 0.5},
        {"dataset": "scenes", "recipe": "cwd", "seed": 0, "miou": 0.6},
        {"dataset": "lanes", "recipe": "plain", "seed": 0, "miou": 0.0, "lane_f1": 0.8},
        {"dataset": "lanes", "recipe": "sad", "seed": 0, "miou": 0.0, "lane_f1": 0.7},
    ]
    rows = gains.summarize(runs, lambda r: r.get("lane_f1", r["miou"]))
    assert [(r["dataset"], r["recipe"]) for r in rows] == [("scenes", "plain"), ("scenes", "cwd"),
                                                           ("lanes", "plain"), ("lanes", "sad")]
    assert rows[1]["gain_mean"] == pytest.approx(0.1)
    assert rows[3]["gain_mean"] == pytest.approx(-0.1)
    assert rows[3]["verdict"] == gains.VERDICT_NOISE  # one seed: no verdict


# -- a tiny real run -----------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_run_writes_results_the_report_renders(tmp_path, capsys):
    """One seed, two steps, on small lane sets: the plain student, a self-distillation recipe
    and a label-teacher recipe (teacher trained once), through the CLI in-process."""
    out = tmp_path / "cpu-gains.json"
    argv = ["--seeds", "1", "--datasets", "lanes", "--recipes", "sad", "lgad", "--steps", "2",
            "--teacher-steps", "2", "--train-samples", "16", "--val-samples", "8",
            "--work-dir", str(tmp_path / "runs"), "--output", str(out)]
    gains.main(argv)
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m benchmarks.gains --seeds 1")
    assert result["device"] == "cpu" and result["threads"] == 1
    recipes = [r["recipe"] for r in result["runs"]]
    assert recipes == ["teacher:labels", "plain", "sad", "lgad"]
    for run in result["runs"]:
        assert run["command"].startswith(("kdops-train ", "kdops-distill "))
        assert run["wall_seconds"] > 0 and run["train_seconds"] > 0
        assert os.path.isfile(os.path.join(run["run_dir"], "checkpoint.pt"))
    students = [r for r in result["runs"] if not r["recipe"].startswith("teacher:")]
    assert all(0.0 <= r["lane_f1"] <= 1.0 for r in students)
    # every recipe's student reads the one teacher, by its weights file
    lgad = next(r for r in result["runs"] if r["recipe"] == "lgad")
    assert "--teacher-weights" in lgad["command"] and "--no-baseline" in lgad["command"]
    rows = {r["recipe"]: r for r in result["rows"]}
    assert set(rows) == {"plain", "sad", "lgad"}
    assert rows["sad"]["gain_mean"] == pytest.approx(students[1]["lane_f1"] - students[0]["lane_f1"])
    table = report.gains_table(result)
    assert "| plain student |" in table and "| lgad |" in table and "lane F1" in table
    assert "mIoU gain (paired)" in table  # lanes: mIoU beside the F1
    assert rows["lgad"]["miou"]["gain_mean"] == pytest.approx(students[2]["miou"] - students[0]["miou"])
    assert "within noise" in table  # one seed never claims a gain
    chart = tmp_path / "chart.png"
    report.gains_chart(result, str(chart))
    assert chart.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "wrote" in printed and "| sad |" in printed
    assert not any(r["reused"] for r in result["runs"])
    # Run again: every run is reused from its folder, with the same numbers and first wall times.
    gains.main(argv)
    again = json.loads(out.read_text())
    assert all(r["reused"] for r in again["runs"])
    assert [r["lane_f1"] for r in again["runs"][1:]] == [r["lane_f1"] for r in result["runs"][1:]]
    assert [r["wall_seconds"] for r in again["runs"]] == [r["wall_seconds"] for r in result["runs"]]
    assert "4 runs took" in report.gains_header(again)


def test_default_schedule_is_kdops_distills():
    """The benchmark measures what `kdops-distill --recipe R` trains: the same steps, teacher
    steps and lane learning rate."""
    from kdops.train import cli

    assert gains.DEFAULT_STEPS == {"scenes": cli.DEFAULT_STEPS, "lanes": cli.DEFAULT_LANE_STEPS}
    assert gains.DEFAULT_TEACHER_STEPS == {"model": cli.DEFAULT_TEACHER_STEPS,
                                           "labels": cli.DEFAULT_LABEL_TEACHER_STEPS}
    assert gains.DEFAULT_LR == {"scenes": None, "lanes": cli.DEFAULT_LANE_LR}
    assert gains.STUDENTS["scenes"] == cli.DEFAULT_STUDENT and gains.STUDENTS["lanes"] == cli.DEFAULT_LANE_STUDENT
    assert gains.TEACHER == cli.DEFAULT_TEACHER
