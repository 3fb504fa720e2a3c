"""The training loop: optimizer, poly schedule, AMP, clipping, evaluation, checkpoints, DDP.

:class:`Trainer` trains a :class:`~kdops.train.distiller.Distiller` (a plain model when it
has no recipe) for ``config.steps`` iterations. What it guarantees:

* the data order is a function of (seed, epoch) only (:class:`EpochShardSampler`), so a run
  is reproducible from its seed on a given machine;
* checkpoints are written atomically (a temporary file, fsync, ``os.replace``) and hold the
  student, the loss modules' adapters, every optimizer and schedule, the AMP scaler, the
  step, the per-process RNG states and the loss history: a run resumed from one reaches the
  same result as the uninterrupted run;
* under ``torchrun`` the student (with its adapters) is wrapped in DistributedDataParallel
  (gloo on CPU, NCCL on GPU), each process reads its shard of every batch, logged losses are
  averaged and metrics summed over processes;
* on CUDA: autocast (bfloat16 where supported, else float16 with a gradient scaler),
  channels_last, and SyncBatchNorm in the student when there are several processes; on
  CPU these are no-ops;
* Ctrl-C (SIGINT) never cuts a step in half: the step in flight finishes, a checkpoint is
  written and :class:`TrainingInterrupted` says where (a second Ctrl-C stops at once);
* progress: a tqdm bar when stderr is a terminal, else one line every ``log_every`` steps
  (step, losses, images/s, ETA), as log files and ``torchrun`` want.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from kdops.train.distiller import Distiller
from kdops.train.distributed import DistContext, EpochShardSampler, ShardSampler
from kdops.train.metrics import ConfusionMatrix

CHECKPOINT_FORMAT = "kdops-checkpoint/1"


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (per-process batch size; ``steps`` optimizer steps)."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9
    clip_grad: float | None = 10.0
    amp: bool = True
    channels_last: bool = True
    sync_bn: bool = True
    eval_every: int = 0
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    desc: str = "train"

    def identity(self) -> dict:
        """The fields that decide the trained weights (not logging, checkpointing, loading
        or evaluation): what a cache of finished runs is keyed by."""
        cosmetic = {"eval_every", "eval_batch_size", "checkpoint_every", "log_every", "num_workers", "progress",
                    "desc"}
        return {k: v for k, v in asdict(self).items() if k not in cosmetic}

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after step ``step`` of ``steps``; the full training state is
    in ``checkpoint`` (None for a trainer without a run folder), so ``fit(resume=True)``
    continues to the result of the uninterrupted run. A ``KeyboardInterrupt``: code that
    handles Ctrl-C handles it."""

    def __init__(self, step: int, steps: int, checkpoint: str | None):
        super().__init__(f"interrupted after step {step}/{steps}" + (f"; checkpoint: {checkpoint}" if checkpoint else ""))
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


@contextmanager
def deferred_interrupt():
    """While inside, the first SIGINT only sets the returned flag (``flag[0]``); a second one
    raises ``KeyboardInterrupt`` as usual. Signal handlers can only be set from the main
    thread: elsewhere this is a no-op and the flag stays False."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def format_duration(seconds: float) -> str:
    """``95`` -> "1m35s", ``3725`` -> "1h02m05s", ``7.2`` -> "7s"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def poly_factor(step: int, total: int, power: float) -> float:
    """Poly learning-rate factor (1 − step/total)^power."""
    return max(0.0, 1.0 - step / total) ** power


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: a
    reader sees the old file or the new one, never a partial write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Trainer:
    """Trains ``distiller`` on ``train_set``, evaluates its student on ``val_set``.

    ``run_dir`` receives ``checkpoint.pt`` (written every ``config.checkpoint_every`` steps
    and at the end); with ``resume=True`` an existing one is loaded and training continues
    from its step. ``meta`` is stored in the checkpoint (model names, data set, ...).
    """

    def __init__(self, distiller: Distiller, train_set: Dataset, val_set: Dataset | None, config: TrainConfig,
                 *, run_dir: str | None = None, ctx: DistContext | None = None, meta: dict | None = None):
        self.config = config
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.run_dir = run_dir
        self.meta = dict(meta or {})
        self.train_set, self.val_set = train_set, val_set
        cuda = self.device.type == "cuda"
        self.memory_format = torch.channels_last if cuda and config.channels_last else torch.contiguous_format

        if self.ctx.distributed and cuda and config.sync_bn:
            # Per-GPU batches of segmentation training are small: normalise over all of them.
            distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
        self.distiller = distiller.to(self.device, memory_format=self.memory_format)
        self.optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = self._poly(self.optimizer)
        self.own_params = distiller.own_parameters()
        self.own_optimizers, self.own_schedulers = {}, {}
        for term in distiller.terms:
            if term.own_optimizer is not None:
                opt = term.own_optimizer.make(self.own_params[term.name])
                self.own_optimizers[term.name] = opt
                self.own_schedulers[term.name] = self._poly(opt)

        self.amp_dtype = None
        if cuda and config.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.model: nn.Module = distiller
        if self.ctx.distributed:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, distiller.ignored_names())
            # A term that switches on late leaves its adapters without gradients until then.
            delayed = any(t.start > 0 and any(True for _ in module.parameters())
                          for t, module in zip(distiller.terms, distiller.losses.values()))
            self.model = DistributedDataParallel(
                distiller, device_ids=[self.device.index] if cuda else None, find_unused_parameters=delayed
            )

        if len(train_set) < self.ctx.world_size * config.batch_size:
            raise ValueError(f"the training set has {len(train_set)} samples, fewer than one batch "
                             f"({config.batch_size} x {self.ctx.world_size} processes)")
        self.sampler = EpochShardSampler(len(train_set), seed=config.seed, rank=self.ctx.rank,
                                         world_size=self.ctx.world_size)
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        self.step = 0
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.train_seconds = 0.0

    def _poly(self, optimizer):
        total, power = self.config.steps, self.config.power
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_factor(s, total, power))

    @property
    def checkpoint_path(self) -> str | None:
        return os.path.join(self.run_dir, "checkpoint.pt") if self.run_dir else None

    # -- data ----------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        """This process's batches of ``epoch``, from batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch * self.config.batch_size)
        return DataLoader(self.train_set, batch_size=self.config.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.config.seed * 7919 + epoch))

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the training device, images in the training memory format."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True).long()

    def autocast(self):
        """The run's autocast context (a no-op on CPU or with AMP off)."""
        return torch.autocast("cuda", dtype=self.amp_dtype, enabled=self.amp_dtype is not None) \
            if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    # -- one step ------------------------------------------------------------------------
    def _reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.ctx.distributed:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.ctx.world_size
        return values

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimizer step at ``self.step``; returns the process-averaged losses."""
        self.model.train()
        images, labels = self.to_device(images, labels)
        with self.autocast():
            out = self.model(images, labels, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.total).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for name, loss in out.own.items():
            # An own loss trains parameters DDP ignores: average their gradients by hand.
            optimizer = self.own_optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.ctx.distributed:
                for p in self.own_params[name]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= self.ctx.world_size
            optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        for scheduler in self.own_schedulers.values():
            scheduler.step()

        names = ["total", *out.terms, *(f"own/{n}" for n in out.own)]
        values = torch.stack([out.total.detach().float(), *(v.detach().float() for v in out.terms.values()),
                              *(v.detach().float() for v in out.own.values())])
        values = self._reduce_mean(values).tolist()
        record = {"step": self.step, "lr": lr, **dict(zip(names, values))}
        self.step += 1
        return record

    # -- evaluation ----------------------------------------------------------------------
    def _sync_buffers(self) -> None:
        # BatchNorm statistics drift apart between processes; evaluate rank 0's everywhere.
        if self.ctx.distributed:
            for buffer in self.distiller.student.buffers():
                dist.broadcast(buffer, 0)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """mIoU, pixel accuracy, per-class IoU of the student on the validation set (summed
        over processes)."""
        if self.val_set is None:
            return {}
        self._sync_buffers()
        student = self.distiller.student
        was_training = student.training
        student.eval()
        matrix = ConfusionMatrix(self.distiller.num_classes, ignore_index=self.distiller.ignore_index)
        loader = DataLoader(self.val_set, batch_size=self.config.eval_batch_size,
                            sampler=ShardSampler(len(self.val_set), rank=self.ctx.rank, world_size=self.ctx.world_size),
                            num_workers=self.config.num_workers)
        for images, labels in loader:
            images, labels = self.to_device(images, labels)
            with self.autocast():
                logits = self.distiller.student_forward(images, labels)["logits"]
            logits = F.interpolate(logits.float(), labels.shape[-2:], mode="bilinear", align_corners=False)
            matrix.update(logits, labels)
        if self.ctx.distributed:
            matrix.reduce_()
        student.train(was_training)
        result = matrix.compute()
        result["step"] = self.step
        return result

    # -- checkpoints ---------------------------------------------------------------------
    def _gather(self, obj) -> list:
        if not self.ctx.distributed:
            return [obj]
        gathered = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def save_checkpoint(self, path: str | None = None) -> None:
        """Write the full training state atomically (rank 0 writes; every rank must call)."""
        path = path or self.checkpoint_path
        rng = self._gather(_rng_state(self.device))
        if not self.ctx.is_main or path is None:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.distiller.student.state_dict(),
            "losses": self.distiller.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "own_optimizers": {n: o.state_dict() for n, o in self.own_optimizers.items()},
            "own_schedulers": {n: s.state_dict() for n, s in self.own_schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "rng": rng,
            "history": self.history,
            "evaluations": self.evaluations,
            "train_seconds": self.train_seconds,
            "config": asdict(self.config),
            "meta": self.meta,
        }
        atomic_save(state, path)

    def load_checkpoint(self, path: str | None = None) -> None:
        path = path or self.checkpoint_path
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a kdops training checkpoint")
        if len(state["rng"]) != self.ctx.world_size:
            raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume it with as many "
                             f"(this run has {self.ctx.world_size})")
        self.distiller.student.load_state_dict(state["model"])
        self.distiller.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name, opt in self.own_optimizers.items():
            opt.load_state_dict(state["own_optimizers"][name])
            self.own_schedulers[name].load_state_dict(state["own_schedulers"][name])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        self.train_seconds = float(state["train_seconds"])
        rng = state["rng"][self.ctx.rank]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = rng["cuda"].cpu()
        _set_rng_state(rng, self.device)

    # -- the loop ------------------------------------------------------------------------
    def _stop_requested(self, flag: list) -> bool:
        """Whether any process got Ctrl-C: every process must stop after the same step, or
        the others would wait forever in the next step's collectives."""
        stop = bool(flag[0])
        if self.ctx.distributed:
            votes = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(votes, op=dist.ReduceOp.MAX)
            stop = bool(votes.item())
        return stop

    def _log_line(self, record: dict, seconds_per_step: float) -> None:
        losses = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "lr", "images_per_s"))
        eta = format_duration(seconds_per_step * (self.config.steps - self.step))
        print(f"{self.config.desc}: step {self.step}/{self.config.steps}  {losses}  "
              f"{record['images_per_s']:.1f} img/s  ETA {eta}", file=sys.stderr, flush=True)

    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> dict:
        """Train to ``config.steps`` (or stop after step ``stop_at``, as an interruption
        would), evaluating every ``eval_every`` steps and at the end; returns the last
        evaluation (empty when stopped early or without a validation set).

        Ctrl-C lets the current step finish, writes a checkpoint and raises
        :class:`TrainingInterrupted`."""
        path = self.checkpoint_path
        if resume and path and os.path.isfile(path):
            self.load_checkpoint(path)
        config = self.config
        end = config.steps if stop_at is None else min(config.steps, stop_at)
        show = config.progress and self.ctx.is_main and self.step < end
        bar = None
        if show and sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=config.steps, initial=self.step, desc=config.desc, dynamic_ncols=True, leave=True)
        images_per_step = config.batch_size * self.ctx.world_size
        session_seconds, session_steps = 0.0, 0  # for the ETA: this process's pace, not the resumed run's
        with deferred_interrupt() as interrupt:
            try:
                while self.step < end:
                    epoch, offset = divmod(self.step, self.steps_per_epoch)
                    started = time.perf_counter()
                    for images, labels in self.loader(epoch, offset):
                        record = self.train_step(images, labels)
                        finished = time.perf_counter()
                        elapsed, started = finished - started, finished  # data loading included
                        self.train_seconds += elapsed
                        session_seconds, session_steps = session_seconds + elapsed, session_steps + 1
                        record["images_per_s"] = images_per_step / elapsed
                        self.history.append(record)
                        if bar is not None:
                            bar.update(1)
                            shown = {k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "lr", "images_per_s")}
                            bar.set_postfix(shown | {"img/s": f"{record['images_per_s']:.1f}"}, refresh=False)
                        elif show and (self.step % config.log_every == 0 or self.step == end):
                            self._log_line(record, session_seconds / session_steps)
                        if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                            self.evaluations.append(self.evaluate())
                        periodic = config.checkpoint_every and self.step % config.checkpoint_every == 0
                        if self.step < config.steps and (periodic or self.step == end):
                            self.save_checkpoint()
                        if self.step < config.steps and self._stop_requested(interrupt):
                            self.save_checkpoint()
                            raise TrainingInterrupted(self.step, config.steps, path)
                        if self.step >= end:
                            break
                        started = time.perf_counter()  # evaluation and checkpoints are not training time
            finally:
                if bar is not None:
                    bar.close()
            if self.step < config.steps:
                return {}
            if not self.evaluations or self.evaluations[-1].get("step") != self.step:
                self.evaluations.append(self.evaluate())
                self.save_checkpoint()
            if self._stop_requested(interrupt):  # Ctrl-C during the final evaluation: the run is complete
                raise TrainingInterrupted(self.step, config.steps, path)
        return self.evaluations[-1] if self.evaluations else {}
