"""What the data set holds: (path, label) pairs read from an ImageNet-layout folder or from file lists.

Folder layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG. Labels are the index of the
class folder among the sorted train/ class folders, as torchvision's ImageFolder and DALI's
fn.readers.file(file_root=...) number them, so a checkpoint means the same thing under either
back-end. A list file has one `relative/path label` line per image (DALI's file_list format),
paths relative to root. Every problem is found here, before training starts, and raised as one
DataError that names the file or folder.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpeg", ".jpg")


class DataError(ValueError):
    """Bad data input; the message names the file or folder and what is wrong with it."""


@dataclass(frozen=True)
class Samples:
    paths: list[str]  # absolute
    labels: np.ndarray  # int64, one per path
    # from the index (`index`): per image its bytes, width and height (0 if bad), and index → why
    # for the images whose bytes fail integrity.inspect_image
    sizes: np.ndarray | None = None
    widths: np.ndarray | None = None
    heights: np.ndarray | None = None
    bad: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def ignore_interrupts(*_) -> None:
    """In a worker process (the index's pool, the torchvision DataLoader's): Ctrl-C at a terminal
    reaches every process of its group, and the train command turns it into a stop request; a
    worker that died of it would end the run instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_folder(entry: os.DirEntry) -> bool:
    """entry.is_dir(), with a DataError naming it where it cannot even be stat'ed (a symbolic link
    pointing back at itself: ELOOP; no permission)."""
    try:
        return entry.is_dir()
    except OSError as error:
        loop = " (a symbolic link that points back at itself)" if error.errno == errno.ELOOP else ""
        raise DataError(f"{str(entry.path)!r} cannot be read: {error.strerror or error}{loop}; remove it or fix"
                        " the link") from None


def class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise DataError(f"data folder {str(split)!r} does not exist (expected root/train and root/val)")
    classes = sorted(entry.name for entry in os.scandir(split) if is_folder(entry))
    if not classes:
        raise DataError(f"data folder {str(split)!r} has no class folders (expected {split}/<class>/*.JPEG)")
    return classes


def scan_split(split: Path, class_index: dict[str, int]) -> Samples:
    """Images of split/<class>/ for every class folder there; each must be a known, non-empty class."""
    paths, labels = [], []
    for name in class_folders(split):
        if name not in class_index:
            raise DataError(f"class folder {str(split / name)!r} is not among the train classes")
        folder = split / name
        images = sorted(entry.path for entry in os.scandir(folder)
                        if _is_image(entry.name) and not is_folder(entry) and entry.is_file())
        if not images:
            raise DataError(f"class folder {str(folder)!r} holds no .JPEG/.jpg images")
        paths += images
        labels += [class_index[name]] * len(images)
    return Samples(paths, np.asarray(labels, dtype=np.int64))


def read_list(root: Path, list_file: Path, num_classes: int | None, check_files: bool = True) -> Samples:
    """`relative/path label` lines; the path may hold spaces (the label is the last field).
    `check_files=False` skips checking that each image exists (one stat per line)."""
    if not list_file.is_file():
        raise DataError(f"list file {str(list_file)!r} does not exist")
    paths, labels = [], []
    # bytes that are not UTF-8 kept as they are (surrogateescape): such a line names a file whose
    # name is not UTF-8, which the file system takes back as the same bytes
    text = list_file.read_bytes().decode("utf-8", "surrogateescape")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        where = f"list file {str(list_file)!r} line {number}"
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{where}: expected 'relative/path label' with an integer label ≥ 0, got {line!r}")
        path, label = root / fields[0], int(fields[1])
        if num_classes is not None and label >= num_classes:
            raise DataError(f"{where}: label {label} is out of range for the {num_classes} train classes")
        if check_files and not path.is_file():
            raise DataError(f"{where}: image {str(path)!r} does not exist")
        paths.append(str(path))
        labels.append(label)
    if not paths:
        raise DataError(f"list file {str(list_file)!r} lists no images")
    return Samples(paths, np.asarray(labels, dtype=np.int64))


def load_samples(
    root: str | os.PathLike, train_list: str | os.PathLike | None = None, val_list: str | os.PathLike | None = None,
    with_train: bool = True, jobs: int | None = None, rebuild: bool = False,
) -> tuple[list[str], Samples | None, Samples]:
    """(class names, train samples, val samples), from the data index (built or rebuilt first if it
    is missing or stale: `index`). With a train list the classes are named "0".."K-1", K = its
    largest label + 1, since a list carries numbers, not folder names. `with_train=False`
    (evaluation) finds the classes without listing, checking or indexing the train images: train is None."""
    from .index import split_samples

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist")
    train = None
    if train_list is not None:
        train_list = Path(train_list)
        if with_train:
            if not train_list.is_file():
                raise DataError(f"list file {str(train_list)!r} does not exist")
            train = split_samples(root, "train", classes=None, list_file=train_list, jobs=jobs, rebuild=rebuild)
        else:
            train = read_list(root, train_list, None, check_files=False)
        classes = [str(label) for label in range(int(train.labels.max()) + 1)]
    else:
        classes = class_folders(root / "train")
        if with_train:
            train = split_samples(root, "train", classes=classes, jobs=jobs, rebuild=rebuild)
    if val_list is not None:
        val_list = Path(val_list)
        if not val_list.is_file():
            raise DataError(f"list file {str(val_list)!r} does not exist")
        val = split_samples(root, "val", classes=classes, list_file=val_list, num_classes=len(classes), jobs=jobs,
                            rebuild=rebuild)
    else:
        class_folders(root / "val")  # a missing val folder is named as such
        val = split_samples(root, "val", classes=classes, jobs=jobs, rebuild=rebuild)
    return classes, train if with_train else None, val
