"""The one-machine SLURM cluster (slurm/start_local_cluster.sh) does what the launcher relies on:
srun across both nodes, sbatch with accounting (sacct), a fast requeue, and slurm/train.sbatch's
ranks, rendezvous address and requeue near the time limit. In CI these fail without SLURM."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from .slurm_helpers import cancel, job_fields, job_state, require_slurm, submit, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _slurm():
    require_slurm()


def test_srun_runs_one_task_on_each_node():
    out = subprocess.run(["srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID $SLURM_NTASKS"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert sorted(out.split("\n")[:2]) == ["n1 0 2", "n2 1 2"]
    # torch's rendezvous connects to the first node by name: it must resolve, to this machine
    assert socket.gethostbyname("n1") == socket.gethostbyname("n2") == "127.0.0.1"


def test_sbatch_job_is_in_accounting(tmp_path):
    job = submit("-o", str(tmp_path / "out"), "--wrap", "echo hello from $SLURM_JOB_ID")
    wait_for(lambda: job_state(job) == "COMPLETED", 30, f"sacct to report job {job} COMPLETED")
    assert (tmp_path / "out").read_text().strip() == f"hello from {job}"
    exit_code = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "ExitCode"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert exit_code == "0:0"


def test_requeue_of_a_running_job_is_fast(tmp_path):
    out = tmp_path / "out"
    job = submit("--requeue", "--open-mode=append", "-o", str(out),
                 "--wrap", "echo start ${SLURM_RESTART_COUNT:-0}; sleep 300")
    try:
        wait_for(lambda: out.exists() and "start 0" in out.read_text(), 30, f"job {job} to start")
        began = time.monotonic()
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
        wait_for(lambda: "start 1" in out.read_text(), 40, f"requeued job {job} to start again")
        seconds = time.monotonic() - began
        print(f"requeue to running again: {seconds:.1f} s")
        assert job_fields(job)["Restarts"] == "1"
        assert seconds < 30  # the default cred_expire (120 s) makes it ~3 minutes
    finally:
        cancel(job)


STUB = """#!/bin/bash
# stands in for python: records what srun gave this task
n=${SLURM_RESTART_COUNT:-0}
echo "$SLURM_PROCID $SLURM_NTASKS $SLURM_LOCALID $SLURMD_NODENAME $MASTER_ADDR $MASTER_PORT $*" > "$OUT/rank$SLURM_PROCID.run$n"
# the trainer on USR2: checkpoint, exit 3 ("preempted")
if [ "$n" = 0 ]; then trap 'echo USR2 > "$OUT/usr2.rank$SLURM_PROCID"; exit 3' USR2; sleep 120 & wait; fi
"""


def test_train_sbatch_sets_ranks_master_and_requeues_on_usr2(tmp_path):
    """The template's srun gives every task its rank, the first node's address and a port from the
    job id; when the tasks stop on USR2 (what --signal=USR2@120 sends near the time limit) with the
    trainer's "preempted" exit code, the script requeues the job and it runs again."""
    python = tmp_path / "python"
    python.write_text(STUB)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path)}
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", "-o", str(tmp_path / "job.out"), str(ROOT / "slurm" / "train.sbatch"),
         "configs/debug.yaml", "--set", "optim.epochs=1"],
        env=env, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        first = [tmp_path / f"rank{rank}.run0" for rank in (0, 1)]
        wait_for(lambda: all(p.exists() for p in first), 30, f"both ranks of job {job} to start")
        port = 20000 + int(job) % 40000
        assert sorted(p.read_text().split() for p in first) == [
            ["0", "2", "0", "n1", "n1", str(port), "-m", "lowrank_dist.train", "--config", "configs/debug.yaml",
             "--set", "data.workers=0", "--set", "optim.epochs=1"],
            ["1", "2", "0", "n2", "n1", str(port), "-m", "lowrank_dist.train", "--config", "configs/debug.yaml",
             "--set", "data.workers=0", "--set", "optim.epochs=1"],
        ]
        # like --signal=USR2: to every task of every step, not to the batch shell
        subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True, timeout=30)
        wait_for(lambda: job_state(job) == "COMPLETED", 40, f"job {job} to requeue and complete")
        assert (tmp_path / "usr2.rank0").exists() and (tmp_path / "usr2.rank1").exists()
        assert (tmp_path / "rank0.run1").exists() and (tmp_path / "rank1.run1").exists()
        assert job_fields(job).get("Restarts") == "1"
        assert "stopped with a checkpoint before the time limit; requeueing" in (tmp_path / "job.out").read_text()
    finally:
        cancel(job)
