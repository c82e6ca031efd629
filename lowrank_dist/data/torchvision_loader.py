"""The torchvision back-end: PIL decodes in DataLoader worker processes, the device normalizes.

Workers send uint8 N×S×S×3 batches (a quarter of the bytes of float32); the main process moves
them to the device, where one permute makes them N×3×S×S in channels_last memory order for free,
and converts and normalizes there. Each sample's crop comes from the CropPlan, keyed by
(seed, epoch, index), so the number of workers does not change a single pixel.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .samples import Samples
from .sampling import IMAGENET_MEAN, IMAGENET_STD, CropPlan


class _CroppedImages(Dataset):
    """Item (epoch, index) → the sample's crop as a uint8 S×S×3 RGB tensor (epoch None: val crop)."""

    def __init__(self, paths: list[str], plan: CropPlan):
        self.paths, self.plan = paths, plan

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int | None, int]) -> torch.Tensor:
        epoch, index = key
        with Image.open(self.paths[index]) as image:
            image = image.convert("RGB")  # grayscale and CMYK JPEGs too
        box = self.plan.box(epoch, index, *image.size)
        size = [self.plan.image_size, self.plan.image_size]
        image = F.resized_crop(image, box.top, box.left, box.height, box.width, size,
                               interpolation=InterpolationMode.BILINEAR, antialias=True)
        if box.flip:
            image = F.horizontal_flip(image)
        return torch.from_numpy(np.array(image))


def normalize(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W, (x/255 − mean)/std per channel."""
    images = images.permute(0, 3, 1, 2).float()  # a channels_last view of the NHWC data
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class TorchvisionBackend:
    name = "torchvision"

    def __init__(self, samples: Samples, plan: CropPlan, workers: int, device: torch.device, channels_last: bool):
        self.dataset = _CroppedImages(samples.paths, plan)
        self.workers, self.device, self.channels_last = workers, device, channels_last

    def images(self, batches: list[np.ndarray], epoch: int | None) -> Iterator[torch.Tensor]:
        keys = [[(epoch, int(index)) for index in batch] for batch in batches]
        # a private generator: the DataLoader draws a worker base seed from it (unused: crops come
        # from the CropPlan), which would otherwise advance the global RNG that dropout uses and
        # make a resumed run differ from an uninterrupted one
        loader = DataLoader(self.dataset, batch_sampler=keys, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for images in loader:
            yield normalize(images.to(self.device, non_blocking=True), self.channels_last)
