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
a file that looks bad that way is read in full to confirm it (`integrity.inspect_file`, as the data
index reads them). The files are spread over --jobs processes (default: one per CPU core this process
may use), so ImageNet's 1.33M files take minutes on local disk.
--decode decodes every image in full with PIL: about as long as one epoch of decoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import NamedTuple

from ..files import exit_code_for, reason, write_text_atomic
from .integrity import MAX_IMAGE_PIXELS, BadImage, inspect_file, oversized
from .parallel import map_chunks, usable_cpus
from .samples import scan_folder


class Finding(NamedTuple):
    path: str
    what: str
    problem: bool  # False: a note


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
        listing = scan_folder(folder)
        findings += [Finding(path, f"cannot be read: {why}", True) for path, why in listing.unreadable]
        findings += [Finding(path, "ignored: not in a class folder", False) for path in listing.images + listing.others]
        for name in listing.folders:
            classes[split].add(name)
            inside = scan_folder(folder / name)
            findings += [Finding(path, f"cannot be read: {why}", True) for path, why in inside.unreadable]
            images[split] += inside.images
            ignored = [str(folder / name / sub) for sub in inside.folders] + inside.others
            findings += [Finding(path, "ignored: not a .JPEG/.jpg file", False) for path in ignored]
            if not inside.images:
                findings.append(Finding(str(folder / name), "empty class folder: no .JPEG/.jpg images", True))
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
    return map_chunks(partial(_check_chunk, decode=decode, max_pixels=max_pixels), paths, jobs)


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
    parser.add_argument("--jobs", type=int, default=usable_cpus(),
                        help="processes (default: the CPU cores this process may use)")
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
