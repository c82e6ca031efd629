"""For tests that need a real SLURM cluster (slurm/start_local_cluster.sh starts one on this machine).

    from tests.slurm_helpers import require_slurm, submit, wait_for, job_state

    def test_something(tmp_path):
        require_slurm()          # CI=true: fails without SLURM; elsewhere: skips with the reason
        job = submit("--wrap", "true", "-o", str(tmp_path / "out"))
        wait_for(lambda: job_state(job) == "COMPLETED", 30, f"job {job} to complete")

The issue's rule: in CI a test that needs SLURM must fail when SLURM is missing, never skip quietly.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from typing import Callable

import pytest

COMMANDS = ("sbatch", "srun", "squeue", "sacct", "scontrol", "sinfo", "scancel")
START = "slurm/start_local_cluster.sh"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _run(*args: str, timeout: float = 30) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True).stdout


@functools.lru_cache(maxsize=1)
def slurm_problem() -> str | None:
    """Why SLURM cannot run a job here, or None: the commands exist, slurmctld answers, a node is up."""
    missing = [name for name in COMMANDS if shutil.which(name) is None]
    if missing:
        return f"SLURM commands not found: {', '.join(missing)}"
    try:
        if "UP" not in _run("scontrol", "ping", timeout=15):
            return "slurmctld does not answer `scontrol ping`"
        states = _run("sinfo", "-h", "-N", "-o", "%T", timeout=15).split()
    except (subprocess.SubprocessError, OSError) as error:
        return f"SLURM does not answer: {error}"
    if not any(state in {"idle", "mixed", "allocated", "completing"} for state in states):
        return f"no SLURM node is up (sinfo: {', '.join(states) or 'no nodes'})"
    return None


def require_slurm() -> None:
    """Return if a SLURM cluster answers; else fail under CI=true, skip (with the reason) elsewhere."""
    problem = slurm_problem()
    if problem is None:
        return
    message = f"{problem}; start a local cluster with {START}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: tests that need SLURM fail without it)", pytrace=False)
    pytest.skip(message)


def submit(*args: str) -> str:
    """sbatch with these arguments; the job id."""
    return _run("sbatch", "--parsable", *args).strip().split(";")[0]


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...); {} once the job is forgotten."""
    try:
        text = _run("scontrol", "show", "job", "-o", job_id)
    except subprocess.CalledProcessError:
        return {}
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


def job_state(job_id: str) -> str:
    """The job's state as accounting records it ('' before slurmdbd has it), e.g. COMPLETED, RUNNING."""
    lines = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").split()
    return lines[-1].split()[0] if lines else ""


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll `condition` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(every)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
