"""Rewrite checkpoints of older lowrank-dist versions in the weights-only format, once.

    python -m lowrank_dist.upgrade_checkpoint runs/vgg16_lr                  # every checkpoint of a run
    python -m lowrank_dist.upgrade_checkpoint runs/vgg16_lr/checkpoints/step_000012000.pt --yes

Those checkpoints pickled NumPy's RNG state as an ndarray, so `torch.load(weights_only=True)`, the
only way lowrank-dist reads files, refuses them. This command reads each one allowing exactly
NumPy's array reconstruction and nothing else (still no arbitrary code: a file that asks for any
other object is refused), after you confirm that you trust the file, since NumPy's functions were
never written to face a hostile pickle. It stores the RNG state as tensors and replaces the file
atomically; the weights, optimizer state and config are unchanged. A file that already loads is
left as it is. Exit codes: 0 done, 1 declined, 2 a file that is not an older checkpoint of ours (or
no terminal to ask and no --yes).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from .files import reason
from .training.checkpoint import (
    LEGACY_GLOBALS, SHARD_FILE, CheckpointError, atomic_save, globals_needed, load_checkpoint, rng_problem,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.upgrade_checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="checkpoint files, or run folders (all their checkpoints)")
    parser.add_argument("--yes", action="store_true", help="I trust these files: do not ask")
    return parser.parse_args(argv)


def files_in(path: Path) -> list[Path]:
    """`path`, or the .pt files of a run folder (or of its checkpoints/ folder), shards excepted:
    those never held RNG state."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} does not exist")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(p for p in folder.glob("*.pt") if not SHARD_FILE.match(p.name))
    if (path / "exported_lowrank.pt").is_file():
        found.append(path / "exported_lowrank.pt")
    if not found:
        raise CheckpointError(f"{str(path)!r} holds no checkpoint (*.pt)")
    return found


def numpy_array_globals() -> list:
    """NumPy's array reconstruction under every name a NumPy 1 or 2 pickle uses for it."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy(._core|.core).multiarray._reconstruct
    allowed = [np.ndarray, np.dtype, (reconstruct, "numpy.core.multiarray._reconstruct"),
               (reconstruct, "numpy._core.multiarray._reconstruct")]
    if hasattr(np, "dtypes"):  # NumPy >= 1.25 pickles a dtype through its class
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def upgraded(payload: dict, path: Path) -> dict:
    """The same checkpoint with NumPy's RNG state as tensors (the layout of engine.checkpoint.rng_states)."""
    rng = payload.get("rng") if isinstance(payload, dict) else None
    numpy_state = rng.get("numpy") if isinstance(rng, dict) else None
    if not (isinstance(numpy_state, tuple) and len(numpy_state) == 5 and isinstance(numpy_state[1], np.ndarray)):
        raise CheckpointError(f"{str(path)!r} holds NumPy arrays outside an RNG state: not a checkpoint of lowrank-dist,"
                              " not converted")
    _, keys, pos, has_gauss, gaussian = numpy_state
    try:
        rng["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(gaussian)}
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r} has a damaged NumPy RNG state ({error}): not converted") from None
    problem = rng_problem(rng)
    if problem is not None:
        raise CheckpointError(f"{str(path)!r} is damaged: {problem}; not converted")
    return payload


def upgrade(path: Path, confirm) -> str:
    """Convert one file if it needs it; what was done, in a few words."""
    needed = globals_needed(path)
    if not needed:
        load_checkpoint(path)  # a damaged file says so here
        return "already weights-only, left as it is"
    if not set(needed) <= LEGACY_GLOBALS:
        raise CheckpointError(f"{str(path)!r} needs {', '.join(needed)}: not a checkpoint of lowrank-dist, not converted"
                              " (nothing in it was run)")
    if path.stat().st_mode & 0o222 == 0:  # nobody may write it: someone meant it to stay as it is
        raise CheckpointError(f"{str(path)!r} is read-only: left as it is (make it writable, e.g. chmod u+w, to convert"
                              " it)")
    if not confirm(path):
        return "declined"
    try:
        with torch.serialization.safe_globals(numpy_array_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - damaged: whatever torch says, the file is left as it is
        raise CheckpointError(f"{str(path)!r} cannot be read (damaged?): {(str(error).splitlines() or ['?'])[0][:300]};"
                              " not converted") from None
    try:
        atomic_save(upgraded(payload, path), path)
    except OSError as error:
        raise CheckpointError(f"{str(path)!r} could not be rewritten ({reason(error)}): left as it was") from None
    load_checkpoint(path)  # what every later run will do: it must succeed
    return "converted"


def main(argv=None) -> int:
    args = parse_args(argv)

    def confirm(path: Path) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise CheckpointError(f"{str(path)!r} is an older checkpoint: confirm that you trust it by running this in a"
                                  " terminal, or add --yes")
        try:
            answer = input(f"{path} pickles a NumPy array (an older lowrank-dist's RNG state); reading it allows NumPy's"
                           " array reconstruction. Do you trust where this file came from? [y/N] ")
        except EOFError:
            return False
        return answer.strip().lower() in {"y", "yes"}

    declined = False
    try:
        for path in (f for p in args.paths for f in files_in(p)):
            outcome = upgrade(path, confirm)
            declined |= outcome == "declined"
            print(f"{path}: {outcome}")
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if declined else 0


if __name__ == "__main__":
    sys.exit(main())
