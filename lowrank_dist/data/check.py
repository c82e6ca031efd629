"""Pre-flight check of an ImageNet-layout data set: every problem the loaders would meet, at once.

    python -m lowrank_dist.data.check ROOT [--decode] [--list FILE] [--jobs N]

Prints one line per finding, sorted by path, then a summary line. Problems: a missing train/ or
val/ folder, class folders without images, val classes that train lacks, and every image the
loaders treat as bad (zero-byte, unreadable, not a JPEG or PNG, truncated — see `integrity`; with
--decode also whatever PIL cannot decode). Notes, which do not fail the check: images the decoders
convert to RGB (grayscale, CMYK, PNG), files the loaders ignore (not .JPEG/.jpg, or outside a
class folder), train classes without val images. `--list FILE` writes the path of every file with a
problem to FILE, one per line (to move them aside, or to keep for the record).
Exit status: 0 clean, 1 problems found, 2 bad usage (e.g. ROOT does not exist).

Speed: without --decode each file costs one stat and two small reads — the first 64 KiB (the JPEG
header up to the image data, or the PNG header) and the last 4 KiB (the end-of-image marker); only
a file that looks bad that way is read in full to confirm it. The files are spread over --jobs
processes (default: one per CPU core), so ImageNet's 1.33M files take minutes on local disk.
--decode decodes every image in full with PIL: about as long as one epoch of decoding.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

from ..files import exit_code_for, reason, write_text_atomic
from .integrity import MAX_IMAGE_PIXELS, BadImage, ImageInfo, decode_rgb, inspect_image, oversized, read_bytes
from .samples import IMAGE_EXTENSIONS

HEAD, TAIL = 64 * 1024, 4 * 1024


class Finding(NamedTuple):
    path: str
    what: str
    problem: bool  # False: a note


def _probe(path: str, decode: bool) -> tuple[bytes, bool, int]:
    """(the bytes inspect_image needs, whether they are only part of the file, the file's size):
    the whole file, or (large files, headers only) its head and tail with a 0 byte between them,
    so that no marker can form across the seam."""
    if decode:
        data = read_bytes(path)
        return data, False, len(data)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= HEAD + TAIL:
                return f.read(), False, size
            head = f.read(HEAD)
            f.seek(size - TAIL)
            return head + b"\x00" + f.read(TAIL), True, size
    except OSError as error:
        raise BadImage(f"cannot be read: {error.strerror or error}") from None


def inspect_file(path: str, decode: bool = False) -> tuple[int, ImageInfo]:
    """(size in bytes, inspect_image's answer) for one file, reading only its head and tail unless
    they look bad; BadImage if the loaders would treat it as bad (with `decode`, PIL must decode it too)."""
    data, partial, size = _probe(path, decode)
    try:
        info = inspect_image(data)
    except BadImage:
        if not partial:
            raise
        data = read_bytes(path)  # a large header or trailing bytes: look at it all
        info, size = inspect_image(data), len(data)
    if decode:
        decode_rgb(data)
    return size, info


def check_image(path: str, decode: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> Finding | None:
    """A problem or a note about one image file, or None if the loaders take it as it is."""
    try:
        _, info = inspect_file(path)
        if (why := oversized(info.width, info.height, max_pixels)) is not None:
            return Finding(path, why, True)  # never decoded: that is what could exhaust memory
        if decode:
            inspect_file(path, decode=True)
    except BadImage as bad:
        return Finding(path, str(bad), True)
    except OSError as error:  # the file vanished or cannot be stat'ed
        return Finding(path, f"cannot be read: {error.strerror or error}", True)
    if info.note:
        return Finding(path, f"{info.note}: decoded to RGB", False)
    return None


def _check_chunk(paths: list[str], decode: bool, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Finding]:
    return [finding for path in paths if (finding := check_image(path, decode, max_pixels)) is not None]


def _is_folder(entry: os.DirEntry, findings: list[Finding]) -> bool | None:
    """Whether `entry` is a folder; None (and a finding) where it cannot even be stat'ed: a symlink
    loop (ELOOP), a link to a file that vanished, no permission."""
    try:
        return entry.is_dir()
    except OSError as error:
        findings.append(Finding(entry.path, f"cannot be read: {error.strerror or error}"
                                + (" (a symbolic link that points back at itself)" if error.errno == errno.ELOOP else ""),
                                True))
        return None


def scan_layout(root: Path) -> tuple[dict[str, list[str]], list[Finding], int]:
    """({"train": image paths, "val": image paths}, layout findings, number of train classes)."""
    images: dict[str, list[str]] = {"train": [], "val": []}
    findings: list[Finding] = []
    classes: dict[str, set[str]] = {"train": set(), "val": set()}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            findings.append(Finding(str(folder), f"missing: the {split} split must be at ROOT/{split}/<class>/", True))
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            kind = _is_folder(entry, findings)
            if kind is None:
                continue
            if not kind:
                findings.append(Finding(entry.path, "ignored: not in a class folder", False))
                continue
            classes[split].add(entry.name)
            count = 0
            for item in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if _is_folder(item, findings) is None:
                    continue
                if item.is_file() and item.name.lower().endswith(IMAGE_EXTENSIONS):
                    images[split].append(item.path)
                    count += 1
                else:
                    findings.append(Finding(item.path, "ignored: not a .JPEG/.jpg file", False))
            if count == 0:
                findings.append(Finding(entry.path, "empty class folder: no .JPEG/.jpg images", True))
        if not classes[split]:
            findings.append(Finding(str(folder), "no class folders", True))
    if classes["train"]:
        for name in sorted(classes["val"] - classes["train"]):
            findings.append(Finding(str(root / "val" / name), "val class not among the train classes", True))
        if classes["val"]:
            for name in sorted(classes["train"] - classes["val"]):
                findings.append(Finding(str(root / "train" / name), "no val folder for this class", False))
    return images, findings, len(classes["train"])


def check_images(paths: list[str], decode: bool = False, jobs: int = 1, max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> list[Finding]:
    if jobs <= 1 or len(paths) < 512:
        return _check_chunk(paths, decode, max_pixels)
    size = max(64, min(1024, len(paths) // (jobs * 8)))
    chunks = [paths[start:start + size] for start in range(0, len(paths), size)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return [f for found in pool.map(_check_chunk, chunks, [decode] * len(chunks), [max_pixels] * len(chunks))
                for f in found]


def shown(path: str) -> str:
    """A path for the terminal: bytes of a name that is not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def report(findings: Iterable[Finding]) -> None:
    for finding in sorted(findings):
        print(f"{'PROBLEM' if finding.problem else 'note':8}{shown(finding.path)}  {finding.what}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="data set folder holding train/<class>/*.JPEG and val/<class>/*.JPEG")
    parser.add_argument("--decode", action="store_true", help="also decode every image in full with PIL (slow)")
    parser.add_argument("--list", type=Path, metavar="FILE", help="write the path of each file with a problem here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: CPU cores)")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS, metavar="N",
                        help=f"an image declaring more pixels is a problem (data.max_image_pixels; default {MAX_IMAGE_PIXELS:,})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.root.is_dir():
        print(f"error: data root {str(args.root)!r} does not exist", file=sys.stderr)
        return 2
    started = time.perf_counter()
    images, findings, classes = scan_layout(args.root)
    findings += check_images(images["train"] + images["val"], args.decode, args.jobs, args.max_image_pixels)
    report(findings)
    problems = sorted(f.path for f in findings if f.problem)
    if args.list is not None:
        try:
            write_text_atomic(args.list, "".join(f"{path}\n" for path in problems), errors="surrogateescape")
        except OSError as error:
            print(f"error: --list: could not write {str(args.list)!r} ({reason(error)})", file=sys.stderr)
            return exit_code_for(error)
    print(
        f"checked {len(images['train'])} train and {len(images['val'])} val images in {classes} classes"
        f" ({'decoded' if args.decode else 'headers only'}, {time.perf_counter() - started:.1f} s):"
        f" {len(problems)} problem{'s' * (len(problems) != 1)}, {len(findings) - len(problems)} notes"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
