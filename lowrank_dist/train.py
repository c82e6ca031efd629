"""Train a (low-rank) CNN: on the GPU if there is one, else the CPU; one process, or one of many.

    python -m lowrank_dist.train --config configs/debug.yaml [--set optim.lr=0.05 ...] [--resume PATH]
    torchrun --nproc_per_node 8 -m lowrank_dist.train --config configs/vgg16_lr.yaml
    srun python -m lowrank_dist.train --config ...      (launch/submit.py does this through submitit)

Under torchrun or srun every process finds its rank itself (training.distributed.rendezvous).

A run folder (run.out_dir/run.name) holds checkpoints/, tensorboard/, metrics.jsonl and the
resolved config.yaml; running the same config again resumes from its latest checkpoint.
Bad input (config, data, checkpoint) prints one line naming the file, key or value and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .training.signals import StopSignals  # signal and threading only: nothing slow before main installs it


EXIT_PREEMPTED = 3  # stopped on request with a checkpoint: run again (or requeue) to continue


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.05 (repeatable)")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from (default: the run folder's latest)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    stop = StopSignals()  # first: Ctrl-C, TERM or USR2 during the seconds of imports and set-up is a stop request too
    try:
        return train_command(parse_args(argv), stop)
    finally:
        stop.restore()  # a caller in this process (a test, --debug) gets its own handlers back


def train_command(args: argparse.Namespace, stop: StopSignals) -> int:
    """The command, with `stop` catching the stop signals: the exit code, one line on stderr unless 0."""
    from .config import ConfigError, load_config
    from .data import DataError
    from .training.checkpoint import CheckpointError
    from .training.distributed import lost_contact, rendezvous
    from .training.run_lock import RunFolderBusy
    from .training.trainer import Preempted, TrainingError, run_training

    rdv = rendezvous()
    stop.announce = rdv.rank == 0
    who = f" (rank {rdv.rank} of {rdv.world_size})" if rdv.world_size > 1 else ""
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume is not None and args.resume.is_dir():
            raise CheckpointError(f"--resume: {str(args.resume)!r} is a folder; give a checkpoint file, e.g. its step_*.pt")
        if args.resume is not None and not args.resume.is_file():
            raise CheckpointError(f"--resume: checkpoint {str(args.resume)!r} does not exist")
        run_training(cfg, args.resume, rdv, stop.event)
    except (ConfigError, DataError, CheckpointError, RunFolderBusy) as error:
        print(f"error{who}: {error}", file=sys.stderr)
        return 2
    except Preempted as preempted:
        print(f"preempted{who}: {preempted}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TrainingError as error:
        print(f"training stopped{who}: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a peer that died, a collective that timed out: say which rank saw it
        if rdv.world_size > 1 and cfg is not None and lost_contact(error):
            from .training.checkpoint import CheckpointManager

            latest = CheckpointManager(cfg.run.folder / "checkpoints", cfg.run.keep_last).latest()
            print(f"error{who}: lost contact with another process ({str(error).splitlines()[0][:300]}): a rank died, was"
                  f" killed or did not answer within distributed.timeout_s ({cfg.distributed.timeout_s:g} s); its own"
                  f" log says why. Last checkpoint: {latest or 'none yet'}; run the same command again to resume from it",
                  file=sys.stderr)
            return 1
        if rdv.world_size > 1:
            print(f"error{who}: {type(error).__name__}: {error}", file=sys.stderr)
        raise
    return 0  # fit printed the final top-1/top-5 and where everything is


if __name__ == "__main__":
    sys.exit(main())
