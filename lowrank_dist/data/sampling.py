"""Which samples each rank reads, and in what order: pure functions of (seed, epoch), shared by
every back-end; how each sample is cropped is `augment`'s.

Keeping every random choice on the host, keyed by the sample rather than drawn from a stream,
buys three things: a resumed epoch (`start_batch`) sees exactly the batches it would have seen,
without decoding the batches before it; the result does not depend on the number of workers or
threads; and DALI and torchvision crop the same window of the same image (`augment`).

Train sharding, per epoch e (DistributedSampler's scheme):
    order   = a random permutation of the N train samples, seeded by seed + e
    padded  = order, wrapped around to length ceil(N / W)·W   (the first few samples repeat)
    rank r  = padded[r], padded[r + W], padded[r + 2W], …     (ceil(N / W) samples on every rank)
and each rank cuts its list into batches of batch_size, keeping the last partial one, so every
rank has ceil(ceil(N / W) / batch_size) batches. Val sharding is the same without the shuffle; the
wrapped duplicates are marked invalid, so summed over ranks every val image counts exactly once.

Bad images move none of this: their slots stay, filled by `integrity`'s replacement rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=generator).numpy()


def shard(order: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank `rank`'s sample indices and which of them are real (not wrapped-around padding)."""
    per_rank = math.ceil(len(order) / world_size)
    positions = np.arange(rank, per_rank * world_size, world_size)
    return order[positions % len(order)], positions < len(order)


def split_batches(indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
