"""Checkpoints that survive being killed mid-write.

Each checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over its final name (rename is atomic on POSIX), so a reader sees the old file or the new one,
never half of one. The folder keeps the last `keep_last` step checkpoints plus `best.pt`.

A checkpoint holds everything needed to continue bitwise: model, optimizer, scheduler, AMP
scaler, step and epoch, every RNG state, and the resolved config.

When the optimizer state is partitioned across ranks (DeepSpeed ZeRO), every rank writes its own
`step_N.rank00001-of-00004.pt` first; rank 0 writes `step_N.pt` last, after a barrier. The step
file is the commit marker: a step without it is incomplete and never resumed from, and pruning a
step removes its shards with it.

A process killed mid-write leaves its temporary file; `remove_temporaries` deletes those when the
next run starts. A write that fails (a full disk) raises OSError, with the previous files intact.

Nothing we load can run code. A checkpoint holds tensors and plain types only (the RNG states and
the config too), and every file is read with `torch.load(weights_only=True)`; DeepSpeed's ZeRO
shards also hold three small DeepSpeed types, allowed for those files alone. A file that needs any
other Python object is refused with a CheckpointError naming it and what it asked for, before any
of it runs. Checkpoints of lowrank-dist before this format pickled NumPy's RNG state:
`python -m lowrank_dist.upgrade_checkpoint` rewrites them once (see `LEGACY_GLOBALS`).
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..files import TEMPORARY_FILE, atomic_write, copy_atomic

if TYPE_CHECKING:
    from ..config import Config
    from .distributed import DistContext

STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")
SHARD_FILE = re.compile(r"^step_(\d{9})\.rank\d{5}-of-\d{5}\.pt$")


def rng_states() -> dict:
    """Every RNG's state as tensors and plain types (what weights_only loading reads back).
    NumPy's legacy state is ('MT19937', 624 uint32 keys, pos, has_gauss, cached_gaussian); its keys
    are kept as int64, which holds every uint32 exactly."""
    _, keys, pos, has_gauss, gaussian = np.random.get_state()
    numpy_state = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached_gaussian": float(gaussian)}
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to `path` so that a crash or a full disk leaves any previous file intact."""
    with atomic_write(path) as f:
        torch.save(payload, f)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or for another model)."""


# What the checkpoints of lowrank-dist before the weights-only format need beyond tensors and plain
# types: NumPy's RNG state, an ndarray (NumPy 1 and 2 spell its module differently).
LEGACY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                  "numpy.dtype", "numpy.dtypes.UInt32DType"}
UPGRADE_COMMAND = "python -m lowrank_dist.upgrade_checkpoint"


def zero_state_types() -> list[type]:
    """The DeepSpeed types in a ZeRO optimizer's state_dict (our per-rank shards): its loss scaler,
    the stage enum and the parameter-slice records. Plain data holders; nothing else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def globals_needed(path: Path, error: Exception | None = None) -> list[str]:
    """The Python objects (module.name) a file's pickle asks for beyond what weights_only loading
    allows, read from its opcodes without running them; from `error`'s text if the file is not in
    torch's zip format."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch's own message names the first one
        return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error or ""))))


def load_checkpoint(path: Path, map_location="cpu", allowed: list[type] = ()) -> dict:
    """A checkpoint, export or state_dict, read with torch.load(weights_only=True): tensors and plain
    types, plus the `allowed` types. A file that needs anything else is refused, nothing of it run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. on a plain pickle's protocol: the error says what matters
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(refusal(path, error)) from None
        reason = (str(error).splitlines() or [type(error).__name__])[0]
    except Exception as error:  # noqa: BLE001 - any other failure to read means the same to the user
        reason = (str(error).splitlines() or [type(error).__name__])[0]
    raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (damaged, or not a checkpoint): {reason}")


def refusal(path: Path, error: Exception) -> str:
    """Why a file was not loaded, in one line, and what to do."""
    needed = globals_needed(path, error)
    if needed and set(needed) <= LEGACY_GLOBALS:
        return (f"checkpoint {str(path)!r} was written by an older lowrank-dist (its RNG state is a pickled NumPy array)"
                f" and was not loaded: if you trust where it came from, convert it once with"
                f" `{UPGRADE_COMMAND} {path}`")
    if not needed:  # not torch's zip format: the unpickler's own words
        needed = [line.strip() for line in str(error).splitlines() if "nsupported" in line][-1:] or ["see torch.load"]
    return (f"checkpoint {str(path)!r} was not loaded: it needs Python objects beyond tensors and plain types"
            f" ({', '.join(needed)}), which could run code; only weights-only files are read")


class CheckpointManager:
    """Step checkpoints `step_000001234.pt` (the last `keep_last` kept) and `best.pt`."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def step_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if STEP_FILE.match(p.name))

    def remove_temporaries(self) -> list[Path]:
        """Delete the half-written files of a process killed while saving (call before anyone saves)."""
        if not self.folder.is_dir():
            return []
        stale = [p for p in self.folder.iterdir() if TEMPORARY_FILE.match(p.name)]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def latest(self) -> Path | None:
        files = self.step_files()
        return files[-1] if files else None

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:09d}.pt"

    @staticmethod
    def shard_path(step_path: Path, rank: int, world_size: int) -> Path:
        return step_path.with_name(f"{step_path.stem}.rank{rank:05d}-of-{world_size:05d}.pt")

    def save_shard(self, payload: dict, step: int, rank: int, world_size: int) -> Path:
        """This rank's part of step `step` (call on every rank before rank 0's `save`)."""
        path = self.shard_path(self.path_for(step), rank, world_size)
        atomic_save(payload, path)
        return path

    def load_shard(self, step_path: Path, rank: int, world_size: int, map_location="cpu") -> dict:
        path = self.shard_path(step_path, rank, world_size)
        if not path.is_file():
            written = sorted(p.name for p in step_path.parent.glob(f"{step_path.stem}.rank*.pt"))
            raise CheckpointError(
                f"{str(step_path)!r} has its optimizer state in per-rank shards and this rank's {path.name!r} is missing"
                + (f" (found {', '.join(written)}: it was written by another number of processes; resume with"
                   " that many)" if written else "")
            )
        return load_checkpoint(path, map_location, allowed=zero_state_types())

    def save(self, payload: dict, step: int, is_best: bool = False) -> Path:
        path = self.path_for(step)
        atomic_save(payload, path)
        if is_best:
            copy_atomic(path, self.folder / "best.pt")
        self.prune()
        return path

    def prune(self) -> None:
        """Keep the last `keep_last` steps; a step's shards go with it, and so do shards of steps
        that never got their step file (a run killed between the shards and the commit)."""
        kept = {p.stem for p in self.step_files()[-self.keep_last:]}
        newest = max((int(STEP_FILE.match(p.name).group(1)) for p in self.step_files()), default=-1)
        for path in list(self.folder.iterdir()):
            if STEP_FILE.match(path.name) and path.stem not in kept:
                path.unlink()
            elif (match := SHARD_FILE.match(path.name)) and f"step_{match.group(1)}" not in kept:
                if int(match.group(1)) <= newest:  # newer shards may be another rank's save in progress
                    path.unlink()


# ----------------------------------------------------------------------------------------------
# The resume policy: which checkpoints a run may continue from


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
    """The model section of a config as a checkpoint records it. Checkpoints written before
    precision.execution existed kept that setting in model.lowrank: how layers run is not which
    model it is, so it is left out of the comparison."""
    if not isinstance(section, dict) or not isinstance(section.get("lowrank"), dict):
        return section
    return section | {"lowrank": {k: v for k, v in section["lowrank"].items() if k != "execution"}}


def _is_count(value, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def rng_problem(states) -> str | None:
    """Why `states` (a checkpoint's "rng") cannot be restored, tried on throwaway generators; or None."""
    try:
        torch.Generator().set_state(states["torch"].cpu())
        numpy_state = states["numpy"]
        np.random.RandomState().set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32),
                                           numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        random.Random().setstate(states["python"])
    except Exception as error:  # noqa: BLE001 - whatever it is, the state is not one rng_states wrote
        return f"its RNG state cannot be restored ({(str(error).splitlines() or [type(error).__name__])[0][:200]})"
    return None


def layout_problem(state: dict) -> str | None:
    """What is wrong with the layout of a loaded training checkpoint (what rng_states and the trainer
    write), or None: a file edited or damaged so that resuming from it would fail half-way."""
    if not is_state_dict(state.get("model")):
        return "its 'model' is not a state_dict (names → tensors)"
    for key in ("step", "epoch", "batch", "skipped_nonfinite"):
        if not _is_count(state.get(key, 0)):
            return f"its {key!r} is {state.get(key)!r}, not a count"
    if not isinstance(state.get("best_top1"), (int, float)) or isinstance(state.get("best_top1"), bool):
        return f"its 'best_top1' is {state.get('best_top1')!r}, not a number"
    world = state.get("world_size", 1)
    if not _is_count(world, 1):
        return f"its 'world_size' is {world!r}, not a number of processes"
    ranks = state.get("ranks", {})
    if not isinstance(ranks, dict) or not all(isinstance(k, str) and _is_count(v, 1) for k, v in ranks.items()):
        return "its 'ranks' is not a map of layer → rank"
    engine = state.get("engine")
    if engine is not None and not (isinstance(engine, dict) and isinstance(engine.get("optimizer"), dict)):
        return "its 'engine' holds no optimizer state"
    own = state.get("rank_buffers")
    if own is not None and not (isinstance(own, list) and len(own) == world and all(map(is_state_dict, own))):
        return f"its 'rank_buffers' is not one state_dict per process ({world})"
    return rng_problem(state.get("rng"))


def state_dict_mismatch(expected: dict, saved: dict) -> str | None:
    """How `saved` (a state_dict) differs from a model's `expected` one in names and shapes, or None."""
    shape = lambda t: "×".join(map(str, t.shape)) or "a scalar"  # noqa: E731
    differ = [k for k in expected if k in saved and saved[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in saved]
    extra = [k for k in saved if k not in expected]
    parts = [f"{k} is {shape(saved[k])} there, {shape(expected[k])} here" for k in differ[:1]]
    parts += [f"{len(differ) - 1} more tensors differ in shape"] if len(differ) > 1 else []
    parts += [f"{len(missing)} tensor(s) missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]})"] if extra else []
    return "; ".join(parts) or None


def check_fits(state: dict, path: Path, model: torch.nn.Module, num_classes: int, classes_from: str) -> None:
    """Refuse, naming both, a checkpoint whose weights do not fit `model`: first the class count (a
    data.root whose class folders changed), then names and shapes."""
    written_for = state.get("num_classes")
    if _is_count(written_for) and written_for != num_classes:
        raise CheckpointError(f"--resume {str(path)!r} was written for {written_for} classes; this run has {num_classes}"
                              f" ({classes_from}): give run.name another name to start anew, or go back to the data it"
                              " was trained on")
    expected = model.state_dict()
    mismatch = state_dict_mismatch(expected, state["model"])
    for own in state.get("rank_buffers") or []:  # each process's own BN statistics: names and shapes of the model's
        mismatch = mismatch or state_dict_mismatch({k: v for k, v in expected.items() if k in own}, own)
    if mismatch is not None:
        raise CheckpointError(f"--resume {str(path)!r} does not fit this run's model ({num_classes} classes, {classes_from}):"
                              f" {mismatch}")


def check_resumable(state: dict, path: Path, cfg: Config, dist_ctx: DistContext) -> None:
    """Refuse, with the reason, a checkpoint this run cannot continue from."""
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"--resume {str(path)!r} is not a checkpoint of this trainer (no config in it)")
    if not isinstance(state["config"].get("model"), dict) or not isinstance(state["config"].get("distributed", {}), dict):
        raise CheckpointError(f"--resume {str(path)!r} is damaged or not a checkpoint of this trainer: its config has no"
                              " model section")
    written_for, this = _model_identity(state["config"].get("model")), _model_identity(cfg.resolved()["model"])
    if written_for != this:
        there, here = _differences(written_for if isinstance(written_for, dict) else {}, this)
        raise CheckpointError(f"--resume {str(path)!r} was written for model {there}, not this config's {here}:"
                              " resume with the config it was written with, or give run.name another name to start anew")
    if "engine" not in state:
        raise CheckpointError(f"--resume {str(path)!r} is not a training checkpoint (no optimizer state); to start"
                              " from its weights use model.lowrank.mode 'decomposed' with dense_checkpoint")
    problem = layout_problem(state)
    if problem is not None:
        raise CheckpointError(f"--resume {str(path)!r} is damaged or not a checkpoint of this trainer: {problem}")
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
