"""The train and val loaders the trainer iterates: sharding, labels and normalisation here, reading
and decoding in a back-end.

A back-end turns batches of sample indices into uint8 N×S×S×3 crops and nothing more; it is told
the epoch (None for val) so it can look up each sample's crop window (`augment.CropWindows`).
Labels and validity masks never pass through it: the host already knows them. What a back-end reports back is which
sample it decoded into each slot — the slot's own, or, where that image is bad, the replacement
`integrity` prescribes — so the label is always the decoded image's own, and how many bytes it
read for each, which the loaders hold against the index (a file rewritten since it was indexed).

Normalisation happens here, on the loaders' device: (x − 255·mean) / (255·std) per channel, from
uint8 (a quarter of float32's bytes to move) into one of a few float32 output buffers that are
reused once the consumer has let go of them (`_Normalise`), so no batch allocates fresh memory.

Each pass runs in a background thread (`Ahead`) that keeps AHEAD batches ready, so what a back-end
does on the host per batch overlaps the step; the training thread only takes the next batch,
checks it and normalises it.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple, Protocol

import numpy as np
import torch

from ..runtime import storage_holders
from .augment import input_scaling
from .integrity import Replaced
from .samples import DataError, Samples
from .sampling import epoch_order, shard, split_batches


class Batch(NamedTuple):
    images: torch.Tensor | None  # uint8 N×S×S×3 on the CPU or the GPU; None if the back-end only reads
    indices: np.ndarray  # the sample decoded into each slot: the slot's own unless that one is bad
    bad: list[tuple[int, str]]  # bad samples met while filling the batch: (index, why)
    sizes: np.ndarray  # the bytes read for each slot's sample


class Backend(Protocol):
    name: str  # "dali-cpu", "dali-gpu" or "torchvision"

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        """One Batch per batch, in order. A bad sample's slot holds integrity.first_good's choice
        (integrity.fill_slots, for the bad samples known before the pass);
        `known_bad` (index → why) need not be tried again, nor reported."""


class BufferRing:
    """Reusable tensors of one dtype on one device: `get(shape)` returns one that nothing outside the
    ring holds any more (its consumer dropped every view of it), else a new one, which replaces the
    oldest once the ring has `size`; so in steady state no batch allocates memory, and a consumer
    that keeps a batch still gets its own."""

    def __init__(self, device: torch.device, dtype: torch.dtype, size: int,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device, self.dtype, self.size, self.memory_format = device, dtype, size, memory_format
        self.ring: list[torch.Tensor] = []

    def get(self, shape: tuple[int, ...]) -> torch.Tensor:
        for buffer in self.ring:
            if buffer.shape == shape and storage_holders(buffer) == 2:  # the ring's own reference only (+ the call's)
                return buffer
        buffer = torch.empty(shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        self.ring = (self.ring + [buffer])[-self.size:]  # the oldest dropped is kept alive by its holder
        return buffer


class _Normalise:
    """uint8 N×S×S×3 (any device) → float32 N×3×S×S on `device`, normalised, contiguous or
    channels_last, written into a BufferRing of 3 (the batch the step uses, the one being
    normalised, one to spare)."""

    def __init__(self, device: torch.device, channels_last: bool, scaling=None, size: int = 3):
        self.device = device
        self.buffers = BufferRing(device, torch.float32, size,
                                  torch.channels_last if channels_last else torch.contiguous_format)
        # (mean, std) per channel in 0..255 units: the back-end's (data.augment's, CIFAR's), else ImageNet's
        mean, std = scaling or input_scaling("inception")
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # a channels_last view
        out = self.buffers.get(tuple(images.shape))
        torch.sub(images, self.mean, out=out)  # uint8 − float: computed in float32
        # a view: its own TensorImpl on the buffer's storage, which the ring counts while it is alive
        return out.div_(self.std).detach()


AHEAD = 2  # batches a back-end prepares ahead of the one the step uses
_END = object()


class Ahead:
    """Iterates `items` in a daemon thread, up to `depth` items ahead of the consumer, so that what a
    back-end does on the host per batch (DALI's bookkeeping, resizing, a DataLoader's collation)
    overlaps the training step instead of adding to it. Items and the exception that ended the
    iteration arrive in order. `close()` (also on garbage collection of the loaders' generators)
    stops the thread and closes `items` there, so a pass left early releases its pipeline before
    the next one starts."""

    def __init__(self, items: Iterator, depth: int = AHEAD):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(items,), name="lowrank-data", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterator) -> None:
        # No torch.set_num_threads here: besides this thread's OpenMP count it resizes pools that
        # every thread shares, under the training thread's running ops.
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, raised where it reaches it
            self._put(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is _END:
            self.queue.put(_END)  # a later next() stops again
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.05)  # unblock a pending put
            except queue.Empty:
                pass
        self.thread.join()


class _BadImages:
    """The loader's side of `on_bad_image`: stop at the first bad image, or remember and count them."""

    def __init__(self, paths: list[str], on_bad_image: str):
        self.paths, self.on_bad_image = paths, on_bad_image
        self.known: dict[int, str] = {}
        self.replaced = Replaced()

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
            self.replaced.reasons.setdefault(path, why)
        self.replaced.count += int(np.count_nonzero(decoded.indices != batch))
        return decoded.indices


def check_sizes(samples: Samples, indices: np.ndarray, sizes: np.ndarray) -> None:
    """A DataError if a file read is not the size the index recorded: it was rewritten since."""
    if samples.sizes is None:
        return
    changed = np.flatnonzero(samples.sizes[indices] != sizes)
    if len(changed):
        index = int(indices[changed[0]])
        raise DataError(
            f"image {samples.paths[index]!r} is {int(sizes[changed[0]])} bytes, the data index says"
            f" {int(samples.sizes[index])}: it changed since the index was built; rebuild the index with"
            " python -m lowrank_dist.data.index DATA_ROOT --rebuild"
        )


class _Passes:
    """One back-end's passes, each prepared `AHEAD` batches ahead in a background thread (Ahead). A
    back-end runs one pass at a time (a DataLoader's workers, a DALI pipeline), so a pass still in
    flight, left by a consumer that stopped early and not yet collected, is stopped before the next
    starts. The back-end gets a copy of the bad images known now: the consumer adds to them while
    the thread reads."""

    def __init__(self, backend: Backend):
        self.backend, self.current = backend, None

    @contextmanager
    def run(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Ahead]:
        if self.current is not None:
            self.current.close()
        self.current = ahead = Ahead(self.backend.images(batches, epoch, dict(known_bad)), AHEAD)
        try:
            yield ahead
        finally:
            ahead.close()


class _Loader:
    """What both loaders share: the samples, their back-end, the bad-image policy and the
    normalisation on the device. `replaced` counts the bad images replaced so far on this rank
    (on_bad_image "skip")."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, device: torch.device, on_bad_image: str):
        self.samples, self.backend, self.batch_size, self.device = samples, backend, batch_size, device
        self.bad = _BadImages(samples.paths, on_bad_image)
        self.normalise = _Normalise(device, getattr(backend, "channels_last", False), getattr(backend, "scaling", None))
        self.passes = _Passes(backend)

    @property
    def replaced(self) -> Replaced:
        return self.bad.replaced


class TrainLoader(_Loader):
    """`len()` batches per epoch on every rank; `epoch(e, start_batch)` yields (images, labels)."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device, on_bad_image: str = "error"):
        super().__init__(samples, backend, batch_size, device, on_bad_image)
        self.rank, self.world_size, self.seed = rank, world_size, seed

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
        with self.passes.run(batches, epoch, self.bad.known) as decoded_batches:
            for batch, decoded in zip(batches, decoded_batches, strict=True):
                indices = self.bad.indices(batch, decoded)
                check_sizes(self.samples, indices, decoded.sizes)
                images = None if decoded.images is None else self.normalise(decoded.images)
                yield images, torch.from_numpy(self.samples.labels[indices]).to(self.device, non_blocking=True)


class ValLoader(_Loader):
    """Iterating yields (images, labels, valid); `valid` is False on wrapped-around padding and on
    the replacement of a bad image, so the valid samples of all ranks together are the val set's
    good images, each once. Every rank has `len()` batches."""

    def __init__(self, samples: Samples, backend: Backend, batch_size: int, rank: int, world_size: int,
                 device: torch.device, on_bad_image: str = "error"):
        super().__init__(samples, backend, batch_size, device, on_bad_image)
        self.indices, self.valid = shard(np.arange(len(samples)), rank, world_size)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = split_batches(self.indices, self.batch_size)
        valid = split_batches(self.valid, self.batch_size)
        with self.passes.run(batches, None, self.bad.known) as decoded_batches:
            for batch, mask, decoded in zip(batches, valid, decoded_batches, strict=True):
                indices = self.bad.indices(batch, decoded)
                check_sizes(self.samples, indices, decoded.sizes)
                labels = torch.from_numpy(self.samples.labels[indices]).to(self.device, non_blocking=True)
                mask = mask & (indices == batch)  # a replacement is a duplicate: not counted
                images = None if decoded.images is None else self.normalise(decoded.images)
                yield images, labels, torch.from_numpy(mask).to(self.device, non_blocking=True)
