"""Training, in torchvision's shape: one model, one data set, SGD, evaluation, checkpoints, TensorBoard.

    run, checkpoint = set_up(cfg, dist_ctx, resume, stop)   # device, logs, data, model, engine
    state = resume_state(run, checkpoint)                    # TrainState: step, epoch, batch, best, skipped
    for each epoch: train_one_epoch (loop.py) → validate → save_checkpoint
    finish(run, state, metrics)                              # projection, export, speed report, summary

`model_setup.build_model_for` holds the three low-rank modes. The trainer does not know how it was launched
(a DistContext says which rank it is) nor which engine it drives (DDP or DeepSpeed: engines.py).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..config import Config, ConfigError, config_errors
from ..data import build_loaders
from ..models import build_model, layer_names, model_spec
from ..report.execution import ExecutionPlan, plan_for_run
from ..runtime import amp_dtype, select_device
from .checkpoint import CheckpointError, CheckpointManager, atomic_save, load_checkpoint, restore_rng_states
from .distributed import DistContext
from .engines import build_engine, global_batch
from .evaluate import evaluate
from .loop import Meter, Preempted, Run, TrainingError, TrainState, project, save_checkpoint, train_one_epoch
from .optim import scaled_lr
from .model_setup import build_model_for

__all__ = ["fit", "Preempted", "TrainingError", "loaders_for", "build_model_for"]


def loaders_for(cfg: Config, dist_ctx: DistContext, device: torch.device, train: bool = True):
    """This rank's train and val loaders as the config's data section says (train=False: val only)."""
    return build_loaders(
        cfg.data.root, backend=cfg.data.backend, dali_device=cfg.data.dali_device, batch_size=cfg.data.batch_size,
        image_size=cfg.data.image_size, val_resize=cfg.data.val_resize, workers=cfg.data.workers,
        train_list=cfg.data.train_list, val_list=cfg.data.val_list, rank=dist_ctx.rank,
        world_size=dist_ctx.world_size, seed=cfg.run.seed, device=device, channels_last=cfg.precision.channels_last,
        min_crop_scale=cfg.data.min_crop_scale, hflip=cfg.data.hflip, on_bad_image=cfg.data.on_bad_image, train=train,
        format=cfg.data.format, augment=cfg.data.augment,
    )


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
    """The end-of-run speed report: every factorized layer timed against its dense twin (same
    shapes, fresh weights: time does not depend on their values), factorized and composed, at the
    training batch, image size and memory format, on the training device, in the run's dtype on a
    GPU and in fp32 on the CPU (CPUs have no fast bf16 convolutions: bf16 times there say nothing
    about a GPU run). The run's execution plan is the report's plan when it was made in the same
    dtype; otherwise the report picks each layer's faster form itself. Printed, and written to
    out_dir and TensorBoard."""
    from ..report.speed import speed_report

    dense = build_model(cfg.model.build_dict(num_classes), dense=True)
    run_dtype = amp_dtype(cfg.precision.amp)
    dtype = run_dtype if device.type == "cuda" else torch.float32
    shape = (cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    same = plan is not None and dtype == run_dtype
    report = speed_report(dense, lowrank, shape, device, dtype, out_dir, writer=log.writer,
                          channels_last=cfg.precision.channels_last, title=f"{cfg.model.name} (run {cfg.run.name})",
                          plan=plan.executions if same else None,
                          plan_source=f"the run's plan, model.lowrank.execution {plan.mode}" if same else None)
    log.print(report.to_markdown())
    return report


def cudnn_benchmark_for(device: torch.device, image_sizes: set[int]) -> bool:
    """Whether cuDNN should time its convolution algorithms for each new input shape and keep the
    fastest (torch.backends.cudnn.benchmark): on a CUDA device when the run feeds one image size.
    The shapes are then few and fixed (the training batch, and the last, shorter batch of an epoch
    and of the val set): each is timed once, the first time it comes, and its algorithm reused.
    With varying sizes every new one would be timed again, costing more than it saves. cuDNN alone
    reads the flag: off on the CPU."""
    return device.type == "cuda" and len(image_sizes) == 1


def set_up(cfg: Config, dist_ctx: DistContext, resume: Path | None, stop: threading.Event | None) -> tuple[Run, dict | None]:
    """Device, logs, data, model, engine; with the checkpoint to resume from (the run folder's latest
    if `resume` is None), whose weights the model already holds, or None for a fresh start."""
    cfg.run.folder.mkdir(parents=True, exist_ok=True)
    with config_errors():
        device = select_device(cfg.run.device, dist_ctx.local_rank)
    if cfg.precision.amp == "fp16" and device.type != "cuda":
        raise ConfigError("precision.amp: 'fp16' needs a CUDA GPU (use 'bf16' or 'none' on the CPU)")
    torch.manual_seed(cfg.run.seed)
    log = RunLog(cfg.run.folder, dist_ctx.is_main)
    loaders = loaders_for(cfg, dist_ctx, device)
    if cfg.model.num_classes is not None and cfg.model.num_classes < len(loaders.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(loaders.classes)} classes of"
                          f" {cfg.data.root}; set at least {len(loaders.classes)}, or leave it out to use the data's count")
    ranks_given = cfg.model.lowrank is not None and cfg.model.lowrank.ranks is not None
    with config_errors("model.lowrank.ranks" if ranks_given else "model"):  # a rank or option this model cannot take
        setup = build_model_for(cfg, len(loaders.classes))
    model = setup.model.to(device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Every back-end crops train and val images to image_size × image_size (CIFAR: 32 × 32). Set
    # before the execution plan times the layers, so it times them as the training runs them.
    torch.backends.cudnn.benchmark = cudnn_benchmark_for(device, {cfg.data.image_size})
    # The one place to change the model on its device before the engine wraps it.
    plan = plan_for_run(cfg, model, device, dist_ctx, log)  # each factorized layer runs factorized or composed

    checkpoints = CheckpointManager(cfg.run.folder / "checkpoints", cfg.run.keep_last)
    if dist_ctx.is_main:  # no rank saves before rank 0 has joined the first step's collectives
        for stale in checkpoints.remove_temporaries():
            log.print(f"removed {stale.name}, left half-written by a process killed while saving")
    resume = resume or checkpoints.latest()
    checkpoint = None
    if resume is not None:
        checkpoint = load_checkpoint(Path(resume), map_location=device)
        check_resumable(checkpoint, Path(resume), cfg, dist_ctx)
        checkpoint["path"] = Path(resume)
        model.load_state_dict(checkpoint["model"])  # before the engine: DeepSpeed copies the weights it starts from
    with config_errors():
        engine = build_engine(model, cfg, dist_ctx, device, math.ceil(len(loaders.train) / cfg.optim.accumulate))
    progress = tqdm(desc=cfg.run.name, disable=not (dist_ctx.is_main and sys.stderr.isatty()))
    run = Run(cfg, dist_ctx, engine, engine.module,  # SyncBatchNorm conversion may have replaced BN layers
              loaders, loss_function(cfg), log, checkpoints, setup.ranks, setup.projector, stop, progress, plan=plan)
    batch = global_batch(cfg, dist_ctx)
    log.print(f"{dist_ctx.world_size} process(es) × batch {cfg.data.batch_size} × accumulate {cfg.optim.accumulate}"
              f" = global batch {batch}; peak lr {scaled_lr(cfg.optim, batch):g}"
              + (f" (lr {cfg.optim.lr:g} × {batch}/{cfg.optim.lr_batch}, linear scaling)"
                 if cfg.optim.lr_scaling == "linear" else ""))
    if checkpoint is None:
        log.text("config", "```yaml\n" + yaml.safe_dump(cfg.resolved(), sort_keys=False) + "```")
        if dist_ctx.is_main:
            (cfg.run.folder / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        names = layer_names(setup.model)  # tags by the paper's layer names: ranks/conv4_2
        log.scalars(0, {f"ranks/{names[n]}": rank for n, rank in setup.ranks.items()})
        log.scalars(0, {f"decomposition/relative_error/{names[n]}": e for n, e in setup.decomposition_errors.items()})
    return run, checkpoint


def loss_function(cfg: Config):
    """Cross-entropy (with the configured label smoothing); a model that returns auxiliary heads in
    training (GoogLeNet: logits, aux2, aux1) adds each head's loss with its spec's weight."""
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    aux_weight = model_spec(cfg.model.name).aux_loss_weight

    def loss(outputs, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, tuple):
            return criterion(outputs[0], labels) + aux_weight * sum(criterion(aux, labels) for aux in outputs[1:])
        return criterion(outputs, labels)

    return loss


def resume_state(run: Run, checkpoint: dict | None) -> TrainState:
    """The TrainState to go on from (engine state, counters and RNG restored from `checkpoint`), and
    the step the run ends at (`run.last_step`)."""
    cfg, log, dist_ctx = run.cfg, run.log, run.dist_ctx
    steps_per_epoch = math.ceil(run.micro_batches / cfg.optim.accumulate)
    state = TrainState()
    if checkpoint is not None:
        run.engine.load(run.checkpoints, checkpoint["path"], checkpoint, dist_ctx)
        state.load_state_dict(checkpoint)
        restore_rng_states(checkpoint["rng"])
        log.print(f"resumed from {checkpoint['path']}: step {state.step}, epoch {state.epoch}, batch {state.batch}")
        written_by = checkpoint.get("world_size", 1)
        if written_by != dist_ctx.world_size:  # at an epoch boundary (check_resumable)
            lr = rebase_schedule(run.engine, cfg, state.epoch * steps_per_epoch, global_batch(cfg, dist_ctx))
            log.print(f"written by {written_by} process(es), resumed by {dist_ctx.world_size}: from epoch"
                      f" {state.epoch + 1} on each epoch is sharded over {dist_ctx.world_size} in {steps_per_epoch} steps"
                      f" of global batch {global_batch(cfg, dist_ctx)}; the schedule goes on at lr {lr:g}")
        if state.epoch >= cfg.optim.epochs:
            log.print(f"the run is complete ({cfg.optim.epochs} epochs): evaluating its final weights only")
    # Steps are counted over the whole run; a resume at another world size changes the steps per
    # epoch, so the steps taken before it are an offset to the schedule (0 otherwise).
    offset = state.step - (state.epoch * steps_per_epoch + math.ceil(state.batch / cfg.optim.accumulate))
    run.total_steps = offset + cfg.optim.epochs * steps_per_epoch
    run.last_step = min(run.total_steps, cfg.run.max_steps or run.total_steps)
    run.progress.reset(total=run.last_step)
    run.progress.update(state.step)
    return state


def validate(run: Run, state: TrainState) -> dict[str, float]:
    """Val top-1/top-5/loss of the current weights (every rank: the same averaged BN statistics),
    logged; returns them, and whether they are the best so far (`best`)."""
    run.dist_ctx.average_buffers(run.model)
    metrics = evaluate(run.model, run.loaders.val, run.dist_ctx, run.engine.autocast, run.engine.forward)
    run.log.scalars(state.step, {f"val/{k}": metrics[k] for k in ("top1", "top5", "loss")})
    metrics["best"] = metrics["top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, metrics["top1"])
    return metrics


def fit(cfg: Config, dist_ctx: DistContext = DistContext(), resume: Path | None = None,
        stop: threading.Event | None = None) -> TrainResult:
    """Train as configured; resume from `resume` or, if the run folder has checkpoints, from the latest.

    `stop` (set from a signal handler, e.g. SLURM's USR2 before preemption or the time limit) ends
    the run at the next stop check (`run.stop_check_every` steps at most), on every rank together,
    with a checkpoint of that step: `Preempted` is raised."""
    run, checkpoint = set_up(cfg, dist_ctx, resume, stop)
    state = resume_state(run, checkpoint)
    metrics: dict[str, float] = {}
    meter = Meter()
    while state.epoch < cfg.optim.epochs and state.step < run.last_step:
        if not train_one_epoch(run, state, meter):
            break  # stopped mid-epoch (run.max_steps): the checkpoint keeps where we are
        state.epoch, state.batch = state.epoch + 1, 0
        if state.epoch % cfg.run.eval_every == 0 or state.epoch == cfg.optim.epochs:
            metrics = validate(run, state)
            run.log.print(f"epoch {state.epoch}: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
                          f"  loss {metrics['loss']:.4f}")
            save_checkpoint(run, state, metrics["best"])
        else:
            save_checkpoint(run, state)
    run.progress.close()
    return finish(run, state, metrics)


def finish(run: Run, state: TrainState, metrics: dict[str, float]) -> TrainResult:
    """The end of a run: project (projected mode), evaluate the final weights if the last
    evaluation does not describe them, export, time the layers, print where everything is."""
    cfg, folder = run.cfg, run.cfg.run.folder
    if run.projector is not None:
        project(run, state.step)  # the final weights are exactly rank K
    if not metrics or state.batch > 0 or run.projector is not None:
        metrics = validate(run, state)  # the last evaluation (if any) does not describe the final weights
        save_checkpoint(run, state, metrics["best"])
    lowrank, exported = run.model, None
    if run.projector is not None and run.dist_ctx.is_main:
        exported = folder / "exported_lowrank.pt"
        lowrank = run.projector.export(run.model)
        atomic_save({"model": lowrank.state_dict(), "ranks": run.ranks, "factorized": True, "config": cfg.resolved()},
                    exported)
    speed = None
    finished = state.step >= run.total_steps  # a run cut short by run.max_steps is a test or a debug session
    if run.ranks and cfg.run.speed_report and run.dist_ctx.is_main and finished:
        try:
            speed = measured_speed(cfg, lowrank, len(run.loaders.classes), run.engine.device, folder / "speed", run.log,
                                   run.plan)
        except OSError as error:  # the weights are safe by now; a report that cannot be written is not fatal
            print(f"warning: could not write the speed report to {folder / 'speed'} ({error})", file=sys.stderr)
    run.log.print(
        f"final: val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['count']} images)\n"
        f"checkpoints: {run.checkpoints.folder}\n"
        + (f"exported factorized model: {exported}\n" if exported else "")
        + (f"speed report: {speed.files['md']}\n" if speed else "")
        + f"TensorBoard: tensorboard --logdir {folder / 'tensorboard'}"
    )
    run.log.close()
    return TrainResult(metrics["top1"], metrics["top5"], metrics["loss"], state.step, folder, exported)
