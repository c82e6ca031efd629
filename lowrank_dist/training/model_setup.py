"""The model a run's config describes — the one place that turns a config into a model, for
training (`lowrank_dist.train`) and evaluation (`lowrank_dist.evaluate`). The architecture and the
rank policy come from `models.build_model`, which checks every model rule; this adds the modes and
the checkpoints; `plan_for_run` then sets how its factorized layers run (precision.execution)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..lowrank.layers import LowRankConv2d, LowRankLinear
from ..runtime import amp_dtype
from ..speed.execution import ExecutionPlan, default_execution, lowrank_layers, plan_execution
from ..models import (
    build_model, choose_fc_ranks, choose_ranks, convert, decompose_model, fc_policy, lowrank_policy, model_spec, split_ranks,
)
from .checkpoint import CheckpointError, is_state_dict, load_checkpoint, state_dict_mismatch
from .distributed import DistContext
from .projection import Projector


@dataclass
class ModelSetup:
    model: nn.Module
    ranks: dict[str, int] = field(default_factory=dict)  # factorized (or projected) layers → K
    projector: Projector | None = None
    decomposition_errors: dict[str, float] = field(default_factory=dict)  # decomposed mode


def _dense_state_dict(path: Path, model_name: str) -> dict:
    """A dense model's weights from one of our checkpoints or a plain state_dict file (torchvision's
    .pth), read weights-only: often someone else's file, it must not be able to run code."""
    if not path.is_file():
        raise CheckpointError(f"model.lowrank.dense_checkpoint: file {str(path)!r} does not exist")
    try:
        payload = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"model.lowrank.dense_checkpoint: {error}") from None
    if isinstance(payload, dict) and "model" in payload and "config" in payload:
        section = payload["config"].get("model") if isinstance(payload["config"], dict) else None
        if not isinstance(section, dict) or not is_state_dict(payload["model"]):
            raise CheckpointError(f"model.lowrank.dense_checkpoint {str(path)!r} is damaged: its config has no model"
                                  " section, or its 'model' is not a state_dict (names → tensors)")
        trained = section.get("name")
        if trained != model_name:
            raise CheckpointError(
                f"model.lowrank.dense_checkpoint {str(path)!r} holds a {trained!r} model; this config builds {model_name!r}"
            )
        if section.get("lowrank"):
            raise CheckpointError(f"model.lowrank.dense_checkpoint {str(path)!r} holds a low-rank model, not a dense one")
        return payload["model"]
    if is_state_dict(payload):
        return payload
    raise CheckpointError(f"model.lowrank.dense_checkpoint {str(path)!r} is neither our checkpoint nor a state_dict")


def build_model_for(cfg: Config, num_classes: int, saved: dict | None = None) -> ModelSetup:
    """The model the run trains, by mode: dense baseline, `factorized` (V and H from scratch, the
    paper), `decomposed` (exact decomposition of a trained dense model, then fine-tune) or
    `projected` (dense kernels, re-projected onto rank K every N steps).

    With `saved` (a loaded checkpoint), the module whose state_dict it holds, its weights not
    loaded: factorized layers get the ranks the checkpoint records (those of a decomposed or
    energy-policy run came from a spectrum, not from the config alone); a projected run's own
    checkpoints hold its dense kernels, its export their plain V·H factors."""
    build = cfg.model.build_dict(num_classes)
    lowrank = cfg.model.lowrank
    if lowrank is None:
        return ModelSetup(build_model(build))
    if saved is not None:
        exported = saved.get("factorized", "step" not in saved and "ranks" in saved)
        dense = build_model(build, dense=True)
        if lowrank.mode == "projected" and not exported:
            return ModelSetup(dense)
        ranks = saved.get("ranks") or {}
        convs, fcs = split_ranks(dense, ranks)  # a checkpoint keeps conv and FC ranks in one map
        model = convert(dense, {"ranks": convs}, factorize_first=True, bn_between=lowrank.bn_between and not exported,
                        inplace=True, fc={"ranks": fcs} if fcs else None)
        return ModelSetup(model, dict(ranks))
    if lowrank.mode == "factorized":
        model = build_model(build)
        ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, (LowRankConv2d, LowRankLinear))}
        return ModelSetup(model, ranks)

    spec = model_spec(cfg.model.name)
    policy, fc = lowrank_policy(spec, build["lowrank"]), fc_policy(spec, build["lowrank"])
    dense = build_model(build, dense=True)
    if lowrank.mode == "decomposed":
        state = _dense_state_dict(lowrank.dense_checkpoint, cfg.model.name)
        mismatch = state_dict_mismatch(dense.state_dict(), state)
        if mismatch is not None:
            raise CheckpointError(
                f"model.lowrank.dense_checkpoint {str(lowrank.dense_checkpoint)!r} does not fit {cfg.model.name}"
                f" with {num_classes} classes: {mismatch}"
            )
        dense.load_state_dict(state)
        model, errors = decompose_model(dense, policy, lowrank.factorize_first, lowrank.bn_between, inplace=True, fc=fc)
        return ModelSetup(model, {e.name: e.rank for e in errors}, None, {e.name: e.relative_error for e in errors})
    ranks = choose_ranks(dense, policy, lowrank.factorize_first) | (choose_fc_ranks(dense, fc) if fc is not None else {})
    return ModelSetup(dense, ranks, Projector(dense, ranks))


def plan_for_run(cfg: Config, model: nn.Module, device: torch.device, dist_ctx: DistContext, log) -> ExecutionPlan | None:
    """The trainer's one call, after the model is on its device and before an engine wraps it:
    rank 0 plans (`precision.execution`, by default auto on a GPU and CPU_DEFAULT on the CPU)
    at the run's batch, crop, dtype and memory format, with the cache `run.out_dir/execution_cache.json`;
    every rank applies rank 0's plan (a per-rank timing could differ by noise, and DDP needs every
    rank to run the same graph). The plan is printed, written to the run folder
    (execution_plan.md/.json) and TensorBoard (execution/plan). None for a model without
    factorized layers (dense, or the projected mode)."""
    if cfg.model.lowrank is None or not lowrank_layers(model):
        return None
    execution = cfg.precision.execution or default_execution(device)
    shape = (cfg.data.batch_size, model_spec(cfg.model.name).input_size[0], cfg.data.image_size, cfg.data.image_size)
    dtype = amp_dtype(cfg.precision.amp)
    payload, failure = None, None
    if dist_ctx.is_main:
        try:
            plan = plan_execution(model, shape, execution, device, dtype, cfg.precision.channels_last,
                                  cache=cfg.run.out_dir / "execution_cache.json")
            payload = {"plan": plan.as_dict()}
        except Exception as error:  # every rank must stop together, not wait for a plan that never comes
            failure, payload = error, {"error": f"{type(error).__name__}: {error}"}
    payload = dist_ctx.broadcast_object(payload)
    if failure is not None:
        raise failure
    if "error" in payload:
        raise RuntimeError(f"rank 0 could not plan the layers' execution: {payload['error']}")
    plan = ExecutionPlan.from_dict(payload["plan"])
    plan.apply(model)
    if dist_ctx.is_main:
        if cfg.precision.execution is None:
            plan.meta["note"] = f"precision.execution not set: {execution} on the {device.type.upper()}"
        markdown = plan.to_markdown()
        log.print(markdown if execution == "auto" else plan.summary())
        log.text("execution/plan", markdown)
        try:
            plan.write(cfg.run.folder)
        except OSError as error:
            print(f"warning: could not write the execution plan to {cfg.run.folder} ({error})", file=sys.stderr)
    return plan
