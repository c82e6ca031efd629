"""Launching a training run: on a SLURM cluster through submitit, as N local processes, or in this
process. `launch/submit.py` is the command line; this module is what it calls.

On SLURM every task runs `TrainJob`: it finds its rank (training.distributed.rendezvous), joins the
process group and trains. On SLURM's USR2 before the time limit (`--signal=USR2@120`) or TERM on
preemption every rank checkpoints the current step and stops; submitit (after USR2) or SLURM
(after TERM) requeues the job, which resumes exactly (docs/design.md#stopping-and-requeue).

Before submitting, `plan_resources` fits the request to what the partition has (slurm.query_partition):
defaults that fit (CPU tasks on a partition without GPUs, CPUs per task capped by a node's), and a
request that cannot run there refused in one line naming the flag to change.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError
from .slurm import ADMIN_ONLY, NEVER_STARTS, JobStatus, Partition, SlurmError, stuck_reason

DEFAULT_TIME_MIN = 60 * 24

REQUEUE_SIGNAL = "USR2"
SIGNAL_LEAD_S = 120  # seconds before the time limit that SLURM warns the job

# The CPU budget of one task (one GPU): the training thread and NCCL's/DALI's executor threads get 2
# CPUs, DALI's worker threads (or DataLoader workers) the rest — data.workers = CPUs per task − 2.
RESERVED_CPUS = 2
# Train-step images/s of one H200 at bf16, the faster of dense and all-factorized at the authors' ranks
# (VGG-16 compiled, the others eager; docs/design.md#speed): the rate a node's CPUs must feed each GPU at.
GPU_IMAGES_PER_S = {"alexnet": 36_128, "vgg16": 5_710, "googlenet": 6_701}
# Images per CPU-second the host side of each data path sustains (python bench/loaders.py, 500×375
# JPEGs in page cache, 2-core CPU, otherwise idle; README "Data loading speed"): with DALI on the GPU
# the host reads and plans (--no-decode: 15,300–17,600, taken as 15,000 for nvJPEG's host-side
# share, which no GPU here could measure); on the CPU it also decodes, crops and resizes (DALI
# 259–294, torchvision 209–232). A busy machine measured higher per core: idle threads spin less.
HOST_IMAGES_PER_CORE = {"dali-gpu": 15_000, "dali-cpu": 260, "torchvision": 210}


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None  # default: default_cpus_per_task
    partition: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    max_requeues: int = 3  # time-outs; preemptions do not count

    def __post_init__(self):
        for key in ("nodes", "time_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.tasks_per_node is None:
            self.tasks_per_node = max(1, self.gpus_per_node)
        if self.tasks_per_node < 1:
            raise ConfigError(f"--tasks-per-node: must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ConfigError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}:"
                              " one task drives one GPU, so they must be equal")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


class TrainJob:
    """What each SLURM task runs (pickled by submitit): train `config` with `overrides`."""

    def __init__(self, config: str, overrides: list[str]):
        self.config = config
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from .config import load_config
        from .training.distributed import rendezvous
        from .training.trainer import Preempted
        from .train import StopSignals, run

        cfg = load_config(self.config, self.overrides)
        rdv = rendezvous()
        stop = StopSignals()  # replaces submitit's handlers, which it installed before calling us
        try:
            result = run(cfg, rdv=rdv, stop=stop.event)
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


def default_cpus_per_task(cfg: Config) -> int:
    """data.workers + RESERVED_CPUS; 1 without data threads (the training thread loads the data)."""
    return cfg.data.workers + RESERVED_CPUS if cfg.data.workers else 1


def data_budget(cfg: Config, resources: Resources) -> tuple[int, str | None]:
    """(data.workers for each task: its CPUs − RESERVED_CPUS; a warning when the node's
    CPUs cannot feed its GPUs at the model's rate, or None)."""
    cpus = resources.cpus_per_task or default_cpus_per_task(cfg)
    workers = max(0, cpus - RESERVED_CPUS) if resources.cpus_per_task else cfg.data.workers
    if not resources.gpus_per_node or cfg.model.name not in GPU_IMAGES_PER_S:
        return workers, None
    path = "torchvision" if cfg.data.backend == "torchvision" else (
        "dali-cpu" if cfg.data.dali_device == "cpu" else "dali-gpu")
    fed = resources.tasks_per_node * workers * HOST_IMAGES_PER_CORE[path]
    needed = resources.gpus_per_node * GPU_IMAGES_PER_S[cfg.model.name]
    if fed >= needed:
        return workers, None
    return workers, (
        f"warning: {resources.tasks_per_node} task(s) × {workers} data thread(s) ({cpus} CPUs per task − {RESERVED_CPUS})"
        f" feed about {fed:,} images/s per node with {path} ({HOST_IMAGES_PER_CORE[path]:,} per core), but its"
        f" {resources.gpus_per_node} GPU(s) train {cfg.model.name} at about {needed:,}: the GPUs will wait for data."
        f" Give each task more CPUs (--cpus-per-task {RESERVED_CPUS + -(-needed // (resources.tasks_per_node * HOST_IMAGES_PER_CORE[path]))})"
        + (", or decode on the GPU (data.dali_device: gpu)" if path != "dali-gpu" else "")
    )


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


def plan_resources(cfg: Config, nodes: int = 1, gpus_per_node: int | None = None, tasks_per_node: int | None = None,
                   cpus_per_task: int | None = None, partition_name: str | None = None, time_min: int | None = None,
                   max_requeues: int = 3, partition: Partition | None = None) -> tuple[Resources, list[str]]:
    """The request to submit: the flags as given, the rest defaulted to fit `partition` (None: not
    known, e.g. a dry run away from the cluster). Returns it with notes on the defaults chosen;
    raises ConfigError, one line saying what was asked, what the partition has and which flag to
    change, when it can never run there."""
    notes = []
    if gpus_per_node is None:
        if cfg.run.device == "cpu":
            gpus_per_node = 0
        elif partition is not None and partition.gpus_per_node == 0:
            if cfg.run.device == "cuda":
                raise ConfigError(f"run.device is 'cuda' and {partition.describe()}; choose a --partition with GPUs,"
                                  " or --set run.device=cpu")
            gpus_per_node = 0
            notes.append(f"CPU tasks, as run.device is 'auto' and {partition.describe()}")
        else:  # a GPU config gets GPUs, or its tasks would train on the CPU
            gpus_per_node = tasks_per_node or 1
            notes.append(f"{gpus_per_node} GPU(s) per node (run.device is {cfg.run.device!r}); --gpus-per-node G for"
                         " more (one task each), 0 for CPU tasks")
    if time_min is None:
        time_min = DEFAULT_TIME_MIN
        if partition is not None and partition.max_time_min is not None and partition.max_time_min < time_min:
            time_min = partition.max_time_min
            notes.append(f"--time {time_min}: the time limit of partition {partition.name} (jobs are requeued past it)")
    resources = Resources(nodes, gpus_per_node, tasks_per_node, cpus_per_task, partition_name, time_min, max_requeues)
    if partition is None:
        return resources, notes

    tasks, gpus = resources.tasks_per_node, resources.gpus_per_node
    if resources.cpus_per_task is None:  # data threads + the training and NCCL threads, if a node has them
        wanted = default_cpus_per_task(cfg)
        # (if the partition cannot give `nodes` such nodes, the check below says so; cap by a node it has)
        per_node = partition.cpus_on(min(nodes, len(partition.nodes)), gpus) or partition.cpus_per_node
        resources.cpus_per_task = max(1, min(wanted, per_node // tasks))
        if resources.cpus_per_task < wanted:
            notes.append(f"--cpus-per-task {resources.cpus_per_task} (data.workers + 2 = {wanted} capped by the"
                         f" {per_node} CPUs of a node of partition {partition.name} at {tasks} task(s) per node)")
    cpus = tasks * resources.cpus_per_task
    fitting = partition.fits(cpus, gpus)
    if len(fitting) < nodes:
        asked = (f"--nodes {nodes} × --tasks-per-node {tasks} × --cpus-per-task {resources.cpus_per_task}"
                 + (f" with --gpus-per-node {gpus}" if gpus else ""))
        most_cpus = partition.cpus_on(1, gpus) if partition.fits(1, gpus) else partition.cpus_per_node
        if nodes > len(partition.nodes):
            change = f"--nodes (at most {len(partition.nodes)})"
        elif gpus > partition.gpus_per_node:
            change = (f"--gpus-per-node (at most {partition.gpus_per_node})" if partition.gpus_per_node else
                      "--gpus-per-node to 0 (CPU tasks)") + " or --partition"
        elif cpus > most_cpus:
            change = (f"--cpus-per-task (at most {most_cpus // tasks} at {tasks} task(s) per node)" if most_cpus >= tasks
                      else f"--tasks-per-node (at most {most_cpus})")
        else:
            change = f"--nodes (only {len(fitting)} of its nodes have {cpus} CPUs" + (f" and {gpus} GPUs" if gpus else "") + ")"
        raise ConfigError(f"{asked} cannot run on {partition.describe()}; change {change}")
    if partition.max_time_min is not None and time_min > partition.max_time_min:
        raise ConfigError(f"--time {time_min}: partition {partition.name} allows at most {partition.max_time_min} minutes"
                          " per job; lower --time (a run that needs longer is requeued and resumes)")
    up = [node for node in fitting if node.up]
    if len(up) < nodes:
        notes.append(f"only {len(up)} of the {len(fitting)} nodes that fit are up"
                     f" ({', '.join(f'{n.name} {n.state}' for n in fitting if not n.up)}): the job waits for {nodes}")
    if not partition.available:
        notes.append(f"partition {partition.name} is not up: the job waits until it is")
    return resources, notes


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
