"""ImageNet-style data for training and evaluation: one `build_loaders` call, two back-ends.

    loaders = build_loaders(cfg.data, rank=rank, world_size=world_size)    # cfg.data: the config's data section
    for images, labels in loaders.train.epoch(epoch, start_batch):        # len(loaders.train) per epoch
        ...
    for images, labels, valid in loaders.val:                              # count only `valid` samples
        ...
    loaders.train.replaced.count, loaders.train.replaced.paths              # bad images (on_bad_image="skip")

The back-ends (DALI on the CPU or GPU, torchvision with PIL) crop the same windows of the same
images in the same order; sharding, padding and the determinism guarantees are described in
`sampling`, the crop windows in `augment`; what a bad image is and what happens to it, in
`integrity`. `python -m lowrank_dist.data.synthetic --out DIR` writes a small learnable data set,
`python -m lowrank_dist.data.check ROOT` lists every problem of a data set, `python -m
lowrank_dist.data.index ROOT` builds the index every run starts from (`index`), and `python
bench/loaders.py ROOT` measures the loaders' speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch

from .augment import CAFFE_RESIZE, Augment, CropWindows
from .cifar import CLASSES as CIFAR10_CLASSES, CifarBackend, load_cifar10
from .dali import DaliBackend, check_dali, dali_available
from .integrity import OnBadImage, Replaced, mark_oversized
from .loaders import TrainLoader, ValLoader
from .samples import DataError
from .torchvision_loader import TorchvisionBackend

__all__ = ["DataError", "DataSection", "Loaders", "Replaced", "build_loaders"]


class DataSection(Protocol):
    """What build_loaders reads: the config's data section, lowrank_dist.config.DataConfig, which
    checks every value (this package does not import the config: the config imports it). Any object
    with these attributes will do; their values are taken as checked."""

    root: Path
    backend: Literal["auto", "dali", "torchvision"]  # "auto": DALI if it is installed, else torchvision
    dali_device: Literal["auto", "cpu", "gpu"]  # "auto": the GPU if CUDA is available
    batch_size: int  # per rank
    image_size: int  # the train crop and the val centre crop
    val_resize: int | None  # the shorter side before the val crop; None: round(image_size·256/224)
    workers: int  # DataLoader processes (torchvision), decoding threads (DALI)
    min_crop_scale: float  # "inception" crops: area fraction in (min_crop_scale, 1)
    hflip: bool  # random horizontal mirror in training
    format: Literal["imagenet", "cifar10"]
    augment: Augment | None  # None: "inception" for ImageNet folders, "none" for CIFAR-10
    on_bad_image: OnBadImage
    max_image_pixels: int  # an image whose header declares more is bad, never decoded (integrity)
    train_list: Path | None
    val_list: Path | None


@dataclass
class Loaders:
    train: TrainLoader | None  # None when built with train=False
    val: ValLoader
    classes: list[str]
    num_train: int | None  # None when built with train=False
    backend: str  # "dali-cpu", "dali-gpu" or "torchvision"


@dataclass(frozen=True)
class _Rank:
    """What the loaders need besides the data section: who reads, with what seed, onto which device."""

    rank: int
    world_size: int
    seed: int
    device: torch.device
    channels_last: bool
    train: bool


def build_loaders(data: DataSection, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                  device: torch.device = torch.device("cpu"), channels_last: bool = False, train: bool = True,
                  decode: bool = True) -> Loaders:
    """Train and val loaders for this rank, as the data section says (`DataSection` lists what each
    key means). `seed` (run.seed) draws the shuffles and crops; `channels_last` is the images' memory
    format on `device`. `data.on_bad_image` "error" stops at the first undecodable image with a
    DataError naming it; "skip" replaces it by `integrity`'s rule and counts it in
    loaders.train/val.replaced. `train=False` (evaluation only) builds no train loader and does not
    list the train images: the classes still come from the train split's folders (or list).
    `decode=False` (the loader benchmark's --no-decode) reads and checks the files but yields None
    for the images. The splits come from the data index (`index`), built on the first run.
    `data.format` "cifar10" reads the CIFAR-10 binary batches in data.root instead (`cifar`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    where = _Rank(rank, world_size, seed, torch.device(device), channels_last, train)
    augment = data.augment or ("none" if data.format == "cifar10" else "inception")
    use_dali = data.backend == "dali" or (data.backend == "auto" and dali_available())
    dali_device = check_dali(data.dali_device) if use_dali else None
    if data.format == "cifar10":
        return _cifar_loaders(data, augment, dali_device, where)
    return _folder_loaders(data, augment, dali_device, where, decode)


def _folder_loaders(data: DataSection, augment: str, dali_device: str | None, where: _Rank, decode: bool) -> Loaders:
    """Loaders over an ImageNet-layout folder or file lists; dali_device None: torchvision."""
    # imported here rather than at the top: `python -m lowrank_dist.data.index` imports this package
    # first, and runpy warns if the module it is about to run as __main__ has been imported already
    from .index import load_samples

    val_resize = data.val_resize or (CAFFE_RESIZE if augment == "caffe" else round(data.image_size * 256 / 224))
    if val_resize < data.image_size:
        raise DataError(f"data.val_resize: {val_resize} is smaller than data.image_size {data.image_size}:"
                        " the centre crop would not fit")
    classes, train_samples, val = load_samples(data.root, data.train_list, data.val_list, with_train=where.train)
    for samples in (train_samples, val):
        mark_oversized(samples, data.max_image_pixels)
    if dali_device is None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = data.max_image_pixels  # PIL's own check, in the workers too, says the same
    windows = CropWindows(data.image_size, val_resize, where.seed, data.min_crop_scale, data.hflip, augment)

    def backend_for(samples):
        if dali_device is not None:
            return DaliBackend(samples, windows, dali_device, data.workers, where.device, where.channels_last, decode)
        return TorchvisionBackend(samples, windows, data.workers, where.device, where.channels_last, decode)

    val_backend = backend_for(val)
    train_loader = None
    if train_samples is not None:
        train_loader = TrainLoader(train_samples, backend_for(train_samples), data.batch_size, where.rank,
                                   where.world_size, where.seed, where.device, data.on_bad_image)
    return Loaders(
        train=train_loader,
        val=ValLoader(val, val_backend, data.batch_size, where.rank, where.world_size, where.device, data.on_bad_image),
        classes=classes, num_train=None if train_samples is None else len(train_samples), backend=val_backend.name,
    )


def _cifar_loaders(data: DataSection, augment: str, dali_device: str | None, where: _Rank) -> Loaders:
    """Loaders over the CIFAR-10 binary batches in data.root (`cifar`); dali_device None: torchvision."""
    if augment != "none":
        raise DataError(f"data.augment: {augment!r} crops ImageNet-sized images; CIFAR-10 images are used whole"
                        " (set 'none', the paper's, and data.hflip for random mirrors)")
    if data.image_size != 32:
        raise DataError(f"data.image_size: CIFAR-10 images are 32×32, got {data.image_size}; set 32")
    if data.train_list is not None or data.val_list is not None:
        raise DataError("data.train_list/val_list: CIFAR-10 has fixed train and test batches; remove the lists")
    train_images, train_samples, val_images, val, scaling = load_cifar10(data.root, with_train=where.train)

    def backend_for(images):
        return CifarBackend(images, scaling, where.seed, data.hflip, where.device, where.channels_last, dali_device,
                            data.workers)

    train_loader = None
    if where.train:
        train_loader = TrainLoader(train_samples, backend_for(train_images), data.batch_size, where.rank,
                                   where.world_size, where.seed, where.device)
    val_backend = backend_for(val_images)
    return Loaders(
        train=train_loader,
        val=ValLoader(val, val_backend, data.batch_size, where.rank, where.world_size, where.device),
        classes=list(CIFAR10_CLASSES), num_train=None if train_samples is None else len(train_samples),
        backend=val_backend.name,
    )
