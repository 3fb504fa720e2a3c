"""Two processes (gloo, CPU) train like one process that sees both halves of the batch."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from kdops.train.distributed import DistContext, EpochShardSampler

from tests.train import dist_worker


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    out = folder / "rank0.pt"
    mp.spawn(dist_worker.run, args=(2, str(folder / "init"), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def _single_process_equivalent(steps: int = 2):
    """One process, the two ranks' shards as two micro-batches: mean of their losses."""
    trainer = dist_worker.build_trainer(DistContext(), steps)
    distiller, data = trainer.distiller, trainer.train_set
    samplers = [EpochShardSampler(len(data), seed=0, rank=r, world_size=2) for r in range(2)]
    totals = []
    for step in range(steps):
        distiller.train()
        losses = []
        for sampler in samplers:
            index = sampler.shard(0)[2 * step: 2 * step + 2]
            images, labels = data.images[index], data.labels[index]
            losses.append(distiller(images, labels, step).total)
        total = sum(losses) / 2
        trainer.optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainer.optimizer.param_groups[0]["params"], trainer.config.clip_grad)
        trainer.optimizer.step()
        trainer.scheduler.step()
        totals.append(total.item())
    return trainer, totals


def test_two_processes_give_the_loss_of_one_process_on_the_same_batch(two_process_run):
    trainer, totals = _single_process_equivalent()
    assert [h["total"] for h in two_process_run["history"]] == pytest.approx(totals, rel=1e-5)
    for p_ddp, p_one in zip(two_process_run["params"], trainer.distiller.student.parameters()):
        torch.testing.assert_close(p_ddp, p_one.detach(), rtol=1e-5, atol=1e-6)


def test_two_processes_evaluate_like_one(two_process_run):
    trainer = dist_worker.build_trainer(DistContext())
    single = trainer.evaluate()
    assert two_process_run["before"]["miou"] == single["miou"]
    assert two_process_run["before"]["pixel_acc"] == single["pixel_acc"]
