"""The DALI back-end: read and decode in DALI's own threads, on the CPU or the GPU. Every DALI
pipeline of the data package is built here, in one style (`_new_pipeline`, `with pipe:`, `_copied`).

The host plans each pass (an epoch from its start batch, or the val set) in one go: which sample
fills each slot (the index's bad images replaced, `integrity.fill_slots`) and every crop window and
mirror flag (`CropWindows.boxes`, vectorised over the index's image sizes). DALI then does the rest:
fn.readers.file reads exactly those files, in that order, in its own loader thread. On the GPU,
fn.decoders.image_slice decodes just each crop window (nvJPEG, "mixed"), fn.resize scales it to
S×S with an antialiased linear filter like PIL's and fn.flip mirrors it, so the batch stays on the
device end to end. On the CPU, fn.decoders.image decodes each image (libjpeg-turbo), fn.slice cuts
the window, and torch's antialiased bilinear resize scales and mirrors it (`_resized`): DALI's CPU
resize costs more than the decoding. The crop windows reach DALI through a batch-mode
fn.external_source whose callback only slices the planned arrays (a few µs per batch). All of
this runs in DALI's threads and in the loaders' background thread (`loaders.Ahead`), with DALI's
prefetch_queue_depth and the loaders' queue keeping batches in flight while the step runs: nothing
per image on the training thread.
The output is uint8 N×S×S×3 of our own; the loaders normalise it on their device.

The reader gets one rank's files in the planned order, unshuffled and unsharded: DALI has no
sharding, shuffling or random operators of its own. That sidesteps the reader pitfalls
(NVIDIA/DALI#2881, #1203, #3855, #4440: shards that overlap or drop samples, a 0-size last batch,
an iterator length that changes after the first epoch) and makes a resumed epoch exact. The reader's
labels are the positions in that list, and each batch's are checked, so a reader out of step could
not go unnoticed; its byte counts (the encoded tensors' shapes) are checked against the index.

Bad images the index knows never reach DALI. What only a decoder can find (say, a corrupt Huffman
table) makes pipe.run() fail; the pipeline is dead then and DALI's message does not say which sample
it was, so `images` decodes the files of that batch (and of those prefetched behind it) with PIL to
find it, marks it bad, builds a new pipeline and redoes the pass from that batch. If PIL decodes
every one of them, the decoders disagree: a DataError under either on_bad_image setting, not bad data.

CIFAR-10 (`cifar`) is held in memory, so its pipeline (`cifar_batches`) has no reader and no decoder:
fn.external_source hands DALI the planned batches of uint8 arrays and fn.flip mirrors them.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from .augment import Boxes, CropWindows
from .integrity import BadImage, decode_rgb, fill_slots, read_bytes
from .loaders import AHEAD, Batch, BufferRing
from .samples import DataError, Samples

PREFETCH = 2  # batches DALI prepares ahead of the one the step uses

try:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # the dali extra is optional
    Pipeline = None


def dali_available() -> bool:
    return Pipeline is not None


def check_dali(dali_device: str) -> str:
    """The DALI device to use ("auto" resolved), or a DataError saying what is missing."""
    if not dali_available():
        raise DataError(
            "data.backend: 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130"
            " (or the project's `dali` extra), or set data.backend: torchvision"
        )
    if dali_device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if dali_device == "gpu" and not torch.cuda.is_available():
        raise DataError("data.dali_device: 'gpu' needs a CUDA GPU and none is visible; use 'cpu' or 'auto'")
    return dali_device


def _device_id(dali_device: str, device: torch.device) -> int | None:
    """The CUDA device DALI runs on for "gpu" (the loaders' device, else the current one); None for "cpu"."""
    if dali_device != "gpu":
        return None
    return device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()


def _new_pipeline(batch_size: int, threads: int, device_id: int | None) -> Pipeline:
    """An empty pipeline; the caller defines its graph under `with pipe:`, then calls pipe.build()."""
    return Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=PREFETCH)


def _copied(output, device_id: int | None) -> torch.Tensor:
    """A uint8 tensor of our own holding a dense DALI output batch, on DALI's device. DALI may reuse
    its output buffer at the next pipe.run(): on the GPU this (background) thread waits for the copy,
    and for the step queued before it on the stream; the training thread never does."""
    dense = output.as_tensor()
    if device_id is None:
        target = torch.empty(dense.shape(), dtype=torch.uint8)
        feed_ndarray(dense, target)
        return target
    target = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{device_id}")  # the caching allocator's
    stream = torch.cuda.current_stream(device_id)
    feed_ndarray(dense, target, cuda_stream=stream)
    copied = torch.cuda.Event()
    copied.record(stream)
    copied.synchronize()
    return target


class _Crops:
    """The external_source callback: iteration i → (crop anchors (x, y), crop shapes (w, h)[, mirror
    flags]) of batch i, slices of arrays planned for the whole pass; mirror flags only if DALI
    mirrors (`with_mirrors`). Iterations past the end (DALI prefetching beyond the last batch)
    repeat the last one; they are never used."""

    def __init__(self, boxes: Boxes, batch_size: int, batches: int, with_mirrors: bool):
        pad = batches * batch_size - len(boxes.left)  # the last batch may be short: the reader pads it
        take = np.concatenate([np.arange(len(boxes.left)), np.full(pad, len(boxes.left) - 1)])
        self.anchors = np.stack([boxes.left[take], boxes.top[take]], axis=1).astype(np.int32)
        self.shapes = np.stack([boxes.width[take], boxes.height[take]], axis=1).astype(np.int32)
        self.mirrors = boxes.flip[take].astype(np.int32)
        self.batch_size, self.batches, self.with_mirrors = batch_size, batches, with_mirrors

    def __call__(self, iteration: int):
        i = min(iteration, self.batches - 1) * self.batch_size
        window = slice(i, i + self.batch_size)
        if self.with_mirrors:
            return self.anchors[window], self.shapes[window], self.mirrors[window]
        return self.anchors[window], self.shapes[window]


class DaliBackend:
    """`dali_device` "cpu" or "gpu", as checked by check_dali; `workers` DALI threads. `decode=False`
    reads, checks and plans without decoding (the loader benchmark's --no-decode)."""

    def __init__(self, samples: Samples, windows: CropWindows, dali_device: str, workers: int, device: torch.device,
                 channels_last: bool, decode: bool = True):
        self.name = f"dali-{dali_device}"
        self.samples, self.windows, self.dali_device, self.decode = samples, windows, dali_device, decode
        self.threads, self.device, self.channels_last = max(1, workers), device, channels_last
        self.scaling = windows.scaling  # the loaders normalise with it (data.augment)
        # the CPU path's resized batches: those in the loaders' queue, the one being normalised, one being filled
        self.resized = BufferRing(torch.device("cpu"), torch.uint8, AHEAD + 2)
        self.device_id = _device_id(dali_device, device)

    def _pipeline(self, files: list[str], crops: _Crops, batch_size: int) -> Pipeline:
        pipe = _new_pipeline(batch_size, self.threads, self.device_id)
        with pipe:
            # labels: the position in `files` (no labels given), checked against the plan
            # dont_use_mmap: plain reads, as DALI advises for network file systems (a cluster's); on
            # this project's 2-core machine with files in page cache they also cost ~25% less CPU
            # than mapping each file (14,600 vs 11,300 images per CPU-second, fn.readers.file alone)
            encoded, positions = fn.readers.file(files=files, pad_last_batch=True, prefetch_queue_depth=PREFETCH,
                                                 dont_use_mmap=True)
            count = 3 if crops.with_mirrors else 2
            anchors, shapes, *mirrors = fn.external_source(
                source=crops, num_outputs=count, batch=True, dtype=[types.INT32] * count, ndim=[1, 1, 0][:count],
            )
            sizes = encoded.shape()  # the bytes read, checked against the index
            if not self.decode:
                pipe.set_outputs(positions, sizes, anchors, shapes, *mirrors)
            else:
                # adjust_orientation=False: crop windows are in stored-pixel coordinates, as PIL sees them
                if self.dali_device == "gpu":  # nvJPEG decodes just the window; resized and mirrored here
                    # jpeg_fancy_upsampling: libjpeg-turbo's chroma upsampling, as the CPU back-ends decode;
                    # nvJPEG's default repeats each chroma sample, 2.8 grey levels off them on average
                    # (bench/jpeg_upsampling.py: 0.18 with the flag)
                    images = fn.decoders.image_slice(encoded, anchors, shapes, axis_names="WH", output_type=types.RGB,
                                                     adjust_orientation=False, jpeg_fancy_upsampling=True,
                                                     device="mixed")
                    images = fn.resize(images, size=[self.windows.image_size] * 2, interp_type=types.INTERP_LINEAR,
                                       antialias=True)
                    images = fn.flip(images, horizontal=mirrors[0])
                else:
                    # the whole image, then the window: DALI 2.4.0's CPU image_slice crashes the
                    # process (SIGSEGV in its decoder's thread pool) within a few epochs with 2+
                    # threads. The windows come out as decoded: `_resized` scales and mirrors them.
                    images = fn.decoders.image(encoded, output_type=types.RGB, adjust_orientation=False)
                    images = fn.slice(images, anchors, shapes, axis_names="WH")
                pipe.set_outputs(positions, sizes, images)
        pipe.build()
        return pipe

    def _culprits(self, indices: np.ndarray, error: RuntimeError) -> dict[int, str]:
        """The samples DALI may have failed on that PIL cannot decode either, index → why."""
        culprits = {}
        for index in dict.fromkeys(indices.tolist()):
            try:
                decode_rgb(read_bytes(self.samples.paths[index]))
            except BadImage as bad:
                culprits[index] = str(bad)
        if not culprits:
            lines = [line for line in str(error).splitlines() if line.strip() and "no longer valid" not in line]
            raise DataError(
                f"DALI could not decode a batch whose {len(indices)} images PIL decodes"
                f" (first: {self.samples.paths[indices[0]]!r}): {lines[-1] if lines else error}"
            ) from error
        return culprits

    def _images(self, output, mirrors: np.ndarray) -> torch.Tensor:
        """uint8 N×S×S×3 of our own from a DALI output: on the GPU a copy of DALI's resized batch (on
        the current stream); on the CPU the decoded crops resized and mirrored here (`_resized`)."""
        if self.device_id is None:
            return self._resized(output, mirrors)
        return _copied(output, self.device_id)

    def _resized(self, crops, mirrors: np.ndarray) -> torch.Tensor:
        """Each decoded crop (h×w×3, a view of DALI's buffer) scaled to S×S with torch's antialiased
        bilinear filter — Pillow's, as the torchvision back-end resizes — and mirrored where planned,
        into a reused uint8 N×S×S×3 batch. Measured on this project's 2-core CPU (500×375 JPEGs,
        ~262×350 crops to 224²), DALI's CPU fn.resize took ~2.6 ms an image against torch's ~0.4 ms
        for the same filter, and decoding an image ~1.8 ms: resizing in DALI would cost more than
        decoding. Runs in the loaders' background thread, off the training thread."""
        side = self.windows.image_size
        batch = self.resized.get((len(mirrors), side, side, 3))  # a short last batch: the reader's padding is left out
        for i in range(len(mirrors)):
            crop = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1).unsqueeze(0)  # 1×3×h×w, channels_last
            scaled = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", antialias=True,
                                                     align_corners=False)[0].permute(1, 2, 0)
            batch[i].copy_(scaled.flip(1) if mirrors[i] else scaled)
        return batch

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        if not batches:
            return
        failed: dict[int, str] = {}  # bad samples only a failed pipeline revealed, this call
        unreported: dict[int, str] = {}  # … not yet reported: they go with the batch they broke
        done = 0  # batches yielded
        while done < len(batches):
            start, run = done, batches[done:]
            size = len(run[0])  # every batch but the last has this size
            slots = np.concatenate(run)
            filled, met = fill_slots(slots, len(self.samples), ChainMap(failed, known_bad, self.samples.bad),
                                     ChainMap(failed, known_bad))
            boxes = self.windows.boxes(epoch, slots, self.samples.widths[filled], self.samples.heights[filled])
            # DALI mirrors unless it hands over unresized crops (decoding on the CPU, see _resized)
            crops = _Crops(boxes, size, len(run), with_mirrors=not (self.decode and self.device_id is None))
            pipe = self._pipeline([self.samples.paths[i] for i in filled], crops, size)
            try:
                for k, batch in enumerate(run):
                    outputs = pipe.run()
                    n, first = len(batch), k * size
                    positions = np.asarray(outputs[0].as_tensor()).reshape(-1)[:n]
                    if not np.array_equal(positions, np.arange(first, first + n)):
                        raise DataError(f"DALI's reader is out of step: batch {start + k} holds files {positions[:4]}…,"
                                        f" planned {first}…")
                    sizes = np.asarray(outputs[1].as_tensor())[:n, 0].astype(np.int64)
                    images = self._images(outputs[2], crops.mirrors[first:first + n])[:n] if self.decode else None
                    bad = list(unreported.items()) + [b for p in range(first, first + n) for b in met.get(p, ())]
                    unreported = {}
                    yield Batch(images, filled[first:first + n], bad, sizes)
                    done += 1
            except RuntimeError as error:  # a decoder failed on batch `done` or one prefetched after it
                k = done - start
                suspects = filled[k * size:(k + 1 + PREFETCH) * size]
                culprits = self._culprits(suspects, error)
                failed.update(culprits)
                unreported.update(culprits)


def cifar_batches(array: np.ndarray, batches: list[np.ndarray], flips: np.ndarray, dali_device: str, threads: int,
                  device: torch.device) -> Iterator[torch.Tensor]:
    """uint8 N×32×32×3 batches of the in-memory CIFAR images `array[batch]`, each mirrored where
    `flips` (one flag per sample) says, on DALI's device."""
    device_id = _device_id(dali_device, device)

    def source(iteration: int):
        if iteration >= len(batches):
            raise StopIteration
        batch = batches[iteration]
        return [array[i] for i in batch], [np.array(flips[i], dtype=np.int32) for i in batch]

    pipe = _new_pipeline(max(map(len, batches)), max(1, threads), device_id)
    with pipe:
        images, mirror = fn.external_source(source=source, num_outputs=2, batch=True, layout=["HWC", ""],
                                            dtype=[types.UINT8, types.INT32])
        if device_id is not None:
            images = images.gpu()
        pipe.set_outputs(fn.flip(images, horizontal=mirror))
    pipe.build()
    for _ in batches:
        (output,) = pipe.run()
        yield _copied(output, device_id)
