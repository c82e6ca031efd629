"""The torchvision back-end: PIL decodes in DataLoader worker processes, the device normalizes.

Workers send uint8 N×S×S×3 batches (a quarter of the bytes of float32); the main process moves
them to the device, where one permute makes them N×3×S×S in channels_last memory order for free,
and converts and normalizes there. Each sample's crop comes from the CropPlan, keyed by
(seed, epoch, index), so the number of workers does not change a single pixel. A bad image
(integrity.decode_rgb fails) is replaced in the worker by integrity.first_good's choice and
reported with the batch, so no worker ever raises for bad data.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .integrity import decode_rgb, first_good, read_bytes
from .loaders import Batch
from .samples import Samples
from .sampling import IMAGENET_MEAN, IMAGENET_STD, CropPlan


class _CroppedImages(Dataset):
    """Item (epoch, index) → (the crop as a uint8 S×S×3 RGB tensor, the index decoded, the bad
    samples met), epoch None for the val crop. The crop is drawn for the slot's index, also when a
    replacement fills it."""

    def __init__(self, paths: list[str], plan: CropPlan, known_bad: Mapping[int, str]):
        self.paths, self.plan, self.known_bad = paths, plan, known_bad

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> Image.Image:
        return decode_rgb(read_bytes(self.paths[index]))  # grayscale, CMYK and PNG → RGB

    def __getitem__(self, key: tuple[int | None, int]) -> tuple[torch.Tensor, int, list[tuple[int, str]]]:
        epoch, slot = key
        index, image, bad = first_good(slot, len(self.paths), self.known_bad, self._decode)
        box = self.plan.box(epoch, slot, *image.size)
        size = [self.plan.image_size, self.plan.image_size]
        image = F.resized_crop(image, box.top, box.left, box.height, box.width, size,
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
        if box.flip:
            image = F.horizontal_flip(image)
        return torch.from_numpy(np.array(image)), index, bad


def _collate(items):
    images, indices, bad = zip(*items)
    return torch.stack(images), torch.tensor(indices, dtype=torch.int64), [b for found in bad for b in found]


def normalize(images: torch.Tensor, channels_last: bool, scaling=None) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W, (x − mean)/std per channel, `scaling` = (mean, std) in
    0..255 units (default ImageNet's, i.e. (x/255 − mean)/std)."""
    images = images.permute(0, 3, 1, 2).float()  # a channels_last view of the NHWC data
    mean, std = scaling or ([255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class TorchvisionBackend:
    name = "torchvision"

    def __init__(self, samples: Samples, plan: CropPlan, workers: int, device: torch.device, channels_last: bool):
        self.paths, self.plan = samples.paths, plan
        self.workers, self.device, self.channels_last = workers, device, channels_last

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        keys = [[(epoch, int(index)) for index in batch] for batch in batches]
        dataset = _CroppedImages(self.paths, self.plan, dict(known_bad))  # the workers get this copy
        # a private generator: the DataLoader draws a worker base seed from it (unused: crops come
        # from the CropPlan), which would otherwise advance the global RNG that dropout uses and
        # make a resumed run differ from an uninterrupted one
        loader = DataLoader(dataset, batch_sampler=keys, num_workers=self.workers, collate_fn=_collate,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for images, indices, bad in loader:
            images = normalize(images.to(self.device, non_blocking=True), self.channels_last, self.plan.scaling)
            yield Batch(images, indices.numpy(), bad)
