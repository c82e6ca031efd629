"""A small, learnable JPEG data set in ImageNet layout, for demos and tests without ImageNet.

    python -m lowrank_dist.data.synthetic --out data/synthetic [--classes 10 --train-per-class 100
        --val-per-class 20 --seed 0 --min-side 48 --max-side 96 --force]

Class k is a colour and a texture: hue k/K of the colour wheel (jittered by less than half the gap
to the next class) and one of four patterns by k mod 4 — horizontal stripes, vertical stripes, a
checkerboard, concentric rings. Both survive what training does to an image: a random resized
crop keeps the colour and some of the texture (stripes are everywhere, so every window has them),
and a mirror maps each pattern onto itself. Period, phase, ring centre, brightness, a distractor
ellipse of random colour, pixel noise and the (non-square) image size vary per image, so a model
has to learn the classes rather than memorise pictures.
"""

from __future__ import annotations

import argparse
import colorsys
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import exit_code_for, reason

PATTERNS = ("horizontal stripes", "vertical stripes", "checkerboard", "rings")


def _render(rng: np.random.Generator, label: int, classes: int, min_side: int, max_side: int) -> np.ndarray:
    width, height = rng.integers(min_side, max_side + 1, size=2)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    period, phase = rng.uniform(6, 14), rng.uniform(0, 2 * np.pi)
    pattern = PATTERNS[label % len(PATTERNS)]
    if pattern == "horizontal stripes":
        wave = np.sin(2 * np.pi * y / period + phase)
    elif pattern == "vertical stripes":
        wave = np.sin(2 * np.pi * x / period + phase)
    elif pattern == "checkerboard":
        wave = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase)
    else:
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        wave = np.sin(2 * np.pi * np.hypot(y - cy, x - cx) / period + phase)
    mix = (0.5 + 0.5 * np.tanh(3 * wave))[..., None]  # soft-edged 0/1 pattern

    hue = (label / classes + rng.uniform(-0.3, 0.3) / classes) % 1.0
    saturation, value = rng.uniform(0.55, 0.95), rng.uniform(0.7, 1.0)
    bright = np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)
    dark = bright * rng.uniform(0.15, 0.4)
    image = 255 * (mix * bright + (1 - mix) * dark)

    ey, ex = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
    inside = ((y - ey) / ry) ** 2 + ((x - ex) / rx) ** 2 <= 1
    image[inside] = rng.uniform(0, 255, size=3)
    image += rng.normal(0, 10, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_synthetic(
    out: str | os.PathLike,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
    *,
    min_side: int = 48,
    max_side: int = 96,
    force: bool = False,
) -> dict[str, int]:
    """Write out/train/n0000000k/*.JPEG and out/val/n0000000k/*.JPEG; the same files for the same
    arguments. Refuses a non-empty `out` unless `force`, which replaces out/train and out/val only."""
    out = Path(out)
    if classes < 2 or train_per_class < 1 or val_per_class < 1 or not 8 <= min_side <= max_side:
        raise ValueError("need classes ≥ 2, train/val per class ≥ 1 and 8 ≤ min_side ≤ max_side")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass force=True (--force) to replace its train/ and val/")
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
    try:
        _write_images(out, classes, train_per_class, val_per_class, seed, min_side, max_side)
    except OSError:  # a full disk, say: half a data set (and half a JPEG) is of no use, so none is left
        for split in ("train", "val"):
            shutil.rmtree(out / split, ignore_errors=True)
        raise
    return {"classes": classes, "train": classes * train_per_class, "val": classes * val_per_class}


def _write_images(out: Path, classes: int, train_per_class: int, val_per_class: int, seed: int, min_side: int,
                  max_side: int) -> None:
    rng = np.random.default_rng(seed)
    val_number = 0
    for label in range(classes):
        wnid = f"n{label:08d}"
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                if split == "train":
                    name = f"{wnid}_{i}.JPEG"
                else:
                    val_number += 1
                    name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                Image.fromarray(_render(rng, label, classes, min_side, max_side)).save(folder / name, quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.data.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write train/ and val/ into")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=48, help="image sides are drawn from [min, max] pixels")
    parser.add_argument("--max-side", type=int, default=96)
    parser.add_argument("--force", action="store_true", help="replace train/ and val/ in a non-empty --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        counts = make_synthetic(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed,
                                min_side=args.min_side, max_side=args.max_side, force=args.force)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # make_synthetic removed the half-written set
        print(f"error: --out: could not write the data set to {str(args.out)!r} ({reason(error)})", file=sys.stderr)
        return exit_code_for(error)
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({counts['classes']} classes,"
          f" {args.min_side}-{args.max_side} px sides) to {args.out}/train and {args.out}/val"
          f" in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
