"""What the data set holds: (path, label) pairs, from an ImageNet-layout folder or from file lists.

Folder layout: root/train/<class>/*.JPEG and root/val/<class>/*.JPEG. Labels are the index of the
class folder among the sorted train/ class folders, as torchvision's ImageFolder and DALI's
fn.readers.file(file_root=...) number them, so a checkpoint means the same thing under either
back-end. A list file has one `relative/path label` line per image (DALI's file_list format),
paths relative to root. Every problem is found here, before training starts, and raised as one
DataError that names the file or folder. `scan_folder` is the one place a folder is listed: the
loaders, the data index and the pre-flight check (`check`) all see the same images.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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


class Folder(NamedTuple):
    """One folder's entries by what the loaders make of them, each list sorted by name."""

    folders: list[str]  # names of the sub-folders (in a split folder: the class folders)
    images: list[str]  # paths of the .JPEG/.jpg files
    others: list[str]  # paths of every other entry (files the loaders ignore, broken links, …)
    unreadable: list[tuple[str, str]]  # (path, why) of entries that cannot even be stat'ed

    def check_readable(self) -> None:
        """DataError naming the first entry that cannot be stat'ed (the loaders cannot tell what it is)."""
        if self.unreadable:
            path, why = self.unreadable[0]
            raise DataError(f"{str(path)!r} cannot be read: {why}; remove it or fix the link")


def _why_unreadable(error: OSError) -> str:
    loop = " (a symbolic link that points back at itself)" if error.errno == errno.ELOOP else ""
    return f"{error.strerror or error}{loop}"


def scan_folder(folder: Path) -> Folder:
    """List `folder` once (OSError if it cannot be listed). An entry that cannot be stat'ed (a
    symbolic link pointing back at itself: ELOOP; no permission) goes to `unreadable`."""
    listing = Folder([], [], [], [])
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            try:
                if entry.is_dir():
                    listing.folders.append(entry.name)
                elif entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    listing.images.append(entry.path)
                else:
                    listing.others.append(entry.path)
            except OSError as error:
                listing.unreadable.append((entry.path, _why_unreadable(error)))
    return listing


def class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise DataError(f"data folder {str(split)!r} does not exist (expected root/train and root/val)")
    listing = scan_folder(split)
    listing.check_readable()
    classes = listing.folders
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
        listing = scan_folder(folder)
        listing.check_readable()
        images = listing.images
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
