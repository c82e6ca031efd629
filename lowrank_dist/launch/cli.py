"""Submit a training run to SLURM through submitit, or run it here.

    python launch/submit.py --config configs/googlenet_lr.yaml --nodes 4 --gpus-per-node 8
    python launch/submit.py --config configs/debug.yaml --local --nodes 1 --tasks-per-node 2   # 2 processes here
    python launch/submit.py --config configs/debug.yaml --debug                                 # this process
    python launch/submit.py --config configs/vgg16_lr.yaml --nodes 2 --gpus-per-node 8 --dry-run

One SLURM task per GPU (CPU tasks on a partition without GPUs); every task finds its rank from the
job itself. Before submitting, SLURM is asked what the partition has (sinfo): defaults fit it (CPUs
per task capped by what a node has, the time by its limit), and a request that can never run there
is refused in one line naming the flag to change. The job folder is <run folder>/slurm/<job id>/
(submitit's logs, one per task). On preemption or ~2 minutes before the time limit SLURM sends USR2:
the run checkpoints at its next stop check (every
run.stop_check_every steps) and is requeued, and the restart resumes from that checkpoint.

Every failure is one line. Exit codes: 0 submitted (or, with --wait, finished); 1 the job failed
(FAILED, NODE_FAIL, OUT_OF_MEMORY, ...; --wait), SLURM did not answer, or the job waits for what only
an administrator can change (--wait); 2 bad input, a request the partition cannot meet, sbatch's
refusal, or a job pending for a reason that never clears (cancelled; --wait); 3 stopped with a
checkpoint (--debug/--local: run it again to continue). --local keeps the first failing rank's
2 or 3; any other failure of its processes is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from .jobs import (TrainJob, job_ended_badly, job_folder_for, job_stuck, make_executor, outcome_file, read_outcomes,
                   run_local, sbatch_script, slurm_available, submit)
from .resources import data_budget, plan_resources
from .slurm import JobStatus, SlurmError, query_partition, slurm_command, stuck_reason, wait_for_job


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python launch/submit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs per node (one task each); 0: CPU tasks. Default: 0 when the config's run.device"
                             " is cpu or the partition has no GPUs, else one per task (--tasks-per-node, or 1)")
    parser.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, or 1)")
    parser.add_argument("--cpus-per-task", type=int,
                        help="default: data.workers + 2 (1 if data.workers is 0), at most what a node of the partition"
                             " has per task; data.workers is then set to it − 2 (the training and NCCL threads)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--time", type=int, metavar="MIN",
                        help="time limit per job, minutes (default: 1440, or the partition's limit if lower)")
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
        here = args.local or args.debug  # no SLURM: CPU tasks unless asked otherwise
        resources, notes = plan_resources(cfg, args.nodes, 0 if here and args.gpus_per_node is None else args.gpus_per_node,
                                          args.tasks_per_node, args.cpus_per_task, args.partition, args.time,
                                          args.max_requeues)
        workers, warning = data_budget(cfg, resources)
        if workers != cfg.data.workers and not here:
            print(f"note: data.workers {workers} (the {resources.cpus_per_task} CPUs per task − 2)", file=sys.stderr)
            args.overrides.append(f"data.workers={workers}")
            cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
        if warning:
            print(warning, file=sys.stderr)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if args.debug:
        from ..train import main as train_main

        return train_main(["--config", args.config] + [f"--set={o}" for o in args.overrides])
    if args.local:
        code = run_local(args.config, args.overrides, resources.world_size)
        if code == 1:  # torchrun's summary is above: close with what happened and what to do
            print(f"error: the {resources.world_size} local processes stopped; each rank's error is above, and the"
                  f" 'Root Cause' names the first to fail. Last checkpoint: {latest_checkpoint(cfg) or 'none yet'};"
                  " run the same command again to resume from it", file=sys.stderr)
        return code

    job_folder = job_folder_for(cfg)
    if args.dry_run:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print("# resolved config")
        print(json.dumps(cfg.resolved(), indent=2))
        print(f"# sbatch script ({resources.nodes} node(s) × {resources.tasks_per_node} task(s) = {resources.world_size} processes)")
        print(sbatch_script(cfg, resources, job_folder))
        return 0
    if not slurm_available():
        print("error: SLURM is not available here (no sbatch on PATH). Use --local to run the processes on this"
              " machine, --debug for one process, or slurm/start_local_cluster.sh for a local SLURM.", file=sys.stderr)
        return 2

    try:
        partition = query_partition(args.partition)
        resources, notes = plan_resources(cfg, args.nodes, args.gpus_per_node, args.tasks_per_node, args.cpus_per_task,
                                          args.partition, args.time, args.max_requeues, partition)
    except SlurmError as error:
        print(f"error: could not ask SLURM what the partition has ({error}); check that its controller runs"
              " (`scontrol ping`), or run here with --local or --debug", file=sys.stderr)
        return 1
    except ConfigError as error:  # no such partition, or a request it cannot meet
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    try:
        job = submit(make_executor(cfg, resources, job_folder), TrainJob(str(Path(args.config).resolve()), args.overrides))
    except SlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1 if "Unable to contact" in str(error) else 2  # the controller went away, or sbatch said no
    print(f"submitted job {job.job_id}: {resources.nodes} node(s) × {resources.tasks_per_node} task(s)"
          f" × {resources.cpus_per_task} CPU(s)" + (f" + {resources.gpus_per_node} GPU(s) per node" if resources.gpus_per_node
                                                    else "") + f" on partition {partition.name}")
    print(f"logs: {job.paths.stdout} (and .err; one pair per task in {job.paths.folder})")
    print(f"run folder: {cfg.run.folder.resolve()}")
    print(f"watch: tensorboard --logdir {(cfg.run.folder / 'tensorboard').resolve()}")
    if args.wait:
        return wait(job, cfg)
    return 0


def latest_checkpoint(cfg):
    from ..training.checkpoint import CheckpointManager

    return CheckpointManager(cfg.run.folder / "checkpoints", cfg.run.keep_last).latest()


def wait(job, cfg) -> int:
    """--wait: follow the job to its end; one line for whatever stops it."""
    def show(status: JobStatus) -> None:
        where = f" on {status.nodes}" if status.state == "RUNNING" and status.nodes else ""
        print(f"job {job.job_id}: {status.state}{where}" + (f" ({status.reason})" if status.reason else ""), flush=True)

    try:
        status = wait_for_job(job.job_id, on_change=show)
        if stuck_reason(status) is not None:
            line, cancel = job_stuck(job.job_id, status)
            if cancel:
                slurm_command("scancel", job.job_id)
            print(f"error: {line}", file=sys.stderr)
            return 2 if cancel else 1
        if status.state != "COMPLETED":
            print(f"error: {job_ended_badly(job, status, latest_checkpoint(cfg), job_folder_for(cfg))}", file=sys.stderr)
            return 1
    except SlurmError as error:
        print(f"error: lost track of job {job.job_id} ({error}); `squeue -j {job.job_id}` shows where it is",
              file=sys.stderr)
        return 1
    # rank 0's summary, from the JSON its TrainJob wrote: submitit's result pickles are never read here
    result = read_outcomes(job_folder_for(cfg), job.job_id).get(0)
    if result is None:
        print(f"error: job {job.job_id} completed but its result file"
              f" {outcome_file(job_folder_for(cfg), job.job_id, 0)} is missing or unreadable; see {job.paths.folder}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {json.dumps(result)}")
    return 0
