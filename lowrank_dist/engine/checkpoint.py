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
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STEP_FILE = re.compile(r"^step_(\d{9})\.pt$")
SHARD_FILE = re.compile(r"^step_(\d{9})\.rank\d{5}-of-\d{5}\.pt$")
TEMPORARY_FILE = re.compile(r"^\..+\.tmp-\d+$")  # atomic_save's, left behind by a process killed mid-write


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_save(payload: dict, path: Path) -> None:
    """torch.save to `path` so that a crash or a full disk leaves any previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # make the rename itself durable
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, unreadable, or for another model)."""


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        # our checkpoints hold numpy RNG state and the config, so not weights_only
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same to the user
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read (damaged, or not a checkpoint): {reason}") from None


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
        return load_checkpoint(path, map_location)

    def save(self, payload: dict, step: int, is_best: bool = False) -> Path:
        path = self.path_for(step)
        atomic_save(payload, path)
        if is_best:
            self._copy_atomic(path, self.folder / "best.pt")
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

    @staticmethod
    def _copy_atomic(source: Path, target: Path) -> None:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
