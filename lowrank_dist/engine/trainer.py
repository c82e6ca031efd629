"""The training loop: one model, one data set, SGD, evaluation, checkpoints, TensorBoard.

Reads top to bottom: `build_model_for` (the three low-rank modes), `fit` (set-up, resume, the
epoch loop, the end-of-run export and summary). The loop does not know how it was launched: a
DistContext says which rank it is.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import Config, ConfigError
from ..data import build_loaders
from ..layers import LowRankConv2d
from ..models import build_model, choose_ranks, decompose, lowrank_policy, model_spec
from ..report.execution import ExecutionPlan, plan_for_run
from .backends import build_engine, global_batch
from .checkpoint import (
    CheckpointError, CheckpointManager, atomic_save, load_checkpoint, restore_rng_states, rng_states,
)
from .distributed import DistContext, select_device
from .evaluate import evaluate
from .optim import scaled_lr
from .projection import Projector


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """A stop was requested (SLURM's preemption or time-limit signal): a checkpoint of the current
    step was written, and running the same config again continues from it."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"stopped on request at step {step}; checkpoint: {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


@dataclass
class ModelSetup:
    model: nn.Module
    ranks: dict[str, int] = field(default_factory=dict)  # factorised (or projected) layers → K
    projector: Projector | None = None
    decomposition_errors: dict[str, float] = field(default_factory=dict)  # decomposed mode


def _dense_state_dict(path: Path, model_name: str) -> dict:
    """A dense model's weights from one of our checkpoints or a plain state_dict file."""
    if not path.is_file():
        raise CheckpointError(f"model.lowrank.dense_checkpoint: file {str(path)!r} does not exist")
    payload = load_checkpoint(path)
    if isinstance(payload, dict) and "model" in payload and "config" in payload:
        trained = payload["config"]["model"]["name"]
        if trained != model_name:
            raise CheckpointError(
                f"model.lowrank.dense_checkpoint {str(path)!r} holds a {trained!r} model; this config builds {model_name!r}"
            )
        if payload["config"]["model"].get("lowrank"):
            raise CheckpointError(f"model.lowrank.dense_checkpoint {str(path)!r} holds a low-rank model, not a dense one")
        return payload["model"]
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise CheckpointError(f"model.lowrank.dense_checkpoint {str(path)!r} is neither our checkpoint nor a state_dict")


def loaders_for(cfg: Config, dist_ctx: DistContext, device: torch.device, train: bool = True):
    """This rank's train and val loaders as the config's data section says (train=False: val only)."""
    return build_loaders(
        cfg.data.root, backend=cfg.data.backend, dali_device=cfg.data.dali_device, batch_size=cfg.data.batch_size,
        image_size=cfg.data.image_size, val_resize=cfg.data.val_resize, workers=cfg.data.workers,
        train_list=cfg.data.train_list, val_list=cfg.data.val_list, rank=dist_ctx.rank,
        world_size=dist_ctx.world_size, seed=cfg.run.seed, device=device, channels_last=cfg.precision.channels_last,
        min_crop_scale=cfg.data.min_crop_scale, hflip=cfg.data.hflip, on_bad_image=cfg.data.on_bad_image, train=train,
    )


def build_model_for(cfg: Config, num_classes: int) -> ModelSetup:
    """The model the run trains, by mode: dense baseline, `factorized` (V and H from scratch, the
    paper), `decomposed` (exact decomposition of a trained dense model, then fine-tune) or
    `projected` (dense kernels, re-projected onto rank K every N steps)."""
    build = cfg.model.build_dict(num_classes)
    lowrank = cfg.model.lowrank
    if lowrank is None:
        return ModelSetup(build_model(build))
    if lowrank.mode == "factorized":
        model = build_model(build)
        ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankConv2d)}
        return ModelSetup(model, ranks)

    policy = lowrank_policy(model_spec(cfg.model.name), build.pop("lowrank"))
    dense = build_model(build)
    if lowrank.mode == "decomposed":
        state = _dense_state_dict(lowrank.dense_checkpoint, cfg.model.name)
        try:
            dense.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(
                f"model.lowrank.dense_checkpoint {str(lowrank.dense_checkpoint)!r} does not fit {cfg.model.name}"
                f" with {num_classes} classes: {str(error).splitlines()[0]}"
            ) from None
        model, errors = decompose(dense, policy, lowrank.factorise_first, lowrank.bn_between, inplace=True)
        return ModelSetup(model, {e.name: e.rank for e in errors}, None, {e.name: e.relative_error for e in errors})
    ranks = choose_ranks(dense, policy, lowrank.factorise_first)
    return ModelSetup(dense, ranks, Projector(dense, ranks))


class RunLog:
    """TensorBoard, a metrics.jsonl file and the console; silent except on the main rank.

    Logs are worth less than the training they describe: a write that fails (a full disk, a
    vanished network folder) is reported once, that sink is dropped and the run goes on. The
    checkpoints are what must not be lost, and a checkpoint that cannot be written stops the run."""

    def __init__(self, folder: Path, enabled: bool):
        self.enabled = enabled
        self.writer = SummaryWriter(str(folder / "tensorboard")) if enabled else None
        self.metrics = open(folder / "metrics.jsonl", "a") if enabled else None

    def drop(self, sink: str, error: OSError) -> None:
        """Stop writing `sink` ("tensorboard" or "metrics") after `error`, saying so once."""
        print(f"warning: could not write {sink} ({error}); the run goes on without it", file=sys.stderr)
        if sink == "tensorboard":
            self.writer = None
        else:
            self.metrics = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            try:
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, step)
            except OSError as error:
                self.drop("tensorboard", error)
        if self.metrics is not None:
            try:
                self.metrics.write(json.dumps({"step": step, **values}) + "\n")
                self.metrics.flush()
            except OSError as error:
                self.drop("metrics", error)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            try:
                self.writer.add_text(tag, text)
            except OSError as error:
                self.drop("tensorboard", error)

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        for sink, stream in (("tensorboard", self.writer), ("metrics", self.metrics)):
            if stream is not None:
                try:
                    stream.close()
                except OSError as error:
                    self.drop(sink, error)


@dataclass
class TrainResult:
    top1: float
    top5: float
    loss: float
    step: int
    folder: Path
    exported: Path | None = None


def _differences(a: dict, b: dict, prefix: str = "") -> tuple[str, str]:
    """The settings where two nested dicts differ, as 'key=value, ...' for each side."""
    there, here = [], []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _differences(x, y, f"{prefix}{key}.")
            there += [sub[0]] if sub[0] else []
            here += [sub[1]] if sub[1] else []
        elif x != y:
            there.append(f"{prefix}{key}={x!r}")
            here.append(f"{prefix}{key}={y!r}")
    return ", ".join(there), ", ".join(here)


def _model_identity(section):
    """The model section of a config without how its layers run (lowrank.execution): a checkpoint
    is the same model under any execution plan."""
    if not isinstance(section, dict) or not isinstance(section.get("lowrank"), dict):
        return section
    return section | {"lowrank": {k: v for k, v in section["lowrank"].items() if k != "execution"}}


def check_resumable(state: dict, path: Path, cfg: Config, dist_ctx: DistContext) -> None:
    """Refuse, with the reason, a checkpoint this run cannot continue from."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"--resume {str(path)!r} is not a checkpoint of this trainer (no config in it)")
    written_for, this = _model_identity(state["config"].get("model")), _model_identity(cfg.resolved()["model"])
    if written_for != this:
        there, here = _differences(written_for if isinstance(written_for, dict) else {}, this)
        raise CheckpointError(f"--resume {str(path)!r} was written for model {there}, not this config's {here}:"
                              " resume with the config it was written with, or give run.name another name to start anew")
    if "engine" not in state:
        raise CheckpointError(f"--resume {str(path)!r} is not a training checkpoint (no optimizer state); to start"
                              " from its weights use model.lowrank.mode 'decomposed' with dense_checkpoint")
    written_engine = state["config"].get("distributed", {}).get("engine", "ddp")
    if written_engine != cfg.distributed.engine:
        raise CheckpointError(f"--resume {str(path)!r} was written by distributed.engine {written_engine!r}; this"
                              f" config uses {cfg.distributed.engine!r} and their optimizer states differ")
    written_world = state.get("world_size", 1)
    if written_world != dist_ctx.world_size and state["batch"] != 0:
        # Mid-epoch, which samples are left depends on how the epoch was sharded. At an epoch
        # boundary nothing is left over: the next epoch is re-sharded over the new world size (the
        # global batch, and so the meaning of optim.lr, change with it).
        raise CheckpointError(
            f"--resume {str(path)!r} stopped mid-epoch with {written_world} processes; resume it with"
            f" {written_world}, or from a checkpoint written at the end of an epoch"
        )


def rebase_schedule(engine, cfg: Config, position: int, batch: int) -> float:
    """After a resume at another world size (always at an epoch boundary, see check_resumable): the
    lr schedule goes on from the same epoch, now `position` steps of the new size in, from the peak
    lr of the new global batch `batch` (the same lr unless optim.lr_scaling is 'linear').
    Returns the lr of the next step."""
    peak = scaled_lr(cfg.optim, batch)
    scheduler = engine.scheduler
    scheduler.base_lrs = [peak] * len(scheduler.base_lrs)
    scheduler.last_epoch = position
    for group, factor in zip(engine.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = peak, peak * factor(position)
    scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]
    return scheduler._last_lr[0]


def measured_speed(cfg: Config, lowrank: nn.Module, num_classes: int, device: torch.device, out_dir: Path, log: RunLog,
                   plan: ExecutionPlan | None = None):
    """The end-of-run speed report: every factorised layer timed against its dense twin (same
    shapes, fresh weights: time does not depend on their values), factorised and composed, at the
    training batch, image size and memory format, on the training device, in the run's dtype on a
    GPU and in fp32 on the CPU (CPUs have no fast bf16 convolutions: bf16 times there say nothing
    about a GPU run). The run's execution plan is the report's plan when it was made in the same
    dtype; otherwise the report picks each layer's faster form itself. Printed, and written to
    out_dir and TensorBoard."""
    from ..report.speed import speed_report

    build = cfg.model.build_dict(num_classes)
    build.pop("lowrank")
    dense = build_model(build)
    run_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.amp, torch.float32)
    dtype = run_dtype if device.type == "cuda" else torch.float32
    shape = (cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    same = plan is not None and dtype == run_dtype
    report = speed_report(dense, lowrank, shape, device, dtype, out_dir, writer=log.writer,
                          channels_last=cfg.precision.channels_last, title=f"{cfg.model.name} (run {cfg.run.name})",
                          plan=plan.executions if same else None,
                          plan_source=f"the run's plan, model.lowrank.execution {plan.mode}" if same else None)
    log.print(report.to_markdown())
    return report


def fit(cfg: Config, dist_ctx: DistContext = DistContext(), resume: Path | None = None,
        stop: threading.Event | None = None) -> TrainResult:
    """Train as configured; resume from `resume` or, if the run folder has checkpoints, from the latest.

    `stop` (set from a signal handler, e.g. SLURM's USR2 before preemption or the time limit) ends
    the run after the current optimizer step, on every rank together, with a checkpoint of that
    step: `Preempted` is raised."""
    folder = cfg.run.folder
    folder.mkdir(parents=True, exist_ok=True)
    try:
        device = select_device(cfg.run.device, dist_ctx)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.precision.amp == "fp16" and device.type != "cuda":
        raise ConfigError("precision.amp: 'fp16' needs a CUDA GPU (use 'bf16' or 'none' on the CPU)")
    torch.manual_seed(cfg.run.seed)
    log = RunLog(folder, dist_ctx.is_main)

    loaders = loaders_for(cfg, dist_ctx, device)
    if cfg.model.num_classes is not None and cfg.model.num_classes < len(loaders.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(loaders.classes)} classes of"
                          f" {cfg.data.root}; set at least {len(loaders.classes)}, or leave it out to use the data's count")
    try:
        setup = build_model_for(cfg, len(loaders.classes))
    except CheckpointError:
        raise
    except ValueError as error:  # a rank or option this model cannot take
        message = str(error)
        if not message.startswith("model"):
            key = "model.lowrank.ranks" if cfg.model.lowrank is not None and cfg.model.lowrank.ranks is not None else "model"
            message = f"{key}: {message}"
        raise ConfigError(message) from None
    if setup.projector is not None and cfg.distributed.engine == "deepspeed":
        raise ConfigError("model.lowrank.mode 'projected' needs distributed.engine 'ddp': DeepSpeed keeps its own"
                          " fp32 copy of the weights, which a projection of the model's kernels would not reach")
    model = setup.model.to(device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan = plan_for_run(cfg, model, device, dist_ctx, log)  # each factorised layer runs factorised or composed

    accumulate = cfg.optim.accumulate
    micro_batches = len(loaders.train)
    steps_per_epoch = math.ceil(micro_batches / accumulate)
    checkpoints = CheckpointManager(folder / "checkpoints", cfg.run.keep_last)
    if dist_ctx.is_main:  # no rank saves before rank 0 has joined the first step's collectives
        for stale in checkpoints.remove_temporaries():
            log.print(f"removed {stale.name}, left half-written by a process killed while saving")

    step, epoch, start_batch, best_top1, skipped = 0, 0, 0, -1.0, 0
    resume = resume or checkpoints.latest()
    state = None
    if resume is not None:
        state = load_checkpoint(Path(resume), map_location=device)
        check_resumable(state, Path(resume), cfg, dist_ctx)
        model.load_state_dict(state["model"])  # before the engine: DeepSpeed copies the weights it starts from
    try:
        engine = build_engine(model, cfg, dist_ctx, device, steps_per_epoch)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = engine.module  # SyncBatchNorm conversion may have replaced BN layers
    batch = global_batch(cfg, dist_ctx)
    log.print(f"{dist_ctx.world_size} process(es) × batch {cfg.data.batch_size} × accumulate {cfg.optim.accumulate}"
              f" = global batch {batch}; peak lr {scaled_lr(cfg.optim, batch):g}"
              + (f" (lr {cfg.optim.lr:g} × {batch}/{cfg.optim.lr_batch}, linear scaling)"
                 if cfg.optim.lr_scaling == "linear" else ""))
    if state is not None:
        engine_state = state["engine"]
        if engine.optimizer_sharded:
            engine_state = checkpoints.load_shard(Path(resume), dist_ctx.rank, dist_ctx.world_size, device)["engine"]
        engine.load_state_dict(engine_state)
        step, epoch, start_batch, best_top1 = state["step"], state["epoch"], state["batch"], state["best_top1"]
        skipped = state.get("skipped_nonfinite", 0)
        restore_rng_states(state["rng"])
        log.print(f"resumed from {resume}: step {step}, epoch {epoch}, batch {start_batch}")
        if state.get("world_size", 1) != dist_ctx.world_size:  # at an epoch boundary (check_resumable)
            lr = rebase_schedule(engine, cfg, epoch * steps_per_epoch, batch)
            log.print(f"written by {state.get('world_size', 1)} process(es), resumed by {dist_ctx.world_size}: from epoch"
                      f" {epoch + 1} on each epoch is sharded over {dist_ctx.world_size} in {steps_per_epoch} steps of"
                      f" global batch {batch}; the schedule goes on at lr {lr:g}")
        if epoch >= cfg.optim.epochs:
            log.print(f"the run is complete ({cfg.optim.epochs} epochs): evaluating its final weights only")
    else:
        log.text("config", "```yaml\n" + yaml.safe_dump(cfg.resolved(), sort_keys=False) + "```")
        if dist_ctx.is_main:
            (folder / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        log.scalars(0, {f"ranks/{name}": rank for name, rank in setup.ranks.items()})
        log.scalars(0, {f"decomposition/relative_error/{n}": e for n, e in setup.decomposition_errors.items()})

    def save(is_best: bool = False) -> Path | None:
        """Every rank takes part: BN statistics are averaged, ZeRO shards written, then rank 0 commits.
        A write that fails (a full disk) stops every rank together, the previous checkpoint intact."""
        dist_ctx.average_buffers(model)
        path, error = None, None
        if engine.optimizer_sharded:
            try:
                checkpoints.save_shard({"engine": engine.state_dict()}, step, dist_ctx.rank, dist_ctx.world_size)
            except OSError as failure:
                error = failure
            if dist_ctx.any(error is not None):  # also the barrier before rank 0 commits
                raise write_failed(error)
        if dist_ctx.is_main:
            payload = {
                "model": model.state_dict(), "engine": None if engine.optimizer_sharded else engine.state_dict(),
                "step": step, "epoch": epoch, "batch": batch_index, "best_top1": best_top1, "rng": rng_states(),
                "config": cfg.resolved(), "ranks": setup.ranks, "world_size": dist_ctx.world_size,
                "skipped_nonfinite": skipped,
            }
            try:
                path = checkpoints.save(payload, step, is_best)
            except OSError as failure:
                error = failure
        if dist_ctx.any(error is not None):  # also the barrier: nobody runs ahead (or exits) before the checkpoint exists
            raise write_failed(error)
        return path

    def write_failed(error: OSError | None) -> TrainingError:
        why = str(error) if error is not None else "it failed on another rank"
        return TrainingError(
            f"could not write the checkpoint of step {step} to {checkpoints.folder}: {why}; the last complete"
            f" checkpoint, {checkpoints.latest() or 'none yet'}, is kept: make room and run the same command to resume"
        )

    def validate() -> dict[str, float]:
        dist_ctx.average_buffers(model)  # every rank evaluates the same BN statistics
        return evaluate(model, loaders.val, dist_ctx, autocast, engine.forward)

    def project(tag_step: int) -> None:
        residuals = setup.projector.project()
        dist_ctx.broadcast_parameters(model)  # rank 0's projection everywhere: eigensolvers may differ by an ulp
        log.scalars(tag_step, {f"projection/residual/{name}": r for name, r in residuals.items()})

    autocast = engine.autocast
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    # Steps are counted over the whole run; a resume at another world size changes the steps per
    # epoch, so the steps taken before it are an offset to the schedule (0 otherwise).
    offset = step - (epoch * steps_per_epoch + math.ceil(start_batch / accumulate))
    total_steps = offset + cfg.optim.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.run.max_steps or total_steps)
    metrics: dict[str, float] = {}
    batch_index = start_batch
    poisoned = False  # a micro-batch of the current step had a non-finite loss on some rank
    progress = tqdm(total=last_step, initial=step, desc=cfg.run.name, disable=not (dist_ctx.is_main and sys.stderr.isatty()))
    window = {"loss": 0.0, "count": 0, "images": 0, "wait": 0.0, "start": time.perf_counter()}

    while epoch < cfg.optim.epochs and step < last_step:
        model.train()
        batches = iter(loaders.train.epoch(epoch, start_batch))
        batch_index = start_batch
        while step < last_step:
            waited = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - waited
            group_start = batch_index // accumulate * accumulate
            group_size = min(accumulate, micro_batches - group_start)
            boundary = batch_index + 1 - group_start == group_size
            window["images"] += images.shape[0]
            if cfg.optim.skip_nonfinite_steps and batch_index == group_start:
                kept = [b.clone() for b in model.buffers()]  # BN statistics before the step, in case it is skipped
            if not poisoned:  # the rest of a step whose update is skipped is not computed
                with engine.micro_batch(boundary):
                    with autocast:
                        outputs = engine.forward(images)
                        if isinstance(outputs, tuple):  # GoogLeNet's auxiliary heads weigh 0.3 each
                            loss = criterion(outputs[0], labels) + 0.3 * sum(criterion(aux, labels) for aux in outputs[1:])
                        else:
                            loss = criterion(outputs, labels)
                    # every rank decides together, so none waits for the others in a collective
                    poisoned = dist_ctx.any(not torch.isfinite(loss))
                    if poisoned and skipped >= cfg.optim.skip_nonfinite_steps:
                        limit = (f" (already skipped {skipped}, the optim.skip_nonfinite_steps limit)" if skipped else
                                 "; optim.skip_nonfinite_steps N would skip up to N such steps")
                        raise TrainingError(
                            f"the loss became {loss.item()} in step {step + 1} (epoch {epoch}, batch {batch_index}) on"
                            f" some rank; last good checkpoint: {checkpoints.latest() or 'none yet'}. Lower optim.lr or"
                            f" add warm-up{limit}"
                        )
                    if poisoned:  # no backward on any rank; the step's BN statistics are undone
                        for buffer, value in zip(model.buffers(), kept):
                            buffer.copy_(value)
                    else:
                        engine.backward(loss / group_size)
                        window["loss"] += loss.item() * images.shape[0]
                        window["count"] += images.shape[0]
            batch_index += 1
            if not boundary:
                continue  # accumulate more micro-batches
            if poisoned:  # this step's gradients are dropped; the lr schedule moves on as after any step
                engine.skip_step()
                skipped, poisoned = skipped + 1, False
                log.print(f"step {step + 1}: non-finite loss on some rank, update skipped ({skipped} of at most"
                          f" {cfg.optim.skip_nonfinite_steps}, optim.skip_nonfinite_steps)")
            else:
                engine.step()
            step += 1
            progress.update()
            if setup.projector is not None and step % cfg.model.lowrank.project_every == 0:
                project(step)
            if step % cfg.run.log_every == 0 or step == last_step:
                elapsed = time.perf_counter() - window["start"]
                log.scalars(step, {
                    "train/loss": window["loss"] / max(1, window["count"]),
                    "train/lr": engine.lr,
                    "train/images_per_s": window["images"] * dist_ctx.world_size / elapsed,
                    "train/data_wait_fraction": window["wait"] / elapsed,
                    "data/skipped_images": loaders.train.skipped.count,  # data.on_bad_image: skip (this rank's)
                    "train/skipped_nonfinite": skipped,  # optim.skip_nonfinite_steps: steps whose update was skipped
                })
                progress.set_postfix(loss=f"{window['loss'] / max(1, window['count']):.3f}")
                window = {"loss": 0.0, "count": 0, "images": 0, "wait": 0.0, "start": time.perf_counter()}
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0:
                save()
            if stop is not None and dist_ctx.any(stop.is_set()):
                progress.close()
                path = save()
                log.print(f"stop requested: saved step {step} to {path}; run the same config again to continue")
                log.close()
                raise Preempted(path, step)
        if batch_index < micro_batches:  # stopped early (max_steps): keep where we are
            break
        epoch, start_batch, batch_index = epoch + 1, 0, 0
        if epoch % cfg.run.eval_every == 0 or epoch == cfg.optim.epochs:
            metrics = validate()
            log.scalars(step, {f"val/{k}": metrics[k] for k in ("top1", "top5", "loss")})
            log.print(f"epoch {epoch}: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}")
            is_best = metrics["top1"] > best_top1
            best_top1 = max(best_top1, metrics["top1"])
            save(is_best)
        else:
            save()
    progress.close()

    exported = None
    stopped_mid_epoch = batch_index > 0
    if setup.projector is not None:
        project(step)  # the final weights are exactly rank K
    if not metrics or stopped_mid_epoch or setup.projector is not None:
        # the last evaluation (if any) does not describe the final weights
        metrics = validate()
        log.scalars(step, {f"val/{k}": metrics[k] for k in ("top1", "top5", "loss")})
        is_best = metrics["top1"] > best_top1
        best_top1 = max(best_top1, metrics["top1"])
        save(is_best)
    lowrank = model
    if setup.projector is not None and dist_ctx.is_main:
        exported = folder / "exported_lowrank.pt"
        lowrank = setup.projector.export(model)
        atomic_save({"model": lowrank.state_dict(), "ranks": setup.ranks, "factorised": True, "config": cfg.resolved()},
                    exported)
    speed = None
    finished = step >= total_steps  # a run cut short by run.max_steps is a test or a debug session
    if setup.ranks and cfg.run.speed_report and dist_ctx.is_main and finished:
        try:
            speed = measured_speed(cfg, lowrank, len(loaders.classes), device, folder / "speed", log, plan)
        except OSError as error:  # the weights are safe by now; a report that cannot be written is not fatal
            print(f"warning: could not write the speed report to {folder / 'speed'} ({error})", file=sys.stderr)
    log.print(
        f"final: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['count']} images)\n"
        f"checkpoints: {checkpoints.folder}\n"
        + (f"exported factorised model: {exported}\n" if exported else "")
        + (f"speed report: {speed.files['md']}\n" if speed else "")
        + f"TensorBoard: tensorboard --logdir {folder / 'tensorboard'}"
    )
    log.close()
    return TrainResult(metrics["top1"], metrics["top5"], metrics["loss"], step, folder, exported)
