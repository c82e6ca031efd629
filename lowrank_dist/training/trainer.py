"""Training, in torchvision's shape: one model, one data set, SGD, evaluation, checkpoints, TensorBoard.

    run, checkpoint = set_up(cfg, dist_ctx, resume, stop)   # device, logs, data, model, engine
    state = resume_state(run, checkpoint)                    # TrainState: step, epoch, batch, best, skipped
    for each epoch: train_one_epoch (loop.py) → validate → save_checkpoint
    finish(run, state, metrics)                              # projection, export, speed report, summary

`model_setup.build_model_for` holds the three low-rank modes. The trainer does not know how it was launched
(a DistContext says which rank it is) nor which engine it drives (DDP or DeepSpeed: engines.py).
"""

from __future__ import annotations

import errno
import math
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ..config import Config, ConfigError, config_errors
from ..data import build_loaders
from ..files import write_text_atomic
from ..models import build_model, layer_names, model_spec
from ..speed.execution import ExecutionPlan
from ..speed.network import expected_bytes_per_step
from ..runtime import amp_dtype, device_type_for, select_device
from .checkpoint import (CheckpointError, CheckpointManager, atomic_save, check_fits, check_resumable, load_checkpoint,
                         restore_rng_states)
from .distributed import DistContext, process_group, rendezvous
from .engines import build_engine, global_batch, powersgd_start
from .evaluate import evaluate
from .loop import Meter, Preempted, Run, TrainingError, TrainState, project, save_checkpoint, train_one_epoch
from .optim import learning_rate, scaled_lr
from .run_lock import run_folder_lock
from .run_log import RunLog
from .model_setup import build_model_for, plan_for_run

__all__ = ["fit", "Preempted", "TrainingError", "loaders_for", "build_model_for"]


def loaders_for(cfg: Config, dist_ctx: DistContext, device: torch.device, train: bool = True):
    """This rank's train and val loaders as the config's data section says (train=False: val only)."""
    return build_loaders(cfg.data, rank=dist_ctx.rank, world_size=dist_ctx.world_size, seed=cfg.run.seed, device=device,
                         channels_last=cfg.precision.channels_last, train=train)


@dataclass
class TrainResult:
    top1: float
    top5: float
    loss: float
    step: int
    folder: Path
    exported: Path | None = None


def measured_speed(cfg: Config, lowrank: nn.Module, num_classes: int, device: torch.device, out_dir: Path, log: RunLog,
                   plan: ExecutionPlan | None = None):
    """The end-of-run speed report: every factorized layer timed against its dense twin (same
    shapes, fresh weights: time does not depend on their values), factorized and composed, at the
    training batch, image size and memory format, on the training device, in the run's dtype on a
    GPU and in fp32 on the CPU (CPUs have no fast bf16 convolutions: bf16 times there say nothing
    about a GPU run). The run's execution plan is the report's plan when it was made in the same
    dtype; otherwise the report picks each layer's faster form itself. Printed, and written to
    out_dir and TensorBoard."""
    from ..speed.report import speed_report

    dense = build_model(cfg.model.build_dict(num_classes), dense=True)
    run_dtype = amp_dtype(cfg.precision.amp)
    dtype = run_dtype if device.type == "cuda" else torch.float32
    shape = (cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    same = plan is not None and dtype == run_dtype
    report = speed_report(dense, lowrank, shape, device, dtype, out_dir, writer=log.writer,
                          channels_last=cfg.precision.channels_last, title=f"{cfg.model.name} (run {cfg.run.name})",
                          plan=plan.executions if same else None,
                          plan_source=f"the run's plan, precision.execution {plan.mode}" if same else None)
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
    if `resume` is None), whose weights the model already holds, or None for a fresh start. The run
    folder exists and this run holds it (fit)."""
    with config_errors():
        device = select_device(cfg.run.device, dist_ctx.local_rank)
    if cfg.precision.amp == "fp16" and device.type != "cuda":
        raise ConfigError("precision.amp: 'fp16' needs a CUDA GPU (use 'bf16' or 'none' on the CPU)")
    torch.manual_seed(cfg.run.seed)
    with start_up_write(cfg.run.folder):
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
    checkpoint = load_resume(cfg, resume or checkpoints.latest(), model, len(loaders.classes), dist_ctx, device)
    with config_errors():
        engine = build_engine(model, cfg, dist_ctx, device, math.ceil(len(loaders.train) / cfg.optim.accumulate))
    if checkpoint is not None:  # after the engine: DDP and DeepSpeed start every rank from rank 0's buffers
        restore_own_buffers(engine.module, checkpoint, dist_ctx)
    progress = tqdm(desc=cfg.run.name, disable=not (dist_ctx.is_main and sys.stderr.isatty()))
    run = Run(cfg, dist_ctx, engine, engine.module,  # SyncBatchNorm conversion may have replaced BN layers
              loaders, loss_function(cfg), log, checkpoints, setup.ranks, setup.projector, stop, progress, plan=plan)
    batch = global_batch(cfg, dist_ctx)
    log.print(f"{dist_ctx.world_size} process(es) × batch {cfg.data.batch_size} × accumulate {cfg.optim.accumulate}"
              f" = global batch {batch}; peak lr {scaled_lr(cfg.optim, batch):g}"
              + (f" (lr {cfg.optim.lr:g} × {batch}/{cfg.optim.lr_batch}, linear scaling)"
                 if cfg.optim.lr_scaling == "linear" else ""))
    log.print(communication_line(cfg, dist_ctx, setup.model, engine))
    if checkpoint is None:
        log.text("config", "```yaml\n" + yaml.safe_dump(cfg.resolved(), sort_keys=False) + "```")
        if dist_ctx.is_main:
            with start_up_write(cfg.run.folder):
                write_text_atomic(cfg.run.folder / "config.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
        names = layer_names(setup.model)  # tags by the paper's layer names: ranks/conv4_2
        log.scalars(0, {f"ranks/{names[n]}": rank for n, rank in setup.ranks.items()})
        log.scalars(0, {f"decomposition/relative_error/{names[n]}": e for n, e in setup.decomposition_errors.items()})
    return run, checkpoint


def communication_line(cfg: Config, dist_ctx: DistContext, model: nn.Module, engine) -> str:
    """The start-up line: parameters, and the bytes of gradients all-reduced per optimizer step
    (counted from the parameters here; measured at every step as comm/bytes_per_step)."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    options = cfg.distributed
    line = f"model: {count / 1e6:.2f}M parameters"
    if getattr(engine, "comm", None) is None:
        note = (f"; distributed.grad_compression {options.grad_compression!r} has nothing to compress and is not used"
                if options.grad_compression != "none" and cfg.distributed.engine == "ddp" else "")
        return line + f"; one process: no gradient all-reduce{note}"
    psgd = options.powersgd
    sent = expected_bytes_per_step(model, options.grad_compression, *((psgd.rank, psgd.min_compression_rate) if psgd else ()))
    how = {"none": "fp32", "bf16": "bf16",
           "powersgd": f"PowerSGD rank {psgd.rank if psgd else 0} after {powersgd_start(cfg, engine.steps_per_epoch)} plain steps"}
    return line + (f"; gradients all-reduced per step: {sent / 1e6:.2f} MB ({how[options.grad_compression]};"
                   f" dense fp32 {4 * count / 1e6:.2f} MB), measured as comm/bytes_per_step")


def load_resume(cfg: Config, path: Path | None, model: nn.Module, data_classes: int, dist_ctx: DistContext,
                device: torch.device) -> dict | None:
    """The checkpoint at `path` (None: a fresh start), checked against this run (model, engine, world
    size, class count, every tensor's name and shape, its layout), its weights loaded into `model`
    — before the engine: DeepSpeed copies the weights it starts from."""
    if path is None:
        return None
    path = Path(path)
    checkpoint = load_checkpoint(path, map_location=device)
    check_resumable(checkpoint, path, cfg, dist_ctx)
    num_classes = cfg.model.num_classes or data_classes
    classes_from = ("model.num_classes" if cfg.model.num_classes else
                    f"the class folders of data.root {str(cfg.data.root)!r}")
    check_fits(checkpoint, path, model, num_classes, classes_from)
    checkpoint["path"] = path
    model.load_state_dict(checkpoint["model"])
    return checkpoint


def restore_own_buffers(model: nn.Module, checkpoint: dict, dist_ctx: DistContext) -> None:
    """Each rank's own BN statistics, where the checkpoint holds them for as many ranks as this run
    has; otherwise (one process, or another number of ranks) every rank goes on from their mean,
    the checkpoint's model."""
    own = checkpoint.get("rank_buffers")
    if own is None or len(own) != dist_ctx.world_size:
        return
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in own[dist_ctx.rank].items():
            buffers[name].copy_(value)


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
    steps_per_epoch = run.steps_per_epoch
    state = TrainState()
    if checkpoint is not None:
        try:
            run.engine.load(run.checkpoints, checkpoint["path"], checkpoint, dist_ctx)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"--resume {str(checkpoint['path'])!r}: its optimizer state does not fit this model"
                                  f" ({(str(error).splitlines() or [type(error).__name__])[0][:300]})") from None
        state.load_state_dict(checkpoint)
        restore_rng_states(checkpoint["rng"])
        log.print(f"resumed from {checkpoint['path']}: step {state.step}, epoch {state.epoch}, batch {state.batch}")
        written_by = checkpoint.get("world_size", 1)
        if written_by != dist_ctx.world_size:  # at an epoch boundary (check_resumable)
            lr = learning_rate(cfg.optim, run.engine.peak_lr, steps_per_epoch, state.epoch, 0)
            log.print(f"written by {written_by} process(es), resumed by {dist_ctx.world_size}: from epoch"
                      f" {state.epoch + 1} on each epoch is sharded over {dist_ctx.world_size} in {steps_per_epoch} steps"
                      f" of global batch {global_batch(cfg, dist_ctx)}; the schedule goes on at lr {lr:g}"
                      + ("; PowerSGD's error feedback starts from zero (each old rank had its own)"
                         if cfg.distributed.grad_compression == "powersgd" else ""))
        if state.epoch >= cfg.optim.epochs:
            log.print(f"the run is complete ({cfg.optim.epochs} epochs): evaluating its final weights only")
    # the lr of the first step to take (train_one_epoch sets each next one after a step)
    run.engine.set_lr(learning_rate(cfg.optim, run.engine.peak_lr, steps_per_epoch, state.epoch,
                                    math.ceil(state.batch / cfg.optim.accumulate)))
    # Steps are counted over the whole run; a resume at another world size changes the steps per
    # epoch, so the steps taken before it are an offset to the schedule (0 otherwise).
    offset = state.step - (state.epoch * steps_per_epoch + math.ceil(state.batch / cfg.optim.accumulate))
    run.total_steps = offset + cfg.optim.epochs * steps_per_epoch
    run.last_step = min(run.total_steps, cfg.run.max_steps or run.total_steps)
    run.progress.reset(total=run.last_step)
    run.progress.update(state.step)
    return state


def validate(run: Run, state: TrainState) -> dict[str, float]:
    """Val top-1/top-5/loss of the current weights (every rank: the ranks' mean BN statistics; each
    keeps its own for training on), logged; returns them, and whether they are the best so far (`best`)."""
    with run.dist_ctx.buffers_averaged(run.model):
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
    make_run_folder(cfg)
    with run_folder_lock(cfg.run.folder, dist_ctx):  # one run per folder, from before anything is written there
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


@contextmanager
def start_up_write(folder: Path) -> Iterator[None]:
    """A write error (a full disk) before the first step stops the run in one line: nothing was trained."""
    try:
        yield
    except OSError as error:
        raise TrainingError(f"could not write to the run folder {folder} ({error}); nothing was trained: make room"
                            " (or fix its permissions) and run the same command again") from None


def make_run_folder(cfg: Config) -> None:
    """Create run.out_dir/run.name, or say in one ConfigError why it cannot be."""
    folder = cfg.run.folder
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run.name: {str(folder)!r} is a file, not a run folder; give run.name (or run.out_dir)"
                          " another value")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(errno.EACCES, "Permission denied")
    except OSError as error:
        raise ConfigError(f"run.out_dir: cannot create or write the run folder {str(folder)!r}"
                          f" ({error.strerror or error}); give run.out_dir a folder this user can write") from None


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
    if run.projector is not None:
        with run.dist_ctx.buffers_averaged(run.model):  # the model the run evaluated: the ranks' mean statistics
            if run.dist_ctx.is_main:
                exported = folder / "exported_lowrank.pt"
                lowrank = run.projector.export(run.model)
                try:
                    atomic_save({"model": lowrank.state_dict(), "ranks": run.ranks, "factorized": True,
                                 "config": cfg.resolved()}, exported)
                except OSError as error:
                    raise TrainingError(f"could not write the exported model {exported} ({error}); the run's last"
                                        f" checkpoint, {run.checkpoints.latest()}, is complete: make room and run the"
                                        " same command again to export it") from None
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


def run_training(cfg: Config, resume: Path | None = None, rdv=None, stop: threading.Event | None = None):
    """Join the job's process group (none for one process) and train; what launchers call.
    `stop`: a threading.Event that ends the run with a checkpoint at the next stop check."""
    rdv = rdv or rendezvous()
    with process_group(rdv, device_type_for(cfg.run.device), cfg.distributed.timeout_s) as dist_ctx:
        return fit(cfg, dist_ctx, resume, stop)
