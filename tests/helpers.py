"""Small JPEG data sets for the tests: real handwritten digits, and folders whose images say who they are;
`write_config`, the YAML writer the training tests share; and `loaders_from`, build_loaders with the
data section given as keyword arguments.

`write_jpeg_folder` paints every image one solid colour that encodes its sample index and class,
so a test can read back, from a decoded and normalized batch, which file each image came from —
whatever the crop or mirror — and check coverage and labels against the pixels, not against the
loader's own bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from lowrank_dist.config import DataConfig
from lowrank_dist.data import Loaders, build_loaders
from lowrank_dist.data.augment import IMAGENET_MEAN, IMAGENET_STD

STEP, BASE = 20, 30  # colour levels per code unit; JPEG keeps a solid colour within a few levels


def code_colour(index: int, label: int) -> tuple[int, int, int]:
    """R, G encode the sample index (0..109), B the class (0..10)."""
    assert index < 110 and label <= 10
    return BASE + STEP * (index % 10), BASE + STEP * (index // 10), BASE + STEP * label


def read_codes(images: torch.Tensor) -> tuple[list[int], list[int]]:
    """(sample indices, classes) painted into a normalized N×3×S×S batch by write_jpeg_folder."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((images.float().cpu() * std + mean) * 255).mean(dim=(2, 3))
    codes = ((rgb - BASE) / STEP).round().long()
    return (codes[:, 0] + 10 * codes[:, 1]).tolist(), codes[:, 2].tolist()


def write_jpeg_folder(root: Path, counts: dict[str, list[int]], seed: int = 0) -> Path:
    """root/<split>/c<k>/<i>.JPEG with counts[split][k] images of class k, sized 24–64 px per side.
    Sample indices run over each split in class-then-file order, the order the loaders list them."""
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        index = 0
        for label, count in enumerate(per_class):
            folder = root / split / f"c{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(side) for side in rng.integers(24, 65, size=2))
                Image.new("RGB", (width, height), code_colour(index, label)).save(folder / f"{i:04d}.JPEG", quality=95)
                index += 1
    return root


def write_digits(root: Path, seed: int = 0) -> dict[str, int]:
    """scikit-learn's 1,797 real 8×8 handwritten digits as 32×32 grayscale JPEGs in ImageNet layout
    (class folders 0..9), split 80/20 stratified by class. Returns the counts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).astype(np.uint8)  # ink 0..16 → 0..255
    splits = dict(zip(("train", "val"), train_test_split(
        np.arange(len(pixels)), test_size=0.2, stratify=digits.target, random_state=seed)))
    for split, indices in splits.items():
        for index in indices:
            folder = root / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[index]).resize((32, 32), Image.BILINEAR)
            image.save(folder / f"{index:04d}.JPEG", quality=95)
    return {"train": len(splits["train"]), "val": len(splits["val"]), "classes": 10}


def write_cifar_batches(root: Path, images: np.ndarray, labels: np.ndarray, val_images: np.ndarray,
                        val_labels: np.ndarray) -> Path:
    """CIFAR-10's binary layout: uint8 N×32×32×3 images split over data_batch_1..5.bin, the val ones
    in test_batch.bin; each record is the label byte, then the R, G and B planes."""
    def records(pixels, targets):
        planes = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1)
        return np.concatenate([targets.astype(np.uint8)[:, None], planes], axis=1).tobytes()

    root.mkdir(parents=True, exist_ok=True)
    for number, part in enumerate(np.array_split(np.arange(len(images)), 5), start=1):
        (root / f"data_batch_{number}.bin").write_bytes(records(images[part], labels[part]))
    (root / "test_batch.bin").write_bytes(records(val_images, val_labels))
    return root


def write_digits_cifar(root: Path, seed: int = 0) -> dict[str, int]:
    """scikit-learn's digits in CIFAR-10's binary format: each 8×8 digit upscaled to 32×32 (bilinear)
    and repeated over R, G, B; the 80/20 stratified split of write_digits. Returns the counts."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).astype(np.uint8)
    large = np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.BILINEAR)) for p in pixels])
    rgb = np.repeat(large[..., None], 3, axis=3)
    train, val = train_test_split(np.arange(len(pixels)), test_size=0.2, stratify=digits.target, random_state=seed)
    write_cifar_batches(root, rgb[train], digits.target[train], rgb[val], digits.target[val])
    return {"train": len(train), "val": len(val), "classes": 10}


def write_config(path: Path, tree: dict, sections: dict) -> Path:
    """Write `tree` with each of `sections` merged over its section (None removes the section)."""
    for section, values in sections.items():
        if values is None:
            tree.pop(section, None)
        else:
            tree.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def loaders_from(root, **options) -> Loaders:
    """build_loaders on `root`: the options that are data-section keys (backend, batch_size, …) make
    the section, a DataConfig (batch_size 32 and workers 2 unless given: the tests' sets are small),
    and the others (rank, world_size, seed, device, channels_last, train, decode) are passed on. The
    section's own check that the paths exist is left out, so that what a test sees is the data
    package's error naming the path."""
    keys = DataConfig.model_fields
    fields = {"root": root, "batch_size": 32, "workers": 2} | {k: v for k, v in options.items() if k in keys}
    section = DataConfig.model_validate(fields, context={"check_paths": False})
    return build_loaders(section, **{k: v for k, v in options.items() if k not in keys})
