"""Fitting a run's request to a SLURM partition: nodes, tasks, CPUs and GPUs per task, the time
limit, and how many data workers the CPUs per task can feed (`plan_resources`, `data_budget`).
Defaults fit what the partition has (slurm.query_partition): CPU tasks on a partition without
GPUs, CPUs per task capped by a node's; a request that cannot run there is refused in one line
naming the flag to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, ConfigError
from .slurm import Partition

DEFAULT_TIME_MIN = 60 * 24

SIGNAL_LEAD_S = 120  # seconds before the time limit that SLURM warns the job

# The CPU budget of one task (one GPU): the training thread and NCCL's/DALI's executor threads get 2
# CPUs, DALI's worker threads (or DataLoader workers) the rest — data.workers = CPUs per task − 2.
RESERVED_CPUS = 2
# Train-step images/s of one H200 at bf16, the faster of dense and all-factorized at the authors' ranks
# (VGG-16 compiled, the others eager; docs/benchmarks.md#training-speed-on-one-h200): the rate a node's CPUs must feed each GPU at.
GPU_IMAGES_PER_S = {"alexnet": 36_128, "vgg16": 5_710, "googlenet": 6_701}
# Images per CPU-second the host side of each data path sustains (python bench/loaders.py, 500×375
# JPEGs in page cache, 2-core CPU, otherwise idle; docs/benchmarks.md#data-loading): with DALI on the GPU
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


