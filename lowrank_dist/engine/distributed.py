"""What the trainer needs to know about the process group, and nothing about how it was started.

A single process is the default; the launcher (SLURM, torchrun, submitit) builds a DistContext
once, and the trainer only asks it for its rank, for sums across ranks and whether to write logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over all ranks (in place; a no-op in one process)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def select_device(requested: str, dist_ctx: DistContext) -> torch.device:
    """'auto' → the local GPU when there is one, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("run.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
        torch.cuda.set_device(dist_ctx.local_rank)
        return torch.device("cuda", dist_ctx.local_rank)
    return torch.device("cpu")
