"""The body of one process of the two-process tests (spawned by test_distributed.py)."""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

from kdops.train.distributed import DistContext, shutdown

from tests.train import helpers


def build_trainer(ctx: DistContext, steps: int = 2):
    from kdops.train.distiller import Distiller
    from kdops.train.recipes import get_recipe
    from kdops.train.trainer import TrainConfig, Trainer

    student = helpers.student()
    student.dropout.p = 0.0  # dropout draws differ between processes; the test compares exactly
    distiller = Distiller(student, num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd+kd"),
                          teacher=helpers.teacher(), total_steps=steps)
    config = TrainConfig(steps=steps, batch_size=2, progress=False, checkpoint_every=0)
    train = helpers.TinySegmentation(num_samples=8, ignore=False)
    val = helpers.TinySegmentation(num_samples=5, seed=3)
    return Trainer(distiller, train, val, config, ctx=ctx)


def run(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    # A collective that one rank never joins fails after the timeout instead of hanging CI.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        trainer = build_trainer(DistContext(rank, world_size, torch.device("cpu")))
        before = trainer.evaluate()
        trainer.fit()
        if rank == 0:
            torch.save({"history": trainer.history, "before": before,
                        "params": [p.detach() for p in trainer.distiller.student.parameters()]}, out_file)
        del trainer  # DDP's reducer holds the group: release it while the group is up
    finally:
        shutdown()
    # Leave without the interpreter's teardown: once in CI a rank that had finished everything
    # died in gloo's static destruction ("terminate called without an active exception",
    # SIGABRT), which says nothing about what these tests check. Errors above still raise.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
