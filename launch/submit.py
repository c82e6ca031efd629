#!/usr/bin/env python
"""Submit a training run to SLURM through submitit, or run it here.

    python launch/submit.py --config configs/googlenet_lr.yaml --nodes 4 --gpus-per-node 8
    python launch/submit.py --config configs/debug.yaml --local --nodes 1 --tasks-per-node 2   # 2 processes here
    python launch/submit.py --config configs/debug.yaml --debug                                 # this process
    python launch/submit.py --config configs/vgg16_lr.yaml --nodes 2 --gpus-per-node 8 --dry-run

One SLURM task per GPU; every task finds its rank from the job itself. The job folder is
<run folder>/slurm/<job id>/ (submitit's logs, one per task). On preemption or ~2 minutes before
the time limit SLURM sends USR2: the run checkpoints at its next stop check (every
run.stop_check_every steps) and is requeued, and the restart resumes from that checkpoint. Exit codes: 0 submitted (or finished), 1 training failed,
2 bad input, 3 preempted (--debug/--local: run it again to continue).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lowrank_dist.config import ConfigError, load_config  # noqa: E402
from lowrank_dist.launch import Resources, TrainJob, make_executor, run_local, sbatch_script, slurm_available  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/submit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node (one task each); 0: CPU tasks. Default: 0 when the config's run.device"
                             " is cpu, else one per task (--tasks-per-node, or 1)")
    parser.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, or 1)")
    parser.add_argument("--cpus-per-task", type=int, help="default: data.workers + 1")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--time", type=int, default=60 * 24, metavar="MIN", help="time limit per job, minutes")
    parser.add_argument("--max-requeues", type=int, default=3, help="time-outs to requeue after (preemptions always are)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set optim.lr=0.05 (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="nodes × tasks-per-node processes on this machine, no SLURM")
    mode.add_argument("--debug", action="store_true", help="one process, here (one GPU or the CPU)")
    mode.add_argument("--dry-run", action="store_true", help="print the resolved config and sbatch script; submit nothing")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait for the job and print its result")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # a dry run may be prepared away from the cluster's file system: its data paths are not checked
        cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
        gpus_per_node = args.gpus_per_node
        if gpus_per_node is None:  # a GPU config on SLURM gets GPUs, or its tasks would train on the CPU
            gpus_per_node = 0 if args.local or args.debug or cfg.run.device == "cpu" else (args.tasks_per_node or 1)
            if gpus_per_node:
                print(f"note: {gpus_per_node} GPU(s) per node (run.device is {cfg.run.device!r}); --gpus-per-node G"
                      " for more (one task each), 0 for CPU tasks", file=sys.stderr)
        resources = Resources(args.nodes, gpus_per_node, args.tasks_per_node, args.cpus_per_task,
                              args.partition, args.time, args.max_requeues)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.debug:
        from lowrank_dist.train import main as train_main

        return train_main(["--config", args.config] + [f"--set={o}" for o in args.overrides])
    if args.local:
        code = run_local(args.config, args.overrides, resources.world_size)
        if code != 0:  # torchrun's own traceback ends its output: close with what happened and what to do
            from lowrank_dist.engine.checkpoint import CheckpointManager

            latest = CheckpointManager(cfg.run.folder / "checkpoints", cfg.run.keep_last).latest()
            print(f"error: the {resources.world_size} local processes stopped (torchrun exit code {code}); each rank's"
                  " error is above, and torchrun's 'Root Cause' names the first to fail. Last checkpoint:"
                  f" {latest or 'none yet'}; run the same command again to resume from it", file=sys.stderr)
        return code

    job_folder = (cfg.run.folder / "slurm").resolve()
    if args.dry_run:
        print("# resolved config")
        print(json.dumps(cfg.resolved(), indent=2))
        print(f"# sbatch script ({resources.nodes} node(s) × {resources.tasks_per_node} task(s) = {resources.world_size} processes)")
        print(sbatch_script(cfg, resources, job_folder))
        return 0
    if not slurm_available():
        print("error: SLURM is not available here (no sbatch on PATH). Use --local to run the processes on this"
              " machine, --debug for one process, or slurm/start_local_cluster.sh for a local SLURM.", file=sys.stderr)
        return 2

    job = make_executor(cfg, resources, job_folder).submit(TrainJob(str(Path(args.config).resolve()), args.overrides))
    print(f"submitted job {job.job_id}: {resources.nodes} node(s) × {resources.tasks_per_node} task(s)")
    print(f"logs: {job.paths.stdout} (and .err; one pair per task in {job.paths.folder})")
    print(f"run folder: {cfg.run.folder.resolve()}")
    print(f"watch: tensorboard --logdir {(cfg.run.folder / 'tensorboard').resolve()}")
    if args.wait:
        try:
            result = job.results()[0]  # rank 0's summary
        except Exception as error:  # noqa: BLE001 - submitit re-raises the task's failure; show it, exit 1
            print(f"job {job.job_id} failed: {error}", file=sys.stderr)
            return 1
        print(f"job {job.job_id} finished: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
