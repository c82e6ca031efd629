"""One epoch of training, step by step, without the host waiting for the device between sync points.

    state = TrainState()                              # step, epoch, batch, best top-1, skipped steps
    meter = Meter()                                   # loss, images, data wait since the last log line
    finished = train_one_epoch(run, state, meter)     # False: run.max_steps (or the end) came mid-epoch

Between two sync points the loop reads no tensor on the host and runs no collective but the
engine's own gradient reduction: each micro-batch's loss, and whether it was finite, stay on the
device. A non-finite loss on any rank turns every gradient into NaN (`poisoned`), so after the
all-reduce every rank's optimizer skips the update on the device (SkippingSGD, the way GradScaler
skips a step). With `optim.skip_nonfinite_steps > 0` the step's BN statistics are put back on the
device too.

A sync point is a log point (`run.log_every`), a checkpoint (`run.checkpoint_every`), a stop check
(`run.stop_check_every`), the last step, or the end of an epoch. There the loop reads what the
device holds (one host read, and one small all-reduce when there are several ranks: which steps
had a non-finite loss on some rank, and whether any rank was asked to stop), then counts the
skipped steps — or stops the run, *before* any checkpoint of this sync point is written, so the
last checkpoint is always one written before the bad step — logs, checkpoints, and stops on request.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config
from ..models import layer_names
from .engines import CheckpointWriteFailed, Engine
from .checkpoint import CheckpointManager, rng_states
from .distributed import DistContext
from .optim import learning_rate
from .projection import Projector
from .run_log import RunLog


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """A stop was requested (SLURM's preemption or time-limit signal): a checkpoint of the current
    step was written, and running the same config again continues from it."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"stopped on request at step {step}; checkpoint: {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


@dataclass
class TrainState:
    """Where the run is: what a checkpoint must hold, besides weights, optimizer and RNG, to go on."""

    step: int = 0  # optimizer steps taken in the whole run
    epoch: int = 0
    batch: int = 0  # the next micro-batch of `epoch`
    best_top1: float = -1.0
    skipped: int = 0  # steps whose update was skipped for a non-finite loss (optim.skip_nonfinite_steps)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "best_top1": self.best_top1,
                "skipped_nonfinite": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.best_top1, self.skipped = state["best_top1"], state.get("skipped_nonfinite", 0)


@dataclass
class Meter:
    """The log window on the host: summed from each sync point's read, reset at each log line."""

    loss_sum: float = 0.0  # Σ loss × images over micro-batches with a finite loss (this rank)
    count: int = 0  # images behind loss_sum
    images: int = 0  # every image trained on (this rank)
    wait: float = 0.0  # seconds waiting for the data loader
    start: float = field(default_factory=time.perf_counter)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)


@dataclass
class Run:
    """What every epoch needs, built once by the trainer's set-up."""

    cfg: Config
    dist_ctx: DistContext
    engine: Engine
    model: nn.Module  # the unwrapped module (its BN buffers, its state_dict)
    loaders: Any  # data.Loaders: .train.epoch(e, start_batch) yields device-ready (images, labels)
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    log: RunLog
    checkpoints: CheckpointManager
    ranks: dict[str, int]
    projector: Projector | None
    stop: threading.Event | None
    progress: Any  # tqdm
    last_step: int = 0  # set by the resume: run.max_steps or the end of the schedule
    total_steps: int = 0  # the end of the schedule
    plan: Any = None  # speed.execution.ExecutionPlan the factorized layers run under (None: none factorized)

    @property
    def micro_batches(self) -> int:
        return len(self.loaders.train)

    @property
    def steps_per_epoch(self) -> int:  # the last optimizer step of an epoch may have fewer micro-batches
        return math.ceil(self.micro_batches / self.cfg.optim.accumulate)


class _Pending:
    """What the device holds since the last sync point: each micro-batch's loss (0-dim tensors,
    never read until the sync point) and, per optimizer step, whether one of its losses was not
    finite on this rank, with the host's bookkeeping (step, epoch, first micro-batch)."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []
        self.bad: list[torch.Tensor] = []
        self.steps: list[tuple[int, int, int, int]] = []  # (step, epoch, first batch, index of its first loss)


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """`loss` × (1 if finite, NaN if not). Equal to `loss` bit for bit when finite; when not, every
    gradient becomes NaN, so the gradient all-reduce carries the news to every rank and each
    rank's optimizer skips the update — no extra collective, no host read. (An inf loss could
    otherwise still give finite gradients: softmax is bounded.)"""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)


def sync(run: Run, state: TrainState, pending: _Pending, meter: Meter, check_stop: bool = True) -> bool:
    """Read what the device holds since the last sync point: one host read, and one all-reduce
    of [stop requested, a non-finite loss in step i…] when there are several ranks. Count the
    skipped steps, or raise TrainingError at the first one over optim.skip_nonfinite_steps; fold
    the losses into `meter`. Returns whether a stop was requested on any rank (if `check_stop`)."""
    if not pending.steps:
        return False
    device = run.engine.device
    asked = check_stop and run.stop is not None and run.stop.is_set()
    flags = torch.cat([torch.full((1,), float(asked), device=device), torch.stack(pending.bad).float()])
    run.dist_ctx.all_reduce_sum(flags)
    values = torch.cat([flags.double(), torch.stack(pending.losses).double()]).tolist()  # the one host read
    stop, bad, losses = values[0] > 0, values[1:len(pending.steps) + 1], values[len(pending.steps) + 1:]
    for loss, size in zip(losses, pending.sizes):
        if math.isfinite(loss):
            meter.loss_sum, meter.count = meter.loss_sum + loss * size, meter.count + size
    limit = run.cfg.optim.skip_nonfinite_steps
    for (step, epoch, first_batch, first), anywhere in zip(pending.steps, bad):
        if not anywhere:
            continue
        end = next((s[3] for s in pending.steps if s[3] > first), len(losses))
        own = [(first_batch + i, v) for i, v in enumerate(losses[first:end]) if not math.isfinite(v)]
        batch, value = own[0] if own else (first_batch, "non-finite")  # another rank's loss
        if state.skipped >= limit:
            run.progress.close()
            hint = (f" (already skipped {state.skipped}, the optim.skip_nonfinite_steps limit)" if state.skipped else
                    "; optim.skip_nonfinite_steps N would skip up to N such steps")
            raise TrainingError(
                f"the loss became {value} in step {step} (epoch {epoch}, batch {batch}) on some rank; last good"
                f" checkpoint: {run.checkpoints.latest() or 'none yet'}. Lower optim.lr or add warm-up{hint}"
            )
        state.skipped += 1
        run.log.print(f"step {step}: non-finite loss on some rank, update skipped ({state.skipped} of at most {limit},"
                      " optim.skip_nonfinite_steps)")
    pending.__init__()
    return stop


def save_checkpoint(run: Run, state: TrainState, is_best: bool = False) -> Path | None:
    """Every rank takes part: the engine writes (its shards, then rank 0's step file) a model with
    the ranks' mean BN statistics, and beside it each rank's own (`rank_buffers`, several ranks), which a
    resume by as many ranks restores; the live statistics are left as they were, so saving never
    changes the run. A write that fails (a full disk) stops every rank together."""
    own = run.dist_ctx.gather_buffers(run.model)
    try:
        with run.dist_ctx.buffers_averaged(run.model):
            payload = {"model": run.model.state_dict(), **state.state_dict(), "rng": rng_states(),
                       "config": run.cfg.resolved(), "ranks": run.ranks, "world_size": run.dist_ctx.world_size,
                       "num_classes": run.cfg.model.num_classes or len(run.loaders.classes)}
            if own is not None:
                payload["rank_buffers"] = own
            return run.engine.save(run.checkpoints, payload, state.step, run.dist_ctx, is_best)
    except CheckpointWriteFailed as failed:
        raise TrainingError(
            f"could not write the checkpoint of step {state.step} to {run.checkpoints.folder}: {failed}; the last"
            f" complete checkpoint, {run.checkpoints.latest() or 'none yet'}, is kept: make room and run the same"
            " command to resume"
        ) from None


def project(run: Run, step: int) -> None:
    """Projected mode: every kernel back onto rank K; rank 0's result everywhere (eigensolvers may
    differ by an ulp between ranks)."""
    residuals = run.projector.project()
    run.dist_ctx.broadcast_parameters(run.model)
    names = layer_names(run.model)  # tags by the paper's layer names: projection/residual/conv4_2
    run.log.scalars(step, {f"projection/residual/{names[name]}": r for name, r in residuals.items()})


def log_window(run: Run, state: TrainState, meter: Meter) -> None:
    elapsed = time.perf_counter() - meter.start
    run.log.scalars(state.step, {
        "train/loss": meter.loss,
        "train/lr": run.engine.lr,
        "train/images_per_s": meter.images * run.dist_ctx.world_size / elapsed,
        "train/data_wait_fraction": meter.wait / elapsed,
        "data/skipped_images": run.loaders.train.replaced.count,  # data.on_bad_image: skip (this rank's)
        "train/skipped_nonfinite": state.skipped,  # optim.skip_nonfinite_steps: steps whose update was skipped
    } | ({"comm/bytes_per_step": comm.bytes_last_step}  # gradient bytes all-reduced by the last step (comm.py)
         if (comm := getattr(run.engine, "comm", None)) is not None else {}))
    run.progress.set_postfix(loss=f"{meter.loss:.3f}")
    meter.__init__()


def train_one_epoch(run: Run, state: TrainState, meter: Meter) -> bool:
    """Train epoch `state.epoch` from micro-batch `state.batch` until it ends or step `run.last_step`.
    Returns whether the epoch was finished. Raises TrainingError (non-finite loss over the limit,
    a checkpoint that cannot be written) or Preempted (a stop request, after checkpointing)."""
    cfg, engine, run_cfg = run.cfg, run.engine, run.cfg.run
    accumulate, keep_bn = cfg.optim.accumulate, cfg.optim.skip_nonfinite_steps > 0
    buffers = list(run.model.buffers()) if keep_bn else []
    kept = [b.clone() for b in buffers]  # BN statistics before the step, put back if it is skipped
    pending = _Pending()
    run.model.train()
    batches = iter(run.loaders.train.epoch(state.epoch, state.batch))
    while state.step < run.last_step:
        waited = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        meter.wait += time.perf_counter() - waited
        group_start = state.batch // accumulate * accumulate
        group_size = min(accumulate, run.micro_batches - group_start)
        boundary = state.batch + 1 - group_start == group_size
        if state.batch == group_start:  # the first micro-batch of an optimizer step
            pending.steps.append((state.step + 1, state.epoch, state.batch, len(pending.losses)))
            pending.bad.append(torch.zeros((), dtype=torch.bool, device=engine.device))
            for copy, buffer in zip(kept, buffers):
                copy.copy_(buffer)
        with engine.micro_batch(boundary):
            with engine.autocast:
                loss = run.loss_fn(engine.forward(images), labels)
            engine.backward(poisoned(loss) / group_size)
        loss = loss.detach()
        pending.losses.append(loss)
        pending.sizes.append(images.shape[0])
        pending.bad[-1] = pending.bad[-1] | ~torch.isfinite(loss)
        meter.images += images.shape[0]
        state.batch += 1
        if not boundary:
            continue  # accumulate more micro-batches
        engine.set_lr(learning_rate(cfg.optim, engine.peak_lr, run.steps_per_epoch, state.epoch, group_start // accumulate))
        skipped = engine.step() > 0  # on the device: no update on any rank if a gradient was not finite
        for copy, buffer in zip(kept, buffers):  # …and, if so, this step's BN statistics undone
            buffer.copy_(torch.where(skipped, copy, buffer))
        state.step += 1
        run.progress.update()
        if run.projector is not None and state.step % cfg.model.lowrank.project_every == 0:
            project(run, state.step)
        log_due = state.step % run_cfg.log_every == 0 or state.step == run.last_step
        save_due = run_cfg.checkpoint_every and state.step % run_cfg.checkpoint_every == 0
        stop_due = run.stop is not None and state.step % run_cfg.stop_check_every == 0
        if not (log_due or save_due or stop_due):
            continue
        stop = sync(run, state, pending, meter)  # may raise: before any checkpoint of a bad step
        if log_due:
            log_window(run, state, meter)
        if save_due or stop:
            path = save_checkpoint(run, state)
        if stop:
            run.progress.close()
            run.log.print(f"stop requested: saved step {state.step} to {path}; run the same config again to continue")
            run.log.close()
            raise Preempted(path, state.step)
    sync(run, state, pending, meter, check_stop=False)  # the epoch's end: nothing unread before evaluating or saving
    return state.batch >= run.micro_batches
