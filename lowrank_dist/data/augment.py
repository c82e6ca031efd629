"""Caffe-style training crops and input scaling (`data.augment: caffe`), beside the Inception-style
random resized crop of `sampling.CropPlan`.

The authors' prototxts (Tai et al., chengtaipu/lowrankcnn) read images stored with the shorter side
at 256 and take a random crop_size square (227 for CaffeNet, 224 for VGG-16) with a random mirror,
then subtract the mean; the val images get the centre square. Here the resize is not done ahead:
the crop is expressed as a window of the source image, which both back-ends cut and resize to
S×S, the same way they cut the val window. Resizing the shorter side to R makes the image
W·R/m × H·R/m (m = min(W, H)); an S×S crop at (x, y) there is the source window of side S·m/R at
(x·m/R, y·m/R), with x uniform in 0..W·R/m − S (y likewise).

Input scaling: "inception" and "none" use (x/255 − mean)/std with ImageNet's statistics; "caffe"
subtracts the mean only and keeps Caffe's 0..255 scale, which is what the authors' Gaussian
initialisations (std 0.01) were chosen for.
"""

from __future__ import annotations

import numpy as np

from .sampling import IMAGENET_MEAN, IMAGENET_STD, Boxes

AUGMENTS = ("inception", "caffe", "none")
CAFFE_RESIZE = 256  # the shorter side of the authors' stored images


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
