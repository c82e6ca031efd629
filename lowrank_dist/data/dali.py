"""The DALI back-end: decode, crop, resize, mirror and normalize in DALI, on the CPU or the GPU.

The host feeds DALI through fn.external_source, one batch per pipeline iteration: the encoded
bytes of exactly the samples this rank should see, in order, with each sample's crop window and
mirror flag from the CropPlan. So DALI has no reader, no shuffling, no sharding and no random
operators of its own. That sidesteps the reader pitfalls (NVIDIA/DALI#2881, #1203, #3855, #4440:
shards that overlap or drop samples without pad_last_batch, a 0-size last batch, an iterator
length that changes after the first epoch), and it makes a resumed epoch exact: a seeded DALI
random operator draws from a per-slot stream, which cannot skip batches without running them.

Per sample the host only reads the file and checks its bytes, which yields the image size
(integrity.inspect_image, tens of µs); fn.decoders.image_slice then decodes just the crop window (libjpeg-turbo on the CPU,
nvJPEG for "mixed"), fn.resize scales it to S×S with an antialiased linear filter like PIL's, and
fn.crop_mirror_normalize mirrors, converts to float and normalizes in one pass.

Bad images never reach DALI if the host can tell: the callback runs integrity.inspect_image on the
bytes it has just read (zero-byte, not an image, truncated — which libjpeg-turbo decodes without a
word when the crop window stops short of the missing data) and feeds integrity.first_good's
replacement instead. What only a decoder
can find (say, a corrupt Huffman table) makes pipe.run() fail; the pipeline is dead then and
DALI's message does not say which sample it was, so `images` decodes that batch's files with PIL
to find it, marks it bad, builds a new pipeline and redoes the batch from there.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from .integrity import BadImage, ImageInfo, decode_rgb, first_good, inspect_image, read_bytes
from .loaders import Batch
from .samples import DataError, Samples
from .sampling import CropPlan

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


class _BatchSource:
    """DALI's external_source callback: iteration i → (encoded images, crop anchors (x, y), crop
    shapes (w, h), mirror flags) of batch i; StopIteration after the last batch ends the pipeline.
    `filled[i]` is then (the sample in each slot, the bad samples met) for batch i."""

    def __init__(self, paths: list[str], plan: CropPlan, batches: list[np.ndarray], epoch: int | None,
                 known_bad: Mapping[int, str]):
        self.paths, self.plan, self.batches, self.epoch, self.known_bad = paths, plan, batches, epoch, known_bad
        self.filled: dict[int, tuple[np.ndarray, list[tuple[int, str]]]] = {}

    def _load(self, index: int) -> tuple[bytes, ImageInfo]:
        data = read_bytes(self.paths[index])
        return data, inspect_image(data)

    def __call__(self, iteration: int):
        if iteration >= len(self.batches):
            raise StopIteration
        encoded, anchors, shapes, mirrors, used, bad = [], [], [], [], [], []
        for slot in self.batches[iteration]:
            index, (data, info), found = first_good(int(slot), len(self.paths), self.known_bad, self._load)
            box = self.plan.box(self.epoch, int(slot), info.width, info.height)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            anchors.append(np.array([box.left, box.top], dtype=np.int32))
            shapes.append(np.array([box.width, box.height], dtype=np.int32))
            mirrors.append(np.array(box.flip, dtype=np.int32))
            used.append(index)
            bad += found
        self.filled[iteration] = (np.array(used, dtype=np.int64), bad)
        return encoded, anchors, shapes, mirrors


class DaliBackend:
    """`dali_device` "cpu" or "gpu", as checked by check_dali."""

    def __init__(self, samples: Samples, plan: CropPlan, dali_device: str, workers: int, device: torch.device,
                 channels_last: bool):
        self.name = f"dali-{dali_device}"
        self.paths, self.plan, self.dali_device = samples.paths, plan, dali_device
        self.threads, self.device, self.channels_last = max(1, workers), device, channels_last
        if dali_device == "gpu":
            self.device_id = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None

    def _pipeline(self, source: _BatchSource, batch_size: int) -> Pipeline:
        pipe = Pipeline(batch_size=batch_size, num_threads=self.threads, device_id=self.device_id)
        with pipe:
            encoded, anchors, shapes, mirrors = fn.external_source(
                source=source, num_outputs=4, batch=True,
                dtype=[types.UINT8, types.INT32, types.INT32, types.INT32], ndim=[1, 1, 1, 0],
            )
            # adjust_orientation=False: crop windows are in stored-pixel coordinates, as PIL sees them
            images = fn.decoders.image_slice(
                encoded, anchors, shapes, axis_names="WH", output_type=types.RGB, adjust_orientation=False,
                device="mixed" if self.dali_device == "gpu" else "cpu",
            )
            images = fn.resize(images, size=[self.plan.image_size] * 2, interp_type=types.INTERP_LINEAR, antialias=True)
            images = fn.crop_mirror_normalize(
                images, mirror=mirrors, dtype=types.FLOAT,
                mean=list(self.plan.scaling[0]), std=list(self.plan.scaling[1]),
                # NHWC output is N×3×S×S in channels_last order once permuted, with no copy
                output_layout="HWC" if self.channels_last else "CHW",
            )
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _culprits(self, indices: np.ndarray, error: RuntimeError) -> dict[int, str]:
        """The samples of a batch DALI failed on that PIL cannot decode either, index → why."""
        culprits = {}
        for index in dict.fromkeys(indices.tolist()):
            try:
                decode_rgb(read_bytes(self.paths[index]))
            except BadImage as bad:
                culprits[index] = str(bad)
        if not culprits:
            lines = [line for line in str(error).splitlines() if line.strip() and "no longer valid" not in line]
            raise DataError(
                f"DALI could not decode a batch whose {len(indices)} images PIL decodes"
                f" (first: {self.paths[indices[0]]!r}): {lines[-1] if lines else error}"
            ) from error
        return culprits

    def images(self, batches: list[np.ndarray], epoch: int | None, known_bad: Mapping[int, str]) -> Iterator[Batch]:
        if not batches:
            return
        on_gpu = self.device_id is not None
        stream = torch.cuda.current_stream(self.device_id) if on_gpu else None
        failed: dict[int, str] = {}  # bad samples only a failed pipeline revealed, this call
        unreported: dict[int, str] = {}  # … not yet reported: they go with the batch they broke
        done = 0  # batches yielded
        while done < len(batches):
            start = done
            source = _BatchSource(self.paths, self.plan, batches[start:], epoch, ChainMap(failed, known_bad))
            pipe = self._pipeline(source, max(map(len, batches[start:])))
            try:
                for _ in batches[start:]:
                    (output,) = pipe.run()
                    dense = output.as_tensor()
                    target = torch.empty(dense.shape(), dtype=torch.float32,
                                         device=f"cuda:{self.device_id}" if on_gpu else "cpu")
                    feed_ndarray(dense, target, cuda_stream=stream)  # copies: DALI reuses its output buffers
                    if self.channels_last:
                        target = target.permute(0, 3, 1, 2)
                    indices, bad = source.filled[done - start]
                    bad, unreported = list(unreported.items()) + bad, {}
                    yield Batch(target.to(self.device, non_blocking=True), indices, bad)
                    done += 1
            except RuntimeError as error:  # a decoder failed on batch `done`: find the sample, redo the batch
                if done - start not in source.filled:
                    raise
                culprits = self._culprits(source.filled[done - start][0], error)
                failed.update(culprits)
                unreported.update(culprits)
