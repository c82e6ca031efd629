"""Bad images: what counts as one, where it is caught, and what the loaders put in its place.

Policy, the same in both back-ends (the bytes decide, not the file name):

    JPEG, 3 components                  decoded
    JPEG, grayscale or CMYK/YCCK        decoded and converted to RGB (PIL's convert, DALI's RGB output)
    PNG (even if named .JPEG)           decoded to RGB (ImageNet's train set holds one); alpha dropped
    zero-byte file                      bad
    not an image (text, HTML, …)        bad
    other formats (GIF, BMP, …)         bad: only JPEG and PNG are decoded
    truncated JPEG / PNG                bad, even where a decoder could show part of it: DALI
                                        decodes a crop window that stops short of the missing data
                                        without a word and fails on one that reaches it, so whether
                                        the sample trained would hang on its random crop; PIL refuses
                                        them all (a JPEG missing only its end marker included)
    anything else a decoder rejects     bad (e.g. a corrupt Huffman table behind a valid header)
    a file that cannot be read          bad (permissions, I/O error)

`data.on_bad_image: error` (the default) stops at the first bad image with a DataError naming the
file; `skip` replaces it by the rule below and counts it (see `Replaced`).

Where the check runs. ImageNet has 1.28M train files and is often on a network file system, so
no rank opens every file at start-up. The data index (`index`) is built once, by one process on all
cores: it runs the byte check (`inspect_image`: magic number, the JPEG marker walk up to the image
data, the frame size, an end-of-image marker after it; the PNG header and IEND chunk) on each file's
head and tail (`inspect_file`), and records the bad ones with the reason. The loaders plan every
pass with those already replaced, so the back-ends never read them. Decode failures are caught where the decoding
happens: PIL in the torchvision workers; in DALI, whose error does not name the sample, by
re-checking the failed batch with PIL (`dali`). So every bad file is caught no later than the first
epoch (and the first evaluation, for val), and `python -m lowrank_dist.data.check ROOT` finds them
all up front, `--decode` included.

The replacement rule (written here once; the other modules and docs/design.md refer to it) keeps
sharding, exact resume and val counting intact. Sample indices never move (no file is dropped
from the list, so no label or crop shifts); a bad sample's slot is filled with the first good
sample after it in the split's list (wrapping around), chosen by a rule that depends only on the
files' bytes — not on what was met before — so a resumed epoch and an uninterrupted one fill the
same slots with the same samples (`first_good` for one slot, `fill_slots` for a whole pass at
once). The label is always the label of the sample actually decoded: the back-ends report which
index fills each slot and the loaders look its label up. Batch shapes stay fixed, so every rank still runs the same number of same-sized batches.
In val the replacement is marked invalid, like sharding's padding, so each good val image is
counted exactly once over all ranks and each bad one not at all.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from .samples import DataError

OnBadImage = Literal["error", "skip"]  # data.on_bad_image: stop naming the image, or replace and count it
HEAD, TAIL = 64 * 1024, 4 * 1024  # the bytes of a file inspect_file reads: its header, its end marker
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SOF = {m for m in range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
_STANDALONE = set(range(0xD0, 0xD9)) | {0x01}  # markers without a length field (RSTn, SOI, TEM)


class BadImage(ValueError):
    """A file that is not a decodable image; the message says why (without the path)."""


# data.max_image_pixels' default: PIL's own limit (Image.MAX_IMAGE_PIXELS, ~89.5 Mpx), which the
# torchvision back-end always had. A JPEG of a few KB can declare 60000×60000 pixels (a
# "decompression bomb", ~10 GB once decoded); DALI has no such limit, so the index's width and
# height decide for both back-ends: over the limit, an image is bad and never decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def oversized(width: int, height: int, limit: int) -> str | None:
    """Why an image of width×height is bad under `limit` (data.max_image_pixels), or None."""
    if width * height <= limit:
        return None
    return (f"its header declares {width}×{height} = {width * height:,} pixels, over data.max_image_pixels"
            f" ({limit:,}): decoding it could exhaust memory")


def mark_oversized(samples, limit: int) -> None:
    """Add to `samples.bad` every image whose indexed size is over `limit` pixels."""
    if samples is None or samples.widths is None:
        return
    # int64: a JPEG side is at most 65,535, a PNG's 2^31 − 1, so the product fits
    pixels = samples.widths.astype(np.int64) * samples.heights.astype(np.int64)
    for index in np.flatnonzero(pixels > limit).tolist():
        if index not in samples.bad:
            samples.bad[index] = oversized(int(samples.widths[index]), int(samples.heights[index]), limit)


class ImageInfo(NamedTuple):
    format: str  # "JPEG" or "PNG"
    width: int
    height: int
    note: str | None  # set when the decoders convert it to RGB: "grayscale JPEG", "CMYK JPEG", …


def _jpeg_info(data: bytes) -> ImageInfo:
    position, frame = 2, None
    while True:
        position = data.find(b"\xff", position)  # like libjpeg and PIL, skip junk between segments
        if position == -1 or position + 1 >= len(data):
            raise BadImage("truncated JPEG: the file ends inside its header")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker == 0xD9:
            raise BadImage("corrupt JPEG: end-of-image marker before any image data")
        if position + 4 > len(data):
            raise BadImage("truncated JPEG: the file ends inside its header")
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if length < 2 or position + 2 + length > len(data):
            raise BadImage("truncated JPEG: the file ends inside its header" if length >= 2
                           else f"corrupt JPEG: marker segment of length {length}")
        if marker in _SOF:
            if length < 8:
                raise BadImage("corrupt JPEG: short frame header")
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            frame = (width, height, data[position + 9])
        elif marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        position += 2 + length
    if frame is None:
        raise BadImage("corrupt JPEG: image data without a frame header")
    width, height, components = frame
    if width == 0 or height == 0:
        raise BadImage(f"corrupt JPEG: frame size {width}×{height}")
    if components not in (1, 3, 4):
        raise BadImage(f"unsupported JPEG: {components} colour components")
    # an EOI marker can only appear as a marker: 0xFF in entropy-coded data is stuffed as FF 00.
    # Searched from the end, where it is: a forward search would scan all the image data.
    if data.rfind(b"\xff\xd9", position + 2) == -1:
        raise BadImage("truncated JPEG: no end-of-image marker after the image data")
    note = {1: "grayscale JPEG", 4: "CMYK JPEG"}.get(components)
    return ImageInfo("JPEG", width, height, note)


def _png_info(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage("truncated PNG: the file ends inside its header")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width == 0 or height == 0:
        raise BadImage(f"corrupt PNG: size {width}×{height}")
    if data.rfind(b"IEND") == -1:
        raise BadImage("truncated PNG: no IEND chunk")
    colour = {0: "grayscale ", 2: "", 3: "palette ", 4: "grayscale+alpha ", 6: "RGBA "}.get(data[25], "")
    return ImageInfo("PNG", width, height, f"a {colour}PNG, not a JPEG")


def inspect_image(data: bytes) -> ImageInfo:
    """Format, size and conversion note of an encoded image, from its bytes, without decoding;
    BadImage if it is empty, not a JPEG or PNG, or visibly truncated or corrupt."""
    if not data:
        raise BadImage("empty (zero-byte) file")
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_info(data)
    if data[:8] == PNG_MAGIC:
        return _png_info(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception:  # noqa: BLE001 - PIL raises many types for unknown data
        raise BadImage(f"not an image (starts with {data[:16]!r})") from None
    raise BadImage(f"a {kind} image: only JPEG and PNG are decoded")


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise BadImage(f"cannot be read: {error.strerror or error}") from None


def decode_rgb(data: bytes) -> Image.Image:
    """The image as a fully decoded RGB PIL image (grayscale, CMYK and PNG converted), or BadImage."""
    inspect_image(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # convert loads: a decoder error surfaces here
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, …
        raise BadImage(f"cannot be decoded: {error}") from None


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


# -- the replacement rule ----------------------------------------------------------------------------


def first_good(index: int, count: int, known_bad: Mapping[int, str], load: Callable[[int], object]):
    """(good index, load(good index), [(bad index, reason), …]): `index` if load accepts it, else the
    first index after it (mod count) that it accepts. `load` raises BadImage for a bad sample;
    `known_bad` ones are not tried again. The answer depends only on which samples are bad."""
    found = []
    for step in range(count):
        candidate = (index + step) % count
        if candidate in known_bad:
            continue
        try:
            return candidate, load(candidate), found
        except BadImage as error:
            found.append((candidate, str(error)))
    raise DataError(f"none of the {count} images of this split can be decoded: {found[0][1] if found else ''}")


def fill_slots(slots: np.ndarray, count: int, bad: Mapping[int, str], reported: Mapping[int, str]
               ) -> tuple[np.ndarray, dict[int, list[tuple[int, str]]]]:
    """first_good for every slot of a pass at once, against the bad samples known in advance (the
    index's and those found so far): (the sample filling each slot, position → the bad samples
    passed over for it that are not in `reported`)."""
    slots = np.asarray(slots, dtype=np.int64)
    if not bad:
        return slots.copy(), {}
    is_bad = np.zeros(count, dtype=bool)
    is_bad[np.fromiter(bad.keys(), dtype=np.int64)] = True
    good = np.flatnonzero(~is_bad)
    if not len(good):
        raise DataError(f"none of the {count} images of this split can be decoded: {next(iter(bad.values()))}")
    filled = good[np.searchsorted(good, slots) % len(good)]  # the first good one at or after, wrapping
    met = {}
    for position in np.flatnonzero(is_bad[slots]).tolist():
        index, chain = int(slots[position]), []
        while index != filled[position]:
            if index not in reported:
                chain.append((index, bad[index]))
            index = (index + 1) % count
        met[position] = chain
    return filled, met


@dataclass
class Replaced:
    """The bad images one loader has replaced on this rank (`data.on_bad_image: skip`)."""

    count: int = 0  # batch slots whose image was bad and was replaced, cumulative over epochs
    reasons: dict[str, str] = field(default_factory=dict)  # each bad file met → why, in the order met

    @property
    def paths(self) -> list[str]:
        return list(self.reasons)
