"""The two ways several processes train one model, behind one small interface, so that the trainer
never asks which one it runs.

    engine = build_engine(model, cfg, dist_ctx, device)
    with engine.micro_batch(boundary):          # forward and backward of one micro-batch
        loss = criterion(engine.forward(x), y)
        engine.backward(loss / group_size)
    if boundary: skipped = engine.step()         # optimizer step, zero the gradients, lr schedule
    # skipped: a 0-dim device tensor, 1 where a non-finite gradient made every rank keep its
    # weights and momentum (the lr schedule moves on); nobody reads it until the next sync point
    engine.save(checkpoints, payload, step, dist_ctx)    # every rank; the engine knows what is sharded

* `DDPEngine` — one process alone, or torch DistributedDataParallel (NCCL on GPUs, gloo on CPUs):
  gradients are averaged across ranks in backward; between accumulation boundaries `no_sync` skips
  that all-reduce. fp16 uses torch's GradScaler, bf16 autocast.
* `DeepSpeedEngine` — DeepSpeed with ZeRO stage 0/1/2 (optimizer state, and at stage 2 gradients,
  partitioned across ranks). Its JSON is generated from our config (`deepspeed_config`), with
  `distributed.deepspeed` merged over it for anything else. Our SGD, our lr schedule and our
  accumulation boundaries are kept, so both engines follow the same optimisation step by step.

What each rank must save is `engine.state_dict()`: the whole optimizer state for DDP (the same on
every rank, rank 0 saves it), this rank's ZeRO partition for DeepSpeed (every rank saves its own);
`engine.save` and `engine.load` do that, so the trainer never asks which.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..config import Config
from ..runtime import amp_dtype, autocast_for
from .checkpoint import CheckpointManager
from .comm import CommHook
from .distributed import DistContext
from .optim import build_optimizer, scaled_lr


ONE_BUCKET_MB = 2.0**40  # every gradient in one DDP bucket


def global_batch(cfg: Config, dist_ctx: DistContext) -> int:
    return cfg.data.batch_size * dist_ctx.world_size * cfg.optim.accumulate


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written on some rank (`error` is this rank's OSError, or None when
    another rank's write failed); every rank raises it together, the previous checkpoint intact."""

    def __init__(self, error: OSError | None):
        super().__init__(str(error) if error is not None else "it failed on another rank")
        self.error = error


class Engine:
    """What the trainer uses: `forward`, `micro_batch`, `backward`, `step`, `lr`/`set_lr`, `save`/`load`
    (and `state_dict`/`load_state_dict` under them), and the `optimizer` they drive. `peak_lr` is
    the lr of the schedule's peak at this run's global batch (optim.scaled_lr)."""

    optimizer: torch.optim.Optimizer
    peak_lr: float
    optimizer_sharded: bool  # each rank holds only its part of the optimizer state

    def set_lr(self, lr: float) -> None:
        """The lr of the next step (the trainer computes it from the run's position: optim.learning_rate)."""
        for group in self._param_groups():
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self._param_groups()[0]["lr"]

    def _param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def save(self, checkpoints: CheckpointManager, payload: dict, step: int, dist_ctx: DistContext,
             is_best: bool = False) -> Path | None:
        """Write the checkpoint of `step`: `payload` (model, counters, config: the same on every
        rank) with this engine's state. Every rank calls it. Sharded: every rank writes its part
        first, then rank 0 commits the step file; otherwise rank 0 writes it all. A write that fails
        on any rank raises CheckpointWriteFailed on every rank. Returns the step file (rank 0)."""
        error = None
        own = self.state_dict() if self.optimizer_sharded else self.own_state()
        if own is not None:  # the same on every rank: whether the engine has per-rank state
            try:
                checkpoints.save_shard({"engine": own}, step, dist_ctx.rank, dist_ctx.world_size)
            except OSError as failure:
                error = failure
            if dist_ctx.any(error is not None):  # also the barrier before rank 0 commits
                raise CheckpointWriteFailed(error)
        path = None
        if dist_ctx.is_main:
            try:
                path = checkpoints.save(dict(payload, engine=None if self.optimizer_sharded else self.state_dict()),
                                        step, is_best)
            except OSError as failure:
                error = failure
        if dist_ctx.any(error is not None):  # also the barrier: nobody runs ahead (or exits) before the checkpoint exists
            raise CheckpointWriteFailed(error)
        return path

    def load(self, checkpoints: CheckpointManager, path: Path, checkpoint: dict, dist_ctx: DistContext) -> None:
        """This rank's optimizer, schedule and scaler state from the checkpoint at `path` (already
        loaded as `checkpoint`; sharded: this rank's shard file beside it)."""
        state = checkpoint["engine"]
        if self.optimizer_sharded:
            self.load_state_dict(checkpoints.load_shard(path, dist_ctx.rank, dist_ctx.world_size, self.device)["engine"])
            return
        own = None  # PowerSGD's error feedback: this rank's, if the checkpoint was written by as many ranks
        if self.own_state() is not None and "powersgd" in state and checkpoint.get("world_size", 1) == dist_ctx.world_size:
            own = checkpoints.load_shard(path, dist_ctx.rank, dist_ctx.world_size, self.device)["engine"]
        self.load_state_dict(state, own)

    def own_state(self) -> dict | None:
        """What this rank alone holds and saves beside the step file, besides a sharded optimizer."""
        return None


class DDPEngine(Engine):
    """One process, or DistributedDataParallel across several."""

    optimizer_sharded = False  # every rank holds the whole optimizer state

    def __init__(self, model: nn.Module, cfg: Config, dist_ctx: DistContext, device: torch.device,
                 steps_per_epoch: int = 1):
        self.module = model
        self.device = device
        self.comm = None  # one process: no gradient all-reduce
        self.steps_per_epoch = steps_per_epoch
        self.autocast = autocast_for(device, amp_dtype(cfg.precision.amp))
        self.peak_lr = scaled_lr(cfg.optim, global_batch(cfg, dist_ctx))
        self.optimizer = build_optimizer(model, cfg.optim, global_batch(cfg, dist_ctx))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision.amp == "fp16")
        self._ddp = None
        if dist_ctx.distributed:
            # BN buffers are averaged across ranks before evaluating and saving (DistContext.average_buffers),
            # not broadcast from rank 0 at every forward.
            # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy in and
            # out, less memory). static_graph only with accumulate 1: under no_sync torch's reducer
            # fails an internal assert (torch 2.14). Both leave the numerics bitwise as they were
            # (tests/test_distributed.py).
            options = cfg.distributed
            # torch's PowerSGD hook starts each bucket's P and Q all-reduces from future callbacks, which
            # gloo may run in another order on each rank when there are several buckets (a collective
            # mismatch; torch tests the hook on NCCL only): on the CPU it gets one bucket.
            one_bucket = options.grad_compression == "powersgd" and device.type != "cuda"
            self._ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
                gradient_as_bucket_view=True, bucket_cap_mb=ONE_BUCKET_MB if one_bucket else options.bucket_cap_mb,
                static_graph=options.static_graph and cfg.optim.accumulate == 1,
            )
            # torch's all-reduce, bf16 or PowerSGD hook, behind a counter of the bytes it sends (comm.py)
            self.comm = CommHook.register(self._ddp, model, options, powersgd_start(cfg, steps_per_epoch))
        wrapped = self._ddp or model
        self.forward = torch.compile(wrapped) if cfg.precision.compile else wrapped

    @contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch; off the boundary DDP keeps its gradients local."""
        sync = nullcontext() if boundary or self._ddp is None else self._ddp.no_sync()
        with sync:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Optimizer step (skipped on the device if a gradient is not finite), zero the gradients.
        Returns the device flag: 1.0 if the update was skipped."""
        self.scaler.step(self.optimizer)  # fp16: unscale, and also skip an overflowing step
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.comm is not None:
            self.comm.end_step()
        return self.optimizer.skipped

    def state_dict(self) -> dict:
        shared, _ = self.comm.state_dict() if self.comm is not None else (None, None)
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()} | (
            {"powersgd": shared} if shared is not None else {})

    def own_state(self) -> dict | None:
        """PowerSGD's error feedback: this rank's own (None without PowerSGD)."""
        return self.comm.state_dict()[1] if self.comm is not None else None

    def load_state_dict(self, state: dict, own: dict | None = None) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.comm is not None and self.comm.state is not None and "powersgd" in state:
            self.comm.load_state_dict(state["powersgd"], own)


def powersgd_start(cfg: Config, steps_per_epoch: int) -> int:
    """PowerSGD's first compressed step: distributed.powersgd.start_iter, or the end of lr warm-up
    (at least 2: DDP rebuilds its buckets after the first step)."""
    options = cfg.distributed.powersgd
    if options is None:
        return 0
    if options.start_iter is not None:
        return options.start_iter
    return max(2, math.ceil(cfg.optim.warmup_epochs * steps_per_epoch))


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed's JSON from our YAML: batch sizes, ZeRO stage, precision; then the user's
    `distributed.deepspeed` section merged over it (nested dicts merged key by key)."""
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accumulate,
        "train_batch_size": cfg.data.batch_size * cfg.optim.accumulate * world_size,
        # ZeRO 1/2: reduce gradients while backward goes on, into one contiguous buffer (less fragmentation)
        "zero_optimization": {"stage": cfg.distributed.zero_stage} | (
            {"overlap_comm": True, "contiguous_gradients": True} if cfg.distributed.zero_stage > 0 else {}),
        "zero_allow_untested_optimizer": True,  # our SGD: ZeRO 1/2 only partition its state
        "bf16": {"enabled": cfg.precision.amp == "bf16"},  # its check_grad_overflow (default on) skips NaN steps
        "fp16": {"enabled": cfg.precision.amp == "fp16"},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }

    def merge(base: dict, extra: dict) -> dict:
        for key, value in extra.items():
            base[key] = merge(dict(base.get(key, {})), value) if isinstance(value, dict) else value
        return base

    return merge(generated, cfg.distributed.deepspeed)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0/1/2 with our optimizer, schedule and accumulation boundaries."""

    optimizer_sharded = True  # at ZeRO >= 1 each rank holds only its partition

    def __init__(self, model: nn.Module, cfg: Config, dist_ctx: DistContext, device: torch.device):
        import logging

        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-step INFO lines drown our progress
        self.module = model
        self.device = device
        self.autocast = nullcontext()  # DeepSpeed's bf16/fp16 modes hold the weights in that dtype
        self.input_dtype = None if cfg.precision.amp == "none" else amp_dtype(cfg.precision.amp)
        self.peak_lr = scaled_lr(cfg.optim, global_batch(cfg, dist_ctx))
        optimizer = build_optimizer(model, cfg.optim, global_batch(cfg, dist_ctx))
        self._engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, dist_ctx.world_size),
            dist_init_required=False,
        )
        self._base_optimizer = optimizer

    def forward(self, images: torch.Tensor):
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)
        outputs = self._engine(images)
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()

    @contextmanager
    def micro_batch(self, boundary: bool) -> Iterator[None]:
        # Our boundaries, not DeepSpeed's counter: the last group of an epoch may be short.
        self._engine.set_gradient_accumulation_boundary(boundary)
        yield
        if not boundary:
            self._engine.step()  # only advances DeepSpeed's micro-step counter off the boundary

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss, scale_wrt_gas=False)  # the caller divided by the group size

    def step(self) -> torch.Tensor:
        """DeepSpeed's step: at ZeRO 1/2 it checks the gradients itself (a non-finite gradient norm
        is an overflow: no update on any rank, it agrees by its own all-reduce) and calls our SGD
        only when they are finite; at ZeRO 0 our SGD gets the all-reduced gradients and skips on
        the device. Either way the flag says whether the update was skipped."""
        self._base_optimizer.skipped = None
        self._engine.step()
        skipped = self._base_optimizer.skipped
        return torch.ones((), device=self.device) if skipped is None else skipped  # None: DeepSpeed skipped it

    def _param_groups(self) -> list[dict]:
        return self._base_optimizer.param_groups  # the lr acts on the optimizer DeepSpeed wraps

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, own: dict | None = None) -> None:
        if self._engine.zero_optimization_stage() > 0:
            # ZeRO takes the list of every rank's partition and reads its own; this rank's is all we hold.
            partitions = [None] * self._engine.dp_world_size
            partitions[self._engine.global_rank] = state["optimizer"]
            self.optimizer.load_state_dict(partitions, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(state["optimizer"])


def build_engine(model: nn.Module, cfg: Config, dist_ctx: DistContext, device: torch.device, steps_per_epoch: int = 1):
    if cfg.distributed.sync_batchnorm and dist_ctx.distributed:
        if device.type != "cuda":
            raise ValueError("distributed.sync_batchnorm: torch's SyncBatchNorm runs on CUDA GPUs only; set it false on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before DDP/DeepSpeed wrap it (DeepSpeed#502)
    if cfg.distributed.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, dist_ctx, device)
    return DDPEngine(model, cfg, dist_ctx, device, steps_per_epoch)
