"""Starting the run's processes: a SLURM job through submitit (one task per GPU), or N processes
on this machine through torchrun's launcher. `python launch/submit.py` (lowrank_dist.launch.cli)
is the command line.

On SLURM every task runs `TrainJob`: it finds its rank (training.distributed.rendezvous), joins the
process group and trains. On SLURM's USR2 before the time limit (`--signal=USR2@120`) or TERM on
preemption every rank checkpoints the current step and stops; submitit (after USR2) or SLURM
(after TERM) requeues the job, which resumes exactly (docs/design.md#stopping-and-requeue).
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import sys
from pathlib import Path

from ..config import Config
from .resources import SIGNAL_LEAD_S, Resources, default_cpus_per_task
from .slurm import ADMIN_ONLY, NEVER_STARTS, JobStatus, SlurmError, stuck_reason


class TrainJob:
    """What each SLURM task runs (pickled by submitit): train `config` with `overrides`."""

    def __init__(self, config: str, overrides: list[str]):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from ..config import load_config
        from ..training.distributed import rendezvous
        from ..training.signals import StopSignals
        from ..training.trainer import Preempted, run_training

        cfg = load_config(self.config, self.overrides)
        rdv = rendezvous()
        stop = StopSignals()  # replaces submitit's handlers, which it installed before calling us
        try:
            result = run_training(cfg, rdv=rdv, stop=stop.event)
        except Preempted as preempted:
            requeue = stop.previous.get(signal.SIGUSR2)  # submitit's: checkpoint() → scontrol requeue → exit
            if stop.received == signal.SIGUSR2 and rdv.rank == 0 and callable(requeue):
                requeue(signal.SIGUSR2, None)
            # after TERM, SLURM itself decides: a preempted or requeued job comes back, a cancelled one does not
            return {"preempted_at_step": preempted.step, "checkpoint": str(preempted.checkpoint)}
        return {"top1": result.top1, "top5": result.top5, "loss": result.loss, "step": result.step,
                "folder": str(result.folder)}

    def checkpoint(self):
        """Called by submitit before a requeue: the same job again; fit resumes from the run folder."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None


def slurm_parameters(cfg: Config, resources: Resources) -> dict:
    """submitit's SLURM parameters: one task per GPU (or `tasks_per_node` CPU tasks), USR2 warning,
    requeue allowed."""
    parameters = {
        "job_name": f"lowrank-{cfg.run.name}",
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task or default_cpus_per_task(cfg),
        "time": resources.time_min,
        "signal_delay_s": SIGNAL_LEAD_S,
        "additional_parameters": {"requeue": True},
    }
    if resources.gpus_per_node:
        parameters["gpus_per_node"] = resources.gpus_per_node
    if resources.partition:
        parameters["partition"] = resources.partition
    return parameters


def make_executor(cfg: Config, resources: Resources, job_folder: Path):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(job_folder / "%j"), max_num_timeout=resources.max_requeues)
    executor.update_parameters(**slurm_parameters(cfg, resources))
    return executor


def sbatch_script(cfg: Config, resources: Resources, job_folder: Path) -> str:
    """The sbatch script submitit would submit, built by submitit itself (no SLURM needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder / "%j"
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg, resources))


def submit(executor, job):
    """submitit's submit, with sbatch's refusal as one SlurmError line instead of submitit's traceback
    (submitit also prints sbatch's stderr itself: captured, it goes into that line)."""
    import submitit

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return executor.submit(job)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as error:
        text = f"{error}\n{printed.getvalue()}"
        lines = [line.split("error:", 1)[1].strip() for line in text.splitlines() if "error:" in line]
        lines = list(dict.fromkeys(lines)) or [line.strip() for line in text.splitlines() if line.strip()][:1]
        raise SlurmError(f"sbatch refused the job: {'; '.join(lines) or type(error).__name__}") from None


def task_error(job) -> str | None:
    """The exception that ended the job's first failed task, as 'TrainingError: the loss became nan ...'
    (the last line of the traceback submitit kept), or None."""
    try:
        failure = job.exception()
    except Exception:  # noqa: BLE001 - no result to read (the node died): the state says enough
        return None
    trace = str(failure or "").split("----------------------")
    lines = [line.strip() for line in (trace[1] if len(trace) > 2 else "").splitlines() if line.strip()]
    if not lines:
        return None
    match = re.match(r"^(?:[\w.]+\.)?(\w+: .*)$", lines[-1])
    return match.group(1) if match else lines[-1]


ENDINGS = {  # sacct's final state: what happened, what to do
    "FAILED": ("failed", "fix that and submit the same command again: it resumes from the last checkpoint"),
    "NODE_FAIL": ("ended because a node it ran on failed",
                  "submit the same command again: it resumes from the last checkpoint"),
    "OUT_OF_MEMORY": ("ran out of memory", "lower data.batch_size or data.workers and submit the same"
                      " command again: it resumes from the last checkpoint"),
    "TIMEOUT": ("reached its time limit more often than --max-requeues allows",
                "raise --time or --max-requeues and submit the same command again: it resumes"),
    "CANCELLED": ("was cancelled", "submit the same command again to resume from the last checkpoint"),
    "PREEMPTED": ("was preempted and not requeued", "submit the same command again: it resumes"),
    "BOOT_FAIL": ("could not start: its node failed to boot", "submit the same command again"),
    "DEADLINE": ("reached its deadline", "submit the same command again: it resumes"),
}


def job_ended_badly(job, status: JobStatus, checkpoint: Path | None) -> str:
    """One line for a job that did not complete: SLURM's state and reason, the task's own error, the
    logs, the last checkpoint and what to do."""
    what, todo = ENDINGS.get(status.state, ("ended", "see its logs"))
    error = task_error(job) if status.state == "FAILED" else None
    logs = str(job.paths.stderr).replace("%t", "0")
    return (f"job {job.job_id} {what} ({', '.join(filter(None, (status.state, status.reason)))}"
            + (f"; {error}" if error else "") + ")."
            f" Logs: {logs} (one per task); last checkpoint: {checkpoint or 'none yet'}. {todo}")


def job_stuck(job_id: str, status: JobStatus) -> tuple[str, bool]:
    """One line for a job pending for a reason that does not clear by waiting, and whether to cancel
    it (it can never start) or leave it queued (an administrator can clear the reason)."""
    key = stuck_reason(status)
    if key in NEVER_STARTS:
        return (f"job {job_id} can never start: SLURM's reason is {status.reason} ({NEVER_STARTS[key]}); cancelled it",
                True)
    return (f"job {job_id} waits for something only an administrator can change: SLURM's reason is {status.reason}"
            f" ({ADMIN_ONLY[key]}); it stays queued and starts when that clears (scancel {job_id} to drop it)", False)


def run_local(config: str, overrides: list[str], processes: int) -> int:
    """`processes` ranks on this machine through torchrun's launcher (it sets RANK/WORLD_SIZE/MASTER_*
    and stops every rank when one fails), run in this process so that the first failing rank's exit
    code comes back: 2 bad input and 3 stopped with a checkpoint stay what they are, anything else
    (a crash, a rank killed) is 1, with torchrun's summary of which rank failed first."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", f"--nproc-per-node={processes}", "-m", "lowrank_dist.train", "--config", config]
    for override in overrides:
        argv += ["--set", override]
    try:
        run(parse_args(argv))
    except ChildFailedError as failed:
        rank, first = failed.get_first_failure()
        if first.exitcode in (2, 3):  # each rank printed its own one-line reason
            return first.exitcode
        print(failed.format_msg(), file=sys.stderr)  # torchrun's summary: the first rank to fail, and how
        return 1
    except SignalException as stopped:  # the launcher was signalled: torchrun passed it on, every rank checkpointed
        print(f"stopped by {signal.Signals(stopped.sigval).name}: every rank was asked to checkpoint its current step",
              file=sys.stderr)
        return 3
    return 0
