"""ImageNet-style data for training and evaluation: one `build_loaders` call, two back-ends.

    loaders = build_loaders("data/imagenet", batch_size=256, rank=rank, world_size=world_size)
    for images, labels in loaders.train.epoch(epoch, start_batch):   # len(loaders.train) per epoch
        ...
    for images, labels, valid in loaders.val:                          # count only `valid` samples
        ...
    loaders.train.skipped.count, loaders.train.skipped.paths            # bad images (on_bad_image="skip")

The back-ends (DALI on the CPU or GPU, torchvision with PIL) crop the same windows of the same
images in the same order; sharding, padding and the determinism guarantees are described in
`sampling`; what a bad image is and what happens to it, in `integrity`. `python -m
lowrank_dist.data.synthetic --out DIR` writes a small learnable data set, `python -m
lowrank_dist.data.check ROOT` lists every problem of a data set, `python -m lowrank_dist.data.index
ROOT` builds the index every run starts from (`index`), `python -m lowrank_dist.data.bench ROOT`
measures the loaders' speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .augment import AUGMENTS, CAFFE_RESIZE
from .cifar import CLASSES as CIFAR10_CLASSES, CifarBackend, load_cifar10
from .dali import DaliBackend, check_dali, dali_available
from .integrity import MAX_IMAGE_PIXELS, ON_BAD_IMAGE, Skipped, mark_oversized
from .loaders import TrainLoader, ValLoader
from .samples import DataError, load_samples
from .sampling import CropPlan
from .torchvision_loader import TorchvisionBackend

__all__ = ["DataError", "Loaders", "Skipped", "build_loaders"]


@dataclass
class Loaders:
    train: TrainLoader | None  # None when built with train=False
    val: ValLoader
    classes: list[str]
    num_train: int | None  # None when built with train=False
    backend: str  # "dali-cpu", "dali-gpu" or "torchvision"


def build_loaders(
    root: str | os.PathLike,
    *,
    backend: str = "auto",
    dali_device: str = "auto",
    batch_size: int = 32,
    image_size: int = 224,
    val_resize: int | None = None,
    workers: int = 2,
    train_list: str | os.PathLike | None = None,
    val_list: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    channels_last: bool = False,
    min_crop_scale: float = 0.08,
    hflip: bool = True,
    on_bad_image: str = "error",
    train: bool = True,
    decode: bool = True,
    format: str = "imagenet",
    augment: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Loaders:
    """Train and val loaders for this rank. `batch_size` is per rank; `image_size` is the train crop
    and the val centre crop; `val_resize` the shorter side before the val crop (default
    round(image_size·256/224)). backend "auto" is DALI if it is installed, else torchvision;
    dali_device "auto" is the GPU if CUDA is available. `workers` is DataLoader processes for
    torchvision and decoding threads for DALI. `min_crop_scale` and `hflip` set the train
    augmentation: crop area fraction in (min_crop_scale, 1), random horizontal mirror.
    `on_bad_image` "error" stops at the first undecodable image with a DataError naming it; "skip"
    replaces it by `integrity`'s rule and counts it in loaders.train/val.skipped.
    `train=False` (evaluation only) builds no train loader and does not list the train images: the
    classes still come from the train split's folders (or list). `decode=False` (the loader
    benchmark's --no-decode) reads and checks the files but yields None for the images.
    The splits come from the data index (`index`), built on the first run. `format` "cifar10"
    reads the CIFAR-10 binary batches in `root` instead (`cifar`). `augment` picks the train crop and input
    scaling: "inception" (default for ImageNet folders: random resized crop, min_crop_scale),
    "caffe" (`augment`: shorter side 256, random square, mean subtraction) or "none" (the val crop;
    the default for CIFAR-10, whose images are used whole); `hflip` mirrors in all of them.
    An image whose header declares more than `max_image_pixels` pixels is bad (`integrity`)."""
    if backend not in ("auto", "dali", "torchvision"):
        raise ValueError(f"backend must be 'auto', 'dali' or 'torchvision', got {backend!r}")
    if dali_device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"dali_device must be 'auto', 'cpu' or 'gpu', got {dali_device!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be ≥ 1 and workers ≥ 0, got {batch_size} and {workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    if format not in ("imagenet", "cifar10"):
        raise ValueError(f"format must be 'imagenet' or 'cifar10', got {format!r}")
    augment = augment or ("none" if format == "cifar10" else "inception")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    use_dali = backend == "dali" or (backend == "auto" and dali_available())
    if use_dali:
        dali_device = check_dali(dali_device)
    if format == "cifar10":
        return _cifar_loaders(root, augment, image_size, train_list, val_list, use_dali and dali_device, batch_size,
                              workers, rank, world_size, seed, torch.device(device), channels_last, hflip, train)
    val_resize = val_resize or (CAFFE_RESIZE if augment == "caffe" else round(image_size * 256 / 224))
    if val_resize < image_size:
        raise DataError(f"data.val_resize: {val_resize} is smaller than data.image_size {image_size}: the centre crop would not fit")

    classes, train_samples, val = load_samples(root, train_list, val_list, with_train=train)
    for samples in (train_samples, val):
        mark_oversized(samples, max_image_pixels)
    if not use_dali:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = max_image_pixels  # PIL's own check, in the workers too, says the same
    plan = CropPlan(image_size, val_resize, seed, min_crop_scale, hflip, augment)
    device = torch.device(device)

    def backend_for(samples):
        if use_dali:
            return DaliBackend(samples, plan, dali_device, workers, device, channels_last, decode)
        return TorchvisionBackend(samples, plan, workers, device, channels_last, decode)

    val_backend = backend_for(val)
    train_loader = None
    if train_samples is not None:
        train_loader = TrainLoader(train_samples, backend_for(train_samples), batch_size, rank, world_size, seed, device,
                                   on_bad_image)
    return Loaders(
        train=train_loader,
        val=ValLoader(val, val_backend, batch_size, rank, world_size, device, on_bad_image),
        classes=classes, num_train=None if train_samples is None else len(train_samples), backend=val_backend.name,
    )


def _cifar_loaders(root, augment, image_size, train_list, val_list, dali_device, batch_size, workers, rank,
                   world_size, seed, device, channels_last, hflip, train) -> Loaders:
    """Loaders over the CIFAR-10 binary batches in `root` (`cifar`); dali_device False: torchvision."""
    if augment != "none":
        raise DataError(f"data.augment: {augment!r} crops ImageNet-sized images; CIFAR-10 images are used whole"
                        " (set 'none', the paper's, and data.hflip for random mirrors)")
    if image_size != 32:
        raise DataError(f"data.image_size: CIFAR-10 images are 32×32, got {image_size}; set 32")
    if train_list is not None or val_list is not None:
        raise DataError("data.train_list/val_list: CIFAR-10 has fixed train and test batches; remove the lists")
    train_images, train_samples, val_images, val, scaling = load_cifar10(root, with_train=train)

    def backend_for(images):
        return CifarBackend(images, scaling, seed, hflip, device, channels_last, dali_device or None, workers)

    train_loader = None
    if train:
        train_loader = TrainLoader(train_samples, backend_for(train_images), batch_size, rank, world_size, seed, device)
    val_backend = backend_for(val_images)
    return Loaders(
        train=train_loader, val=ValLoader(val, val_backend, batch_size, rank, world_size, device),
        classes=list(CIFAR10_CLASSES), num_train=None if train_samples is None else len(train_samples),
        backend=val_backend.name,
    )
