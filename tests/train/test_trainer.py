"""The training loop: resume after an interruption, atomic checkpoints, schedule, data order,
evaluation."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from kdops.models import load_weights
from kdops.train.distiller import Distiller
from kdops.train.distributed import EpochShardSampler, ShardSampler
from kdops.train.recipes import get_recipe
from kdops.train.trainer import TrainConfig, Trainer, TrainingInterrupted, atomic_save, poly_factor

from tests.train import helpers

STEPS = 6


def _trainer(run_dir, *, recipe="cwd+apd", student_seed=0, steps=STEPS, **config):
    recipe = get_recipe(recipe) if recipe else None
    teacher = helpers.teacher() if recipe is not None else None
    distiller = Distiller(helpers.student(student_seed), num_classes=helpers.NUM_CLASSES, recipe=recipe,
                          teacher=teacher, total_steps=steps)
    # 10 samples, batch 4: an epoch is 2 steps, so the run crosses epochs (and 2 samples are
    # left out of each epoch's order).
    config = TrainConfig(**({"steps": steps, "batch_size": 4, "progress": False, "checkpoint_every": 2} | config))
    return Trainer(distiller, helpers.TinySegmentation(num_samples=10), helpers.TinySegmentation(4, seed=9),
                   config, run_dir=str(run_dir) if run_dir else None)


def _losses(history):
    return [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]


def test_resume_after_interruption_gives_the_same_next_steps(tmp_path):
    reference = _trainer(tmp_path / "a")
    torch.manual_seed(123)  # dropout draws from the global generator
    reference_metrics = reference.fit()

    interrupted = _trainer(tmp_path / "b")
    torch.manual_seed(123)
    assert interrupted.fit(stop_at=3) == {}  # stops after step 3, checkpoint written there
    assert interrupted.step == 3
    # A new process: other initial weights and RNG state, everything must come from the file.
    resumed = _trainer(tmp_path / "b", student_seed=7)
    torch.manual_seed(999)
    metrics = resumed.fit(resume=True)

    assert _losses(resumed.history) == _losses(reference.history)
    assert metrics["miou"] == reference_metrics["miou"]
    for a, b in zip(resumed.distiller.state_dict().values(), reference.distiller.state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_to_the_same_result(tmp_path, monkeypatch):
    reference = _trainer(tmp_path / "a")
    torch.manual_seed(123)
    reference_metrics = reference.fit()

    interrupted = _trainer(tmp_path / "b", checkpoint_every=0)  # no periodic checkpoint: Ctrl-C writes it
    original = Trainer.train_step

    def train_step(self, images, labels):
        if self.step == 2:  # Ctrl-C arrives in the middle of step 3, before its update
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    torch.manual_seed(123)
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit()
    monkeypatch.undo()
    assert (info.value.step, info.value.steps) == (3, STEPS)  # the step in flight was finished
    assert info.value.checkpoint == str(tmp_path / "b" / "checkpoint.pt")
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.pt"]

    resumed = _trainer(tmp_path / "b", student_seed=7)
    torch.manual_seed(999)
    metrics = resumed.fit(resume=True)
    assert _losses(resumed.history) == _losses(reference.history)
    assert metrics["miou"] == reference_metrics["miou"]


def test_second_ctrl_c_stops_at_once(monkeypatch):
    trainer = _trainer(None, recipe=None)
    original = Trainer.train_step

    def train_step(self, images, labels):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(KeyboardInterrupt) as info:
        trainer.fit()
    assert not isinstance(info.value, TrainingInterrupted) and trainer.step == 0


def test_checkpoint_holds_the_training_state_and_loads_as_weights(tmp_path):
    trainer = _trainer(tmp_path, recipe="cwd")
    trainer.fit()
    path = tmp_path / "checkpoint.pt"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left behind
    state = torch.load(path, weights_only=True)
    assert state["step"] == STEPS and len(state["history"]) == STEPS
    assert {"model", "losses", "optimizer", "scheduler", "scaler", "rng", "evaluations"} <= set(state)
    assert len(state["rng"]) == 1
    model = helpers.student(seed=5)
    load_weights(model, path)  # the "model" entry is the student's state dict
    for a, b in zip(model.state_dict().values(), trainer.distiller.student.state_dict().values()):
        assert torch.equal(a, b)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "c.pt")
    atomic_save({"x": torch.ones(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["x"], torch.ones(1))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_resuming_with_another_process_count_is_refused(tmp_path):
    trainer = _trainer(tmp_path, recipe=None)
    trainer.fit(stop_at=2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["rng"] = state["rng"] * 2
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="2 processes"):
        _trainer(tmp_path, recipe=None).fit(resume=True)


def test_poly_schedule():
    trainer = _trainer(None, recipe=None, lr=0.1, steps=4)
    trainer.fit()
    expected = [0.1 * poly_factor(s, 4, 0.9) for s in range(4)]
    assert [h["lr"] for h in trainer.history] == pytest.approx(expected)
    assert poly_factor(0, 10, 0.9) == 1.0 and poly_factor(10, 10, 0.9) == 0.0


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    trainer = _trainer(None, recipe=None, steps=1, lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad=1e-3)
    before = [p.detach().clone() for p in trainer.optimizer.param_groups[0]["params"]]
    trainer.fit()
    params = trainer.optimizer.param_groups[0]["params"]
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_data_order_depends_on_seed_and_epoch_only():
    a = EpochShardSampler(10, seed=3)
    b = EpochShardSampler(10, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert sorted(a.shard(0)) == list(range(10))
    # Two processes split one epoch's order between them, dropping the odd sample out.
    ranks = [EpochShardSampler(11, seed=3, rank=r, world_size=2) for r in range(2)]
    shards = [r.shard(1) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == 5 and not set(shards[0]) & set(shards[1])
    ranks[1].set_epoch(1, start=2)
    assert list(ranks[1]) == shards[1][2:] and len(ranks[1]) == 3


def test_evaluation_shards_cover_every_sample_once():
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_evaluation_reports_miou_of_the_student():
    trainer = _trainer(None, recipe="cwd", steps=2)
    metrics = trainer.fit()
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["step"] == 2
    assert trainer.distiller.student.training  # evaluation restores the mode
    assert len(metrics["iou"]) == helpers.NUM_CLASSES


@pytest.mark.parametrize("kwargs,match", [
    pytest.param({"steps": 0}, "steps", id="steps"),
    pytest.param({"batch_size": 0}, "batch_size", id="batch"),
    pytest.param({"lr": float("inf")}, "lr", id="lr"),
    pytest.param({"clip_grad": -1.0}, "clip_grad", id="clip"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_too_small_training_set_is_refused():
    with pytest.raises(ValueError, match="fewer than one batch"):
        _trainer(None, recipe=None, batch_size=16)
