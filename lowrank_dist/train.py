"""Train a (low-rank) CNN in one process: on the GPU if there is one, else the CPU.

    python -m lowrank_dist.train --config configs/debug.yaml [--set optim.lr=0.05 ...] [--resume PATH]

A run folder (run.out_dir/run.name) holds checkpoints/, tensorboard/, metrics.jsonl and the
resolved config.yaml; running the same config again resumes from its latest checkpoint.
Bad input (config, data, checkpoint) prints one line naming the file, key or value and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from (default: the run folder's latest)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .data import DataError
    from .engine.checkpoint import CheckpointError
    from .engine.trainer import TrainingError, fit

    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None and not args.resume.is_file():
            raise CheckpointError(f"--resume: checkpoint {str(args.resume)!r} does not exist")
        fit(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"training stopped: {error}", file=sys.stderr)
        return 1
    return 0  # fit printed the final top-1/top-5 and where everything is


if __name__ == "__main__":
    sys.exit(main())
