"""Launching a training run: on a SLURM cluster through submitit, as N local processes, or in this
process. `launch/submit.py` is the command line; this module is what it calls.

On SLURM every task runs `TrainJob`, submitit's Checkpointable: the task finds its rank
(engine.distributed.rendezvous reads submitit's JobEnvironment), joins the process group and
trains. Before the time limit SLURM sends USR2 (`--signal=USR2@120`; not USR1, which NCCL uses):
every rank finishes its optimizer step, the step is checkpointed, and submitit requeues the job,
whose restart resumes from that checkpoint. Preemption, `scontrol requeue` and `scancel` send TERM
(then KILL after KillWait): the same checkpoint-and-stop, and SLURM requeues (or not) by itself. A
task killed without warning restarts from the last periodic checkpoint (run.checkpoint_every).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError

REQUEUE_SIGNAL = "USR2"
SIGNAL_LEAD_S = 120  # seconds before the time limit that SLURM warns the job

# The CPU budget of one task (one GPU): the training thread and NCCL's/DALI's executor threads get 2
# CPUs, DALI's worker threads (or DataLoader workers) the rest — data.workers = CPUs per task − 2.
RESERVED_CPUS = 2
# Images/s one H200 trains at bf16 (DESIGN.md §2, the faster of dense and low-rank): the rate a node's
# CPUs must feed each of its GPUs at.
GPU_IMAGES_PER_S = {"alexnet": 36_128, "vgg16": 5_710, "googlenet": 6_701}
# Images per CPU-second the host side of each data path sustains (python -m lowrank_dist.data.bench,
# 500×375 JPEGs in page cache, 2-core CPU; README "Data loading speed"): with DALI on the GPU the
# host reads and plans (--no-decode: ~17,000, taken as 15,000 for nvJPEG's host-side share, which no
# GPU here could measure); on the CPU it also decodes, crops and resizes.
HOST_IMAGES_PER_CORE = {"dali-gpu": 15_000, "dali-cpu": 400, "torchvision": 330}


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None  # default: default_cpus_per_task
    partition: str | None = None
    time_min: int = 60 * 24
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
        from .engine.distributed import rendezvous
        from .engine.trainer import Preempted
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


def run_local(config: str, overrides: list[str], processes: int) -> int:
    """`processes` ranks on this machine through torchrun (it sets RANK/WORLD_SIZE/MASTER_* and stops
    every rank when one fails); the exit code of the group."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "lowrank_dist.train", "--config", config]
    for override in overrides:
        command += ["--set", override]
    return subprocess.call(command)
