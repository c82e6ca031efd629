"""Where this process sits in the job, and the process group: the only place that knows how we
were launched.

    rdv = rendezvous()                       # submitit, srun, torchrun or a plain single process
    with process_group(rdv, "cpu") as ctx:   # gloo on the CPU, NCCL on GPUs
        fit(cfg, ctx)

`rendezvous` reads the environment in this order:
  1. torchrun (or anything that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) — also `--local`;
  2. a submitit job (SUBMITIT_EXECUTOR is set): submitit.helpers.TorchDistributedEnvironment;
  3. an `srun` step (SLURM_STEP_NUM_TASKS is set; the sbatch script itself is not a step, so a
     `python -m lowrank_dist.train` run directly in it is one process): SLURM_PROCID and friends,
     the master is the step's first node (`scontrol show hostnames`), the port derived from the job id;
  4. otherwise one process.
The trainer only sees a DistContext: its rank, sums across ranks, whether it writes logs.
"""

from __future__ import annotations

import datetime
import os
import random
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Rendezvous:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "torchrun", "submitit", "srun" or "single"


def _port_for_job(job_id: str) -> int:
    """A port every task of a job agrees on without talking: a function of the job id (the rule
    submitit's TorchDistributedEnvironment uses too)."""
    return random.Random(job_id).randint(20000, 60000)


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as 'gpu[003-004,010],cpu1'."""
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30, check=True)
        return done.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        head = nodelist.split(",")[0]  # no scontrol here: expand the first range by hand
        if "[" in head:
            prefix, ranges = head.split("[", 1)
            return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]
        return head


def rendezvous(env: Mapping[str, str] | None = None) -> Rendezvous:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Rendezvous(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if env.get("SUBMITIT_EXECUTOR") and env is os.environ:
        # submitit (an optional extra) reads its own job, with _port_for_job's port rule. Never its
        # export(): it would set RANK, … and CUDA_VISIBLE_DEVICES (docs/design.md#rendezvous).
        from submitit.helpers import TorchDistributedEnvironment

        job = TorchDistributedEnvironment()
        return Rendezvous(job.rank, job.local_rank, job.world_size, job.master_addr, job.master_port, "submitit")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _port_for_job(env.get("SLURM_JOB_ID", "0"))
        return Rendezvous(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_STEP_NUM_TASKS"]),
                          env.get("MASTER_ADDR") or _first_host(nodelist), port, "srun")
    return Rendezvous()


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    grouped: bool = False  # a process group exists although world_size is 1 (process_group's group_of_one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the collectives run: several ranks, or a group of one made on purpose."""
        return self.world_size > 1 or self.grouped

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over all ranks (in place; a no-op in one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_buffers(self, model: nn.Module) -> None:
        """Make BN running statistics the same on every rank: the mean of the ranks' estimates.

        Each rank's running mean/var tracks the batches it saw; their average is the estimate over
        all of them. Done before evaluating and checkpointing, so every rank evaluates the same
        model and a checkpoint does not depend on which rank wrote it."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(self.world_size)

    @contextmanager
    def buffers_averaged(self, model: nn.Module) -> Iterator[None]:
        """Inside, every rank holds the ranks' mean BN statistics (average_buffers: what the run
        evaluates, saves as its model and exports); after, each rank holds its own again, bit for
        bit. Evaluating or saving must not change the run: a run stopped and resumed from a step an
        uninterrupted run never saved has to continue from the same per-rank statistics."""
        if not self.distributed:
            yield
            return
        own = [(buffer, buffer.clone()) for buffer in model.buffers() if buffer.is_floating_point()]
        self.average_buffers(model)
        try:
            yield
        finally:
            for buffer, kept in own:
                buffer.copy_(kept)

    def gather_buffers(self, model: nn.Module) -> list[dict[str, torch.Tensor]] | None:
        """Every rank's own floating-point buffers (BN running statistics) by name, rank by rank, on
        the CPU; None in one process. Collective: every rank calls it."""
        if not self.distributed:
            return None
        ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world_size)]
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point():
                copies = [torch.empty_like(buffer) for _ in range(self.world_size)]
                dist.all_gather(copies, buffer.contiguous())
                for rank, copy in enumerate(copies):
                    ranks[rank][name] = copy.cpu()
        return ranks

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.distributed:
            return bool(flag)
        votes = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            votes = votes.cuda()
        dist.all_reduce(votes, op=dist.ReduceOp.SUM)
        return bool(votes.item() > 0)

    def broadcast_parameters(self, model: nn.Module, source: int = 0) -> None:
        """Every rank takes `source`'s parameters (e.g. after an in-place re-projection)."""
        if self.distributed:
            for param in model.parameters():
                dist.broadcast(param.data, src=source)

    def broadcast_object(self, value, source: int = 0):
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=source)
        return box[0]


@contextmanager
def process_group(rdv: Rendezvous, device_type: str, timeout_s: float = 600.0,
                  group_of_one: bool = False) -> Iterator[DistContext]:
    """The process group for `rdv` (none for a single process): NCCL between GPUs, gloo on CPUs.

    `timeout_s` bounds every collective: a rank that died mid-step makes the others fail with an
    error within that time instead of hanging for the default 30 minutes. `group_of_one` makes the
    group for a single process too, and its context says distributed, so DDP, the sync points'
    all-reduce and the evaluation's sums run through the backend as with several ranks: how
    tests/gpu/ checks NCCL on a machine with one GPU (NCCL refuses two ranks on one device)."""
    ctx = DistContext(rdv.rank, rdv.world_size, rdv.local_rank, grouped=group_of_one and rdv.world_size == 1)
    if rdv.world_size == 1 and not group_of_one:
        yield ctx
        return
    if device_type == "cuda":
        torch.cuda.set_device(rdv.local_rank)
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://{rdv.master_addr}:{rdv.master_port}", rank=rdv.rank,
        world_size=rdv.world_size, timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing because a peer is gone or silent (gloo's connection
    errors and timeouts, NCCL's, torch.distributed's), rather than a bug to show in full."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    signs = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Timed out", "timed out",
             "NCCL", "gloo")
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in signs)
