"""Process-group setup for multi-process training (``torchrun``) and data sharding."""
from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1"), or CUDA when available, else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_from_env(device: str | None = None) -> DistContext:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK);
    a single process when WORLD_SIZE is unset or 1. NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device)
    if world_size <= 1:
        return DistContext(0, 1, chosen)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        atexit.register(shutdown)
    return DistContext(rank, world_size, chosen)


def shutdown() -> None:
    """Leave the process group (no-op for a single process).

    gloo's worker threads release the tensors of finished collectives, and releasing a tensor
    that Python created (all_gather_object's) takes the GIL. Destroying the group joins those
    threads with the GIL held, so one of them caught mid-release deadlocks the exit (seen in the
    two-process test). The barrier waits with the GIL released, letting them finish first.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def context_of_group(device: torch.device) -> DistContext:
    """The context of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device)
    return DistContext(0, 1, device)


class EpochShardSampler(Sampler[int]):
    """The training order: a permutation of the data set that is a function of (seed, epoch)
    only, cut to a multiple of ``world_size`` and dealt round-robin, rank ``rank`` taking
    every ``world_size``-th index. ``set_epoch(epoch, start)`` skips this rank's first
    ``start`` indices (resuming inside an epoch)."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        usable = self.size - self.size % self.world_size
        return order[:usable][self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard(self.epoch)[self.start:])

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start)


class ShardSampler(Sampler[int]):
    """Evaluation order: indices ``rank, rank + world_size, ...`` — every sample exactly once
    over all ranks (no padding, so reduced metrics count each sample once)."""

    def __init__(self, size: int, *, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
