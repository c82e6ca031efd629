"""The train and val loaders the trainer iterates: sharding and labels here, decoding in a back-end.

A back-end turns batches of sample indices into image tensors and nothing more; it is told the
epoch (None for val) so it can look up each sample's crop in the CropPlan. Labels and validity
masks never pass through it: the host already knows them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from .samples import Samples
from .sampling import epoch_order, shard, split_batches


class Backend(Protocol):
    name: str  # "dali-cpu", "dali-gpu" or "torchvision"

    def images(self, batches: list[np.ndarray], epoch: int | None) -> Iterator[torch.Tensor]:
        """One float32 N×3×S×S normalized tensor per batch, in order, on the loaders' device."""


class TrainLoader:
    """`len()` batches per epoch on every rank; `epoch(e, start_batch)` yields (images, labels)."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device):
        self.samples, self.backend, self.batch_size = samples, backend, batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.samples) / self.world_size) / self.batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in the order they are batched."""
        return shard(epoch_order(len(self.samples), self.seed, epoch), self.rank, self.world_size)[0]

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside the epoch's 0..{len(self)} batches")
        batches = split_batches(self.indices(epoch), self.batch_size)[start_batch:]
        return self._pairs(batches, epoch)

    def _pairs(self, batches, epoch):
        for batch, images in zip(batches, self.backend.images(batches, epoch), strict=True):
            yield images, torch.from_numpy(self.samples.labels[batch]).to(self.device, non_blocking=True)


class ValLoader:
    """Iterating yields (images, labels, valid); `valid` is False on wrapped-around padding, so the
    valid samples of all ranks together are the val set, each image once. Every rank has `len()`
    batches."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 device: torch.device):
        self.samples, self.backend, self.batch_size, self.device = samples, backend, batch_size, device
        self.indices, self.valid = shard(np.arange(len(samples)), rank, world_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = split_batches(self.indices, self.batch_size)
        valid = split_batches(self.valid, self.batch_size)
        for batch, mask, images in zip(batches, valid, self.backend.images(batches, None), strict=True):
            labels = torch.from_numpy(self.samples.labels[batch]).to(self.device, non_blocking=True)
            yield images, labels, torch.from_numpy(mask).to(self.device, non_blocking=True)
