"""CIFAR-10 in its binary distribution (cifar-10-binary.tar.gz, extracted as cifar-10-batches-bin/).

`data.root` is the folder holding data_batch_1.bin … data_batch_5.bin (train) and test_batch.bin
(val). Each file is a run of 3,073-byte records: one label byte (0..9), then the 32×32 image as
1,024 red, 1,024 green and 1,024 blue bytes, row by row. Never the pickled "python version": a
pickle can run code when it is loaded, raw bytes cannot. The whole set is 180 MB of pixels, so it
is read once into memory; a file whose size is not a whole number of records, or a missing
batch, is a DataError naming it.

Both back-ends feed the decoded uint8 arrays straight in: the torchvision back-end indexes them in
the host process, and DALI takes them through fn.external_source and mirrors them in fn.flip
(`dali.cifar_batches`); the loaders normalise the uint8 batches on their device, as for JPEGs.
External arrays rather than a converted JPEG folder: CIFAR is stored uncompressed, so there is
nothing to decode, and a JPEG copy would change the pixels the paper's numbers were measured on
(JPEG is lossy) and need a conversion step and 60,000 small files.

Augmentation is the paper's: none (the 91.31% low-rank NIN result is "without data augmentation"),
optionally a random mirror (`data.hflip`, drawn per (seed, epoch, sample) so both back-ends mirror
the same images). Inputs are standardised with the train set's own per-channel mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from .dali import cifar_batches
from .loaders import Batch
from .samples import DataError, Samples

TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
VAL_FILE = "test_batch.bin"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_BYTES = 3 * 32 * 32
RECORD_BYTES = 1 + IMAGE_BYTES


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×32×32×3, labels int64) of one .bin file."""
    if not path.is_file():
        hint = ""
        if path.with_suffix("").is_file():
            hint = (f"; {path.with_suffix('').name} without .bin is the pickled Python version, which is not read"
                    " (unpickling can run code): download cifar-10-binary.tar.gz")
        raise DataError(f"CIFAR-10 batch {str(path)!r} is missing: data.root must be the extracted"
                        f" cifar-10-batches-bin/ folder with {', '.join(TRAIN_FILES)} and {VAL_FILE}{hint}")
    size = path.stat().st_size
    if size == 0 or size % RECORD_BYTES:
        raise DataError(f"CIFAR-10 batch {str(path)!r} has {size:,} bytes, not a whole number of {RECORD_BYTES:,}-byte"
                        " records (1 label byte + 3,072 pixel bytes): truncated or not the binary version")
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CLASSES):
        first = int(np.argmax(labels >= len(CLASSES)))
        raise DataError(f"CIFAR-10 batch {str(path)!r}: record {first} has label {labels[first]}, expected 0..9")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes → HWC, like a decoded image
    return np.ascontiguousarray(images), labels


def read_split(root: Path, names: tuple[str, ...]) -> tuple[np.ndarray, Samples]:
    parts = [(name, *read_batch(root / name)) for name in names]
    images = np.concatenate([images for _, images, _ in parts])
    labels = np.concatenate([labels for _, _, labels in parts])
    # a "path" per record, for messages: file#record
    paths = [f"{root / name}#{i}" for name, batch, _ in parts for i in range(len(batch))]
    return images, Samples(paths, labels)


def mirror_flags(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """Which samples are mirrored in `epoch`: a pure function of (seed, epoch), indexed by sample."""
    return np.random.default_rng([seed, epoch, 0x5EED]).random(num_samples) < 0.5


class CifarBackend:
    """Batches of in-memory CIFAR images, mirrored as `mirror_flags` says (train, if hflip) and
    standardised by the loaders with `scaling`, (mean, std) per channel in 0..255 units; on the host
    or through DALI."""

    def __init__(self, images: np.ndarray, scaling: tuple[np.ndarray, np.ndarray], seed: int, hflip: bool,
                 device: torch.device, channels_last: bool, dali_device: str | None = None, workers: int = 1):
        self.array, self.seed, self.hflip = images, seed, hflip
        self.scaling = tuple(tuple(float(x) for x in v) for v in scaling)  # (mean, std) per channel, 0..255
        self.device, self.channels_last, self.dali_device, self.threads = device, channels_last, dali_device, max(1, workers)
        self.name = "torchvision" if dali_device is None else f"dali-{dali_device}"

    def _flips(self, epoch: int | None) -> np.ndarray:
        if epoch is None or not self.hflip:
            return np.zeros(len(self.array), dtype=bool)
        return mirror_flags(self.seed, epoch, len(self.array))

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        """uint8 N×32×32×3 batches, mirrored; the loaders normalise them with `scaling` on their device."""
        flips = self._flips(epoch)
        if self.dali_device is not None:
            decoded = cifar_batches(self.array, batches, flips, self.dali_device, self.threads, self.device)
        else:
            decoded = (self._mirrored(batch, flips) for batch in batches)
        for batch, images in zip(batches, decoded):
            yield Batch(images, batch, [], np.zeros(len(batch), dtype=np.int64))

    def _mirrored(self, batch: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        pixels = self.array[batch]
        flipped = flips[batch]
        pixels[flipped] = pixels[flipped, :, ::-1]  # a copy (fancy indexing): the data set is untouched
        return torch.from_numpy(pixels)


def load_cifar10(root: str | os.PathLike, with_train: bool = True):
    """(train images or None, train samples or None, val images, val samples, (mean, std) per
    channel in 0..255 units of the train images). The train images are read also for evaluation
    (with_train False): the statistics must be those the model was trained with."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist")
    for name in (*TRAIN_FILES, VAL_FILE):  # every file checked up front, before minutes of reading
        if not (root / name).is_file():
            read_batch(root / name)  # raises the message that names it
    train_images, train = read_split(root, TRAIN_FILES)
    val_images, val = read_split(root, (VAL_FILE,))
    pixels = train_images.reshape(-1, 3).astype(np.float64)
    scaling = (pixels.mean(axis=0), pixels.std(axis=0))
    if not with_train:
        train_images, train = None, None
    return train_images, train, val_images, val, scaling
