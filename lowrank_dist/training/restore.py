"""A trained model back from its checkpoint, for the commands that use one (evaluate, export).

    saved = open_checkpoint(Path("runs/vgg16_lr"))          # best.pt, else the latest step
    model = restore_model(saved, num_classes)                # the module its weights fit, loaded
    saved.recorded_metrics()                                 # the run's val top-1/top-5 at that step

The checkpoint carries its run's resolved config: the model is rebuilt from it (`--config`
replaces it, `--set key=value` overrides it). What is loaded must fit the model exactly: weights
that do not are refused with the keys that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import Config, ConfigError, config_from_dict, load_config
from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from .model_setup import build_model_for


def checkpoint_in(path: Path) -> Path:
    """`path` itself, or for a run folder its best.pt, else its latest step checkpoint."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = folder / "best.pt"
    found = best if best.is_file() else CheckpointManager(folder, 1).latest()
    if found is None:
        raise CheckpointError(f"{str(path)!r} holds no checkpoint (expected best.pt or step_*.pt in {str(folder)!r})")
    return found


@dataclass
class SavedRun:
    path: Path  # the checkpoint file
    payload: dict  # what it holds: model weights, step, ranks, config, ...
    cfg: Config  # its config, or the one given instead, with the overrides applied

    @property
    def step(self) -> int | None:
        return self.payload.get("step")

    def recorded_metrics(self) -> dict[str, float] | None:
        """val top-1, top-5 and loss the run logged at this checkpoint's step (its metrics.jsonl,
        in the run folder above checkpoints/), or None where that step was not evaluated or the
        log is not there."""
        folder = self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent
        log = folder / "metrics.jsonl"
        if self.step is None or not log.is_file():
            return None
        found = None
        for line in log.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if entry.get("step") == self.step and "val/top1" in entry:
                found = {key: entry[f"val/{key}"] for key in ("top1", "top5", "loss") if f"val/{key}" in entry}
        return found


def open_checkpoint(checkpoint: Path, config: Path | None = None, overrides=()) -> SavedRun:
    """The checkpoint (a file or a run folder: `checkpoint_in`) read weights-only, with its config."""
    path = checkpoint_in(Path(checkpoint))
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no model weights (not one of our checkpoints)")
    if config is not None:
        cfg = load_config(config, overrides)
    elif isinstance(payload.get("config"), dict):
        cfg = config_from_dict(payload["config"], f"{path} (its config)", overrides)
    else:
        raise ConfigError(f"checkpoint {str(path)!r} carries no config: give one with --config")
    return SavedRun(path, payload, cfg)


def restore_model(saved: SavedRun, num_classes: int) -> nn.Module:
    """The module the checkpoint's weights belong to (on the CPU, in train mode), weights loaded."""
    cfg = saved.cfg
    try:
        model = build_model_for(cfg, cfg.model.num_classes or num_classes, saved=saved.payload).model
        model.load_state_dict(saved.payload["model"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:  # its parts are not ours
        raise CheckpointError(
            f"checkpoint {str(saved.path)!r} does not fit model {cfg.model.name} as configured:"
            f" {' '.join(str(error).split())[:400]}"
        ) from None
    return model
