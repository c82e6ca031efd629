"""Which samples each rank reads, in what order, and how each one is cropped: pure functions of
(seed, epoch, sample index), shared by both back-ends.

Keeping every random choice on the host, keyed by the sample rather than drawn from a stream,
buys three things: a resumed epoch (`start_batch`) sees exactly the batches it would have seen,
without decoding the skipped ones; the result does not depend on the number of workers or
threads; and DALI and torchvision crop the same window of the same image, so they differ only by
decoder and resampling round-off (tests/test_data.py checks this).

Train sharding, per epoch e (DistributedSampler's scheme):
    order   = a random permutation of the N train samples, seeded by seed + e
    padded  = order, wrapped around to length ceil(N / W)·W   (the first few samples repeat)
    rank r  = padded[r], padded[r + W], padded[r + 2W], …     (ceil(N / W) samples on every rank)
and each rank cuts its list into batches of batch_size, keeping the last partial one, so every
rank has ceil(ceil(N / W) / batch_size) batches. Val sharding is the same without the shuffle; the
wrapped duplicates are marked invalid, so summed over ranks every val image counts exactly once.

A bad image (`integrity`) keeps its index and its slot: with on_bad_image "skip" the slot is filled
with the next good sample of the split, a choice that depends only on the files, and its label
comes along; in val that replacement is marked invalid too. So none of the above moves: the same
number and size of batches on every rank, the same resumed epoch, each good val image once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RANGE = (3 / 4, 4 / 3)


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


class Box(NamedTuple):
    """A window of the source image (pixels) that is resized to the output size, then maybe mirrored."""
    left: int
    top: int
    width: int
    height: int
    flip: bool = False


@dataclass(frozen=True)
class CropPlan:
    """Where to crop each sample.

    Train: Inception-style random resized crop — area fraction s ~ U(min_crop_scale, 1), aspect
    a = w/h with log a ~ U(log 3/4, log 4/3), so w = √(s·W·H·a), h = √(s·W·H/a); up to 10 draws
    until the window fits, else the largest centred window with a clamped aspect (torchvision's
    RandomResizedCrop) — then a mirror with probability 1/2. Val: resize the shorter side to
    val_resize and take the centre image_size square, which is the centred square of side
    image_size·min(W, H)/val_resize in source pixels; both back-ends crop that window directly.
    """

    image_size: int
    val_resize: int
    seed: int = 0
    min_crop_scale: float = 0.08
    hflip: bool = True
    augment: str = "inception"  # or "caffe" (augment.caffe_train_box), or "none" (the val crop, maybe mirrored)

    @property
    def scaling(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) in 0..255 units for this augmentation (augment.input_scaling)."""
        from .augment import input_scaling

        return input_scaling(self.augment)

    def sample_rng(self, epoch: int, index: int) -> random.Random:
        # a string seed is hashed with SHA-512: the same stream in every process and on every run
        return random.Random(f"{self.seed}/{epoch}/{index}")

    def train_box(self, epoch: int, index: int, width: int, height: int) -> Box:
        rng = self.sample_rng(epoch, index)
        area = width * height
        log_low, log_high = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
        for _ in range(10):
            target = area * rng.uniform(self.min_crop_scale, 1.0)
            aspect = math.exp(rng.uniform(log_low, log_high))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                return Box(left, top, w, h, self.hflip and rng.random() < 0.5)
        aspect = min(max(width / height, ASPECT_RANGE[0]), ASPECT_RANGE[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        w, h = min(w, width), min(h, height)
        return Box((width - w) // 2, (height - h) // 2, w, h, self.hflip and rng.random() < 0.5)

    def val_box(self, width: int, height: int) -> Box:
        side = min(round(self.image_size * min(width, height) / self.val_resize), width, height)
        return Box((width - side) // 2, (height - side) // 2, side, side)

    def box(self, epoch: int | None, index: int, width: int, height: int) -> Box:
        """Train crop for an epoch number, the val crop for epoch None."""
        if epoch is None:
            return self.val_box(width, height)
        if self.augment == "caffe":
            from .augment import caffe_train_box

            return caffe_train_box(self.sample_rng(epoch, index), width, height, self.image_size, self.val_resize,
                                   self.hflip)
        if self.augment == "none":
            return self.val_box(width, height)._replace(flip=self.hflip and self.sample_rng(epoch, index).random() < 0.5)
        return self.train_box(epoch, index, width, height)
