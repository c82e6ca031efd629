"""The torchvision back-end: PIL decodes in DataLoader worker processes that live as long as the loader.

The main process plans each epoch in one go — which sample fills each slot (the index's bad images
replaced, `integrity.fill_slots`) and every crop window (`CropWindows.boxes`, from the index's image
sizes) — and hands the workers keys that carry all of it, so a worker only reads, decodes, crops
and resizes. The workers are started once (persistent_workers) and serve every epoch; the keys, not
the workers, change. They send uint8 N×S×S×3 batches (a quarter of the bytes of float32); the
loaders normalise them on the device. Each sample's crop comes from the CropWindows, keyed by (seed,
epoch, index), so the number of workers does not change a single pixel. An image only a decoder
finds bad (integrity.decode_rgb fails) is replaced in the worker by integrity.first_good's choice,
cropped for its own size, and reported with the batch, so no worker ever raises for bad data.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .augment import CropWindows
from .integrity import BadImage, decode_rgb, fill_slots, first_good, inspect_image, read_bytes
from .loaders import Batch
from .parallel import ignore_interrupts
from .samples import Samples


class _CroppedImages(Dataset):
    """Key (epoch, slot, sample, box) → (the crop as a uint8 S×S×3 RGB tensor, the sample decoded,
    the bad samples met, the bytes read). `sample` is the slot's planned filler and `box` its
    window; if its decoder fails, the next good sample fills the slot, with the crop drawn for the
    slot's index on the new image's size."""

    def __init__(self, paths: list[str], windows: CropWindows, index_bad: Mapping[int, str], decode: bool):
        self.paths, self.windows, self.index_bad, self.decode = paths, windows, index_bad, decode
        self.found_bad: dict[int, str] = {}  # this worker's own finds, to try them once only

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> tuple[Image.Image | None, int]:
        data = read_bytes(self.paths[index])
        if not self.decode:
            inspect_image(data)
            return None, len(data)
        return decode_rgb(data), len(data)  # grayscale, CMYK and PNG → RGB

    def __getitem__(self, key) -> tuple[torch.Tensor, int, list[tuple[int, str]], int]:
        epoch, slot, index, box = key
        try:
            image, size = self._load(index)
            bad = []
        except BadImage as error:
            self.found_bad[index] = str(error)
            index, (image, size), bad = first_good(index, len(self.paths), ChainMap(self.found_bad, self.index_bad),
                                                  self._load)
            bad = [(key[2], str(error))] + bad
            self.found_bad.update(bad)
            box = self.windows.box(epoch, slot, *image.size) if image is not None else box
        if image is None:
            return torch.empty(0, dtype=torch.uint8), index, bad, size
        side = [self.windows.image_size, self.windows.image_size]
        image = F.resized_crop(image, box.top, box.left, box.height, box.width, side,
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
        if box.flip:
            image = F.horizontal_flip(image)
        return torch.from_numpy(np.array(image)), index, bad, size


def _collate(items):
    images, indices, bad, sizes = zip(*items)
    return (torch.stack(images), torch.tensor(indices, dtype=torch.int64), [b for found in bad for b in found],
            torch.tensor(sizes, dtype=torch.int64))


class _Keys:
    """The DataLoader's batch sampler: whatever list of key batches it is given for this pass."""

    def __init__(self):
        self.batches: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionBackend:
    name = "torchvision"

    def __init__(self, samples: Samples, windows: CropWindows, workers: int, device: torch.device,
                 channels_last: bool, decode: bool = True):
        self.samples, self.windows, self.channels_last = samples, windows, channels_last
        self.scaling = windows.scaling  # the loaders normalise with it (data.augment)
        self.keys = _Keys()
        dataset = _CroppedImages(samples.paths, windows, samples.bad, decode)
        # a private generator: the DataLoader draws a worker base seed from it (unused: crops come
        # from the CropWindows), which would otherwise advance the global RNG that dropout uses and
        # make a resumed run differ from an uninterrupted one. The workers start at the first pass
        # and stay (persistent_workers): a fresh set per epoch would re-import torch each time.
        self.loader = DataLoader(dataset, batch_sampler=self.keys, num_workers=workers, collate_fn=_collate,
                                 pin_memory=device.type == "cuda", generator=torch.Generator(),
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                                 worker_init_fn=ignore_interrupts if workers > 0 else None)

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        if not batches:
            return
        slots = np.concatenate(batches)
        bad = ChainMap(dict(known_bad), self.samples.bad)
        filled, met = fill_slots(slots, len(self.samples), bad, known_bad)
        boxes = self.windows.boxes(epoch, slots, self.samples.widths[filled], self.samples.heights[filled])
        keys, start = [], 0
        for batch in batches:
            keys.append([(epoch, int(slots[p]), int(filled[p]), boxes[p]) for p in range(start, start + len(batch))])
            start += len(batch)
        self.keys.batches = keys
        start = 0
        for images, indices, found, sizes in self.loader:
            planned = [b for p in range(start, start + len(indices)) for b in met.get(p, ())]
            start += len(indices)
            yield Batch(images if images.numel() else None, indices.numpy(), planned + found, sizes.numpy())
