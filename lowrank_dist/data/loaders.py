"""The train and val loaders the trainer iterates: sharding and labels here, decoding in a back-end.

A back-end turns batches of sample indices into image tensors and nothing more; it is told the
epoch (None for val) so it can look up each sample's crop in the CropPlan. Labels and validity
masks never pass through it: the host already knows them. The one thing a back-end reports back
is which sample it decoded into each slot — the slot's own, or, where that image is bad, the
replacement `integrity` prescribes — so the label is always the decoded image's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import NamedTuple, Protocol

import numpy as np
import torch

from .integrity import ON_BAD_IMAGE, Skipped
from .samples import DataError, Samples
from .sampling import epoch_order, shard, split_batches


class Batch(NamedTuple):
    images: torch.Tensor  # float32 N×3×S×S, normalized, on the loaders' device
    indices: np.ndarray  # the sample decoded into each slot: the slot's own unless that one is bad
    bad: list[tuple[int, str]]  # bad samples met while filling the batch: (index, why)


class Backend(Protocol):
    name: str  # "dali-cpu", "dali-gpu" or "torchvision"

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        """One Batch per batch, in order. A bad sample's slot holds integrity.first_good's choice;
        `known_bad` (index → why) need not be tried again."""


class _BadImages:
    """The loader's side of `on_bad_image`: stop at the first bad image, or remember and count them."""

    def __init__(self, paths: list[str], on_bad_image: str):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.paths, self.on_bad_image = paths, on_bad_image
        self.known: dict[int, str] = {}
        self.skipped = Skipped()

    def indices(self, batch: np.ndarray, decoded: Batch) -> np.ndarray:
        """The samples really in `decoded` (for labels), after applying the policy to its bad ones."""
        for index, why in decoded.bad:
            path = self.paths[index]
            if self.on_bad_image == "error":
                raise DataError(
                    f"bad image {path!r}: {why} (data.on_bad_image is 'error'; set it to 'skip' to train"
                    " without such files, or list them all with python -m lowrank_dist.data.check DATA_ROOT)"
                )
            self.known[index] = why
            self.skipped.reasons.setdefault(path, why)
        self.skipped.count += int(np.count_nonzero(decoded.indices != batch))
        return decoded.indices


class TrainLoader:
    """`len()` batches per epoch on every rank; `epoch(e, start_batch)` yields (images, labels);
    `skipped` counts the bad images replaced so far on this rank (on_bad_image "skip")."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device, on_bad_image: str = "error"):
        self.samples, self.backend, self.batch_size = samples, backend, batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.bad = _BadImages(samples.paths, on_bad_image)

    @property
    def skipped(self) -> Skipped:
        return self.bad.skipped

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
        for batch, decoded in zip(batches, self.backend.images(batches, epoch, self.bad.known), strict=True):
            indices = self.bad.indices(batch, decoded)
            yield decoded.images, torch.from_numpy(self.samples.labels[indices]).to(self.device, non_blocking=True)


class ValLoader:
    """Iterating yields (images, labels, valid); `valid` is False on wrapped-around padding and on
    the replacement of a bad image, so the valid samples of all ranks together are the val set's
    good images, each once. Every rank has `len()` batches; `skipped` as in TrainLoader."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 device: torch.device, on_bad_image: str = "error"):
        self.samples, self.backend, self.batch_size, self.device = samples, backend, batch_size, device
        self.indices, self.valid = shard(np.arange(len(samples)), rank, world_size)
        self.bad = _BadImages(samples.paths, on_bad_image)

    @property
    def skipped(self) -> Skipped:
        return self.bad.skipped

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = split_batches(self.indices, self.batch_size)
        valid = split_batches(self.valid, self.batch_size)
        decoded_batches = self.backend.images(batches, None, self.bad.known)
        for batch, mask, decoded in zip(batches, valid, decoded_batches, strict=True):
            indices = self.bad.indices(batch, decoded)
            labels = torch.from_numpy(self.samples.labels[indices]).to(self.device, non_blocking=True)
            mask = mask & (indices == batch)  # a replacement is a duplicate: not counted
            yield decoded.images, labels, torch.from_numpy(mask).to(self.device, non_blocking=True)
