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
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from ..config import Config
from ..files import write_text_atomic
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

        stop = StopSignals()  # replaces submitit's handlers, which it installed before calling us
        cfg = load_config(self.config, self.overrides)
        rdv = rendezvous()
        stop.announce = rdv.rank == 0
        try:
            result = run_training(cfg, rdv=rdv, stop=stop.event)
        except Preempted as preempted:
            requeue = stop.previous.get(signal.SIGUSR2)  # submitit's: checkpoint() → scontrol requeue → exit
            if stop.received == signal.SIGUSR2 and rdv.rank == 0 and callable(requeue):
                requeue(signal.SIGUSR2, None)
            # after TERM, SLURM itself decides: a preempted or requeued job comes back, a cancelled one does not
            return self._outcome(cfg, rdv.rank, {"preempted_at_step": preempted.step,
                                                 "checkpoint": str(preempted.checkpoint)})
        except Exception as error:
            self._outcome(cfg, rdv.rank, {"error": f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]})
            raise
        return self._outcome(cfg, rdv.rank, {"top1": result.top1, "top5": result.top5, "loss": result.loss,
                                             "step": result.step, "folder": str(result.folder)})

    @staticmethod
    def _outcome(cfg: Config, rank: int, outcome: dict) -> dict:
        """`outcome`, also written as JSON where `submit.py --wait` reads it (rank 0's result, any
        rank's error): --wait never unpickles what a task left (submitit's result pickles)."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id is not None and (rank == 0 or "error" in outcome):
            try:
                write_text_atomic(outcome_file(job_folder_for(cfg), job_id, rank), json.dumps(outcome) + "\n")
            except OSError:
                pass  # a full disk: --wait then says the result could not be read, SLURM's state says the rest
        return outcome

    def checkpoint(self):
        """Called by submitit before a requeue: the same job again; fit resumes from the run folder."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def job_folder_for(cfg: Config) -> Path:
    """Where the jobs of a run keep their logs: <run folder>/slurm/<job id>/ (submitit's and ours)."""
    return (cfg.run.folder / "slurm").resolve()


def outcome_file(job_folder: Path, job_id: str, rank: int) -> Path:
    """What task `rank` of job `job_id` wrote about how it ended, as JSON (TrainJob._outcome)."""
    return job_folder / job_id / f"{job_id}_{rank}_outcome.json"


def read_outcomes(job_folder: Path, job_id: str) -> dict[int, dict]:
    """The JSON outcomes the job's tasks wrote, by rank (unreadable ones left out)."""
    found = {}
    for path in (job_folder / job_id).glob(f"{job_id}_*_outcome.json"):
        try:
            outcome = json.loads(path.read_text())
            rank = int(path.name.split("_")[1])
        except (OSError, ValueError):
            continue
        if isinstance(outcome, dict):
            found[rank] = outcome
    return found


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


def task_error(job, job_folder: Path) -> str | None:
    """The exception that ended the job's first failed task (lowest rank), as 'TrainingError: the loss
    became nan ...', from the JSON its TrainJob wrote; None if none did (a task killed, a node lost:
    the state says enough)."""
    errors = [outcome["error"] for _, outcome in sorted(read_outcomes(job_folder, job.job_id).items())
              if isinstance(outcome.get("error"), str)]
    return errors[0] if errors else None


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


def job_ended_badly(job, status: JobStatus, checkpoint: Path | None, job_folder: Path | None = None) -> str:
    """One line for a job that did not complete: SLURM's state and reason, the task's own error, the
    logs, the last checkpoint and what to do."""
    what, todo = ENDINGS.get(status.state, ("ended", "see its logs"))
    error = task_error(job, job_folder) if status.state == "FAILED" and job_folder is not None else None
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
