"""What `data.augment` picks: the window of the source image each sample is cropped to, and how its
pixels are scaled. Pure functions of (seed, epoch, sample index, image size), shared by every back-end:
the loaders compute a whole pass's windows on the host in one vectorised call, and DALI and torchvision
cut the same windows, so they differ only by decoder and resampling round-off (tests/test_data.py).

"inception" (the default for ImageNet folders): the random resized crop of `CropWindows`.

"caffe": the authors' crops. Their prototxts (Tai et al., chengtaipu/lowrankcnn) read images stored
with the shorter side at 256 and take a random crop_size square (227 for CaffeNet, 224 for VGG-16)
with a random mirror, then subtract the mean; the val images get the centre square. Here the resize
is not done ahead: the crop is expressed as a window of the source image, which both back-ends cut
and resize to S×S, the same way they cut the val window. Resizing the shorter side to R makes the
image W·R/m × H·R/m (m = min(W, H)); an S×S crop at (x, y) there is the source window of side S·m/R
at (x·m/R, y·m/R), with x uniform in 0..W·R/m − S (y likewise).

"none" (the default, and the only choice, for CIFAR-10): the val window, mirrored at random if hflip.

Input scaling: "inception" and "none" use (x/255 − mean)/std with ImageNet's statistics; "caffe"
subtracts the mean only and keeps Caffe's 0..255 scale, which is what the authors' Gaussian
initialisations (std 0.01) were chosen for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

Augment = Literal["inception", "caffe", "none"]  # data.augment
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ASPECT_RANGE = (3 / 4, 4 / 3)
CAFFE_RESIZE = 256  # the shorter side of the authors' stored images


class Box(NamedTuple):
    """A window of the source image (pixels) that is resized to the output size, then maybe mirrored."""
    left: int
    top: int
    width: int
    height: int
    flip: bool = False


class Boxes(NamedTuple):
    """Many Boxes as int64 arrays (flip: bool), one entry per sample."""
    left: np.ndarray
    top: np.ndarray
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray

    def __getitem__(self, i):  # a Box for an int, Boxes for a slice or index array
        if isinstance(i, (int, np.integer)):
            return Box(int(self.left[i]), int(self.top[i]), int(self.width[i]), int(self.height[i]), bool(self.flip[i]))
        return Boxes(*(field[i] for field in self))


_MASK = (1 << 64) - 1
_TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 windows before falling back
_DRAWS = 2 * _TRIES + 3  # (area, aspect) per try, then left, top, mirror


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014): a bijection of uint64 that scrambles
    every input bit into every output bit, so consecutive keys give independent-looking outputs."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, indices: np.ndarray, draws: int) -> np.ndarray:
    """len(indices)×draws uniforms in [0, 1), a pure function of (seed, epoch, sample index, draw
    number): a counter-based generator, so any subset of samples gets the same numbers in one
    vectorised call, in any process, in any order."""
    key = _splitmix64(np.array([seed & _MASK], dtype=np.uint64)) ^ np.uint64(epoch & _MASK)
    key = _splitmix64(_splitmix64(key) ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    with np.errstate(over="ignore"):
        counters = key[:, None] + np.arange(1, draws + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _at_least_one_pixel(boxes: Boxes, widths: np.ndarray, heights: np.ndarray) -> Boxes:
    """Windows of at least 1×1 pixels inside their image. A window scaled down from a tiny image
    (a 1×1 JPEG under the caffe crop, whose window is image_size/256 of the shorter side) rounds to
    0 pixels, which PIL would resize and DALI refuse: both back-ends get the one pixel instead."""
    widths, heights = (np.asarray(a, dtype=np.int64) for a in (widths, heights))
    width, height = np.maximum(boxes.width, 1), np.maximum(boxes.height, 1)
    left = np.clip(boxes.left, 0, np.maximum(widths - width, 0))
    top = np.clip(boxes.top, 0, np.maximum(heights - height, 0))
    return Boxes(left, top, width, height, boxes.flip)


@dataclass(frozen=True)
class CropWindows:
    """Where to crop each sample, and how its pixels are scaled (`data.augment`).

    Train ("inception"): the random resized crop — area fraction s ~ U(min_crop_scale, 1), aspect
    a = w/h with log a ~ U(log 3/4, log 4/3), so w = √(s·W·H·a), h = √(s·W·H/a); up to 10 draws
    until the window fits, else the largest centred window with a clamped aspect (torchvision's
    RandomResizedCrop) — then a mirror with probability 1/2. Val: resize the shorter side to
    val_resize and take the centre image_size square, which is the centred square of side
    image_size·min(W, H)/val_resize in source pixels; both back-ends crop that window directly.

    The random numbers come from `sample_uniforms`, keyed by (seed, epoch, sample index), so a
    whole epoch's windows are one vectorised call (`boxes`) and one sample's is the same numbers.
    """

    image_size: int
    val_resize: int
    seed: int = 0
    min_crop_scale: float = 0.08
    hflip: bool = True
    augment: Augment = "inception"  # or "caffe" (caffe_train_boxes), or "none" (the val crop, maybe mirrored)

    @property
    def scaling(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) in 0..255 units for this augmentation (input_scaling)."""
        return input_scaling(self.augment)

    def train_boxes(self, epoch: int, indices: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> Boxes:
        """The train windows of samples `indices` whose images are widths×heights, all at once
        (in chunks, to bound the N×23 temporaries on a 1.28M-sample epoch)."""
        indices = np.asarray(indices, dtype=np.int64)
        widths, heights = (np.asarray(a, dtype=np.int64) for a in (widths, heights))
        chunks = [self._train_chunk(epoch, indices[i:i + 65536], widths[i:i + 65536], heights[i:i + 65536])
                  for i in range(0, max(len(indices), 1), 65536)]
        return Boxes(*(np.concatenate(field) for field in zip(*chunks)))

    def _train_chunk(self, epoch, indices, widths, heights) -> Boxes:
        u = sample_uniforms(self.seed, epoch, indices, _DRAWS)
        W, H = widths[:, None].astype(np.float64), heights[:, None].astype(np.float64)
        target = W * H * (self.min_crop_scale + (1.0 - self.min_crop_scale) * u[:, 0:2 * _TRIES:2])
        log_low, log_high = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
        aspect = np.exp(log_low + (log_high - log_low) * u[:, 1:2 * _TRIES:2])
        w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # rint: half to even, as Python's round
        h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
        fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
        first = fits.argmax(axis=1)  # the first try that fits
        rows = np.arange(len(indices))
        w, h, found = w[rows, first], h[rows, first], fits[rows, first]
        # no try fits: the largest centred window whose aspect is W/H clamped to the range
        ratio = widths / heights
        clamped = np.clip(ratio, *ASPECT_RANGE)
        tall = ratio < clamped
        w_fallback = np.where(tall, widths, np.rint(heights * clamped).astype(np.int64))
        h_fallback = np.where(tall, np.rint(widths / clamped).astype(np.int64), heights)
        w = np.where(found, w, np.minimum(w_fallback, widths))
        h = np.where(found, h, np.minimum(h_fallback, heights))
        # a fitting window's corner: uniform over the (W − w + 1)·(H − h + 1) positions
        left = np.where(found, np.floor(u[:, -3] * (widths - w + 1)).astype(np.int64), (widths - w) // 2)
        top = np.where(found, np.floor(u[:, -2] * (heights - h + 1)).astype(np.int64), (heights - h) // 2)
        flip = (u[:, -1] < 0.5) & self.hflip
        return Boxes(left, top, w, h, flip)

    def val_boxes(self, widths: np.ndarray, heights: np.ndarray) -> Boxes:
        widths, heights = (np.asarray(a, dtype=np.int64) for a in (widths, heights))
        side = np.rint(self.image_size * np.minimum(widths, heights) / self.val_resize).astype(np.int64)
        side = np.minimum(side, np.minimum(widths, heights))
        return Boxes((widths - side) // 2, (heights - side) // 2, side, side, np.zeros(len(side), dtype=bool))

    def boxes(self, epoch: int | None, indices: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> Boxes:
        """Train windows for an epoch number, val windows for epoch None; at least one pixel each."""
        if epoch is None:
            boxes = self.val_boxes(widths, heights)
        elif self.augment == "caffe":
            u = sample_uniforms(self.seed, epoch, indices, 3)
            boxes = caffe_train_boxes(u, widths, heights, self.image_size, self.val_resize, self.hflip)
        elif self.augment == "none":  # the val window, mirrored at random
            flip = (sample_uniforms(self.seed, epoch, indices, 1)[:, 0] < 0.5) & self.hflip
            boxes = self.val_boxes(widths, heights)._replace(flip=flip)
        else:
            boxes = self.train_boxes(epoch, indices, widths, heights)
        return _at_least_one_pixel(boxes, widths, heights)

    def box(self, epoch: int | None, index: int, width: int, height: int) -> Box:
        """One sample's window: the same numbers as its entry in `boxes`."""
        return self.boxes(epoch, np.array([index]), np.array([width]), np.array([height]))[0]


def caffe_train_boxes(u: np.ndarray, widths, heights, image_size: int, resize: int, hflip: bool) -> Boxes:
    """The source windows of random image_size squares of the images resized to shorter side
    `resize`, from N×3 uniforms `u` (x, y, mirror) — one vectorised call for a whole epoch."""
    widths, heights = (np.asarray(a, dtype=np.int64) for a in (widths, heights))
    scale = np.minimum(widths, heights) / resize  # source pixels per resized pixel
    side = np.minimum(np.rint(image_size * scale).astype(np.int64), np.minimum(widths, heights))
    x = u[:, 0] * np.maximum(0.0, widths / scale - image_size)
    y = u[:, 1] * np.maximum(0.0, heights / scale - image_size)
    left = np.minimum(np.rint(x * scale).astype(np.int64), widths - side)
    top = np.minimum(np.rint(y * scale).astype(np.int64), heights - side)
    return Boxes(left, top, side, side, (u[:, 2] < 0.5) & hflip)


def input_scaling(augment: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel in 0..255 units: a pixel p becomes (p − mean)/std."""
    if augment == "caffe":
        return tuple(255 * m for m in IMAGENET_MEAN), (1.0, 1.0, 1.0)
    return tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)
