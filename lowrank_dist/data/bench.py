"""How fast the train loader feeds, on this machine, with this data: images/s, per core, data wait.

    python -m lowrank_dist.data.bench ROOT [--backend dali|torchvision] [--dali-device cpu|gpu]
        [--batch N] [--workers N] [--seconds S] [--no-decode] [--step-ms X] [--reference] [--json FILE]

It builds this rank's loaders exactly as training does (the data index is built first if missing),
then iterates train epochs for S seconds after the first batch and prints:
  images/s             images delivered per wall-clock second;
  images/s per core    images per CPU-second consumed — user + system time of this process (DALI's
                       threads included) and of its worker processes (torchvision's DataLoader);
                       the number that tells how many cores a GPU's rate needs;
  start-up             seconds to build the loaders (index read, or built), and to the first batch;
  data wait            with --step-ms X: after each batch the thread sleeps X ms, as it would while
                       the GPU runs a step, and the fraction of wall time spent waiting for the next
                       batch is reported (0 when preparation fully overlaps the step).
--no-decode reads, checks and plans every image but decodes none: the host-side feed alone.
--reference times DALI's own fn.readers.file alone over the same files in the same order (what the
host-side feed is measured against). --json FILE writes the numbers (keys images_per_s,
images_per_s_per_core, cores_busy, startup_s, first_batch_s, data_wait_fraction, …).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads), its reaped children and its live
    children (DataLoader workers are only reaped when the loader shuts down)."""
    times = os.times()
    total = times.user + times.system + times.children_user + times.children_system
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[1] == me:  # ppid; then utime, stime at fields 11, 12 (stat fields 14, 15)
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def _batches(loader, start_epoch: int = 0):
    for epoch in itertools.count(start_epoch):
        yield from loader.epoch(epoch)


def time_batches(batches, seconds: float, step_ms: float = 0.0) -> dict:
    """Iterate `batches` ((images, labels) pairs) for `seconds` after the first one."""
    started = time.perf_counter()
    next(batches)
    first_batch_s = time.perf_counter() - started
    images, waited = 0, 0.0
    cpu, wall = cpu_seconds(), time.perf_counter()
    while time.perf_counter() - wall < seconds:
        asked = time.perf_counter()
        _, labels = next(batches)
        waited += time.perf_counter() - asked
        images += len(labels)
        if step_ms:
            time.sleep(step_ms / 1000)  # the host thread idles while the accelerator runs the step
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    result = {"images": images, "seconds": wall, "cpu_seconds": cpu, "images_per_s": images / wall,
              "images_per_s_per_core": images / cpu if cpu > 0 else float("nan"), "cores_busy": cpu / wall,
              "first_batch_s": first_batch_s}
    if step_ms:
        result |= {"step_ms": step_ms, "data_wait_fraction": waited / wall}
    return result


def reference_batches(train, batch: int, threads: int):
    """DALI's fn.readers.file alone over `train`'s files in its epoch order: (encoded, positions)
    batches, nothing planned, checked or decoded."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    files = [train.samples.paths[i] for i in train.indices(0)]
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    with pipe:
        encoded, positions = fn.readers.file(files=files, prefetch_queue_depth=2, dont_use_mmap=True)  # as dali.py reads
        pipe.set_outputs(encoded, positions)
    pipe.build()
    while True:
        encoded, positions = pipe.run()
        yield encoded, np.asarray(positions.as_tensor()).reshape(-1)


def run(root: Path, backend: str = "dali", dali_device: str = "cpu", batch: int = 256, workers: int = 2,
        seconds: float = 10.0, decode: bool = True, step_ms: float = 0.0, reference: bool = False,
        image_size: int = 224) -> dict:
    """One measurement, as the command line describes; the numbers as a dict."""
    from ..config import DataConfig
    from . import build_loaders

    started = time.perf_counter()
    # the loaders name a missing root themselves (a DataError, exit 2)
    data = DataConfig.model_validate({"root": root, "backend": backend, "dali_device": dali_device, "batch_size": batch,
                                      "workers": workers, "image_size": image_size}, context={"check_paths": False})
    loaders = build_loaders(data, decode=decode, device=torch.device("cuda" if dali_device == "gpu" else "cpu"))
    startup_s = time.perf_counter() - started
    name = "dali fn.readers.file alone" if reference else loaders.backend + ("" if decode else " (no decode)")
    batches = reference_batches(loaders.train, batch, workers) if reference else _batches(loaders.train)
    result = time_batches(batches, seconds, step_ms)
    return {"loader": name, "backend": loaders.backend, "batch": batch, "workers": workers, "decode": decode,
            "image_size": image_size, "train_images": loaders.num_train, "startup_s": startup_s} | result


def describe(result: dict) -> str:
    line = (f"{result['loader']}: {result['images_per_s']:,.0f} images/s, {result['images_per_s_per_core']:,.0f} per core"
            f" ({result['cores_busy']:.2f} cores busy), start-up {result['startup_s']:.2f} s,"
            f" first batch {result['first_batch_s']:.2f} s")
    if "data_wait_fraction" in result:
        line += f", data wait {100 * result['data_wait_fraction']:.1f}% of a {result['step_ms']:g} ms step"
    return line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.data.bench", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="data set folder (train/<class>/*.JPEG, val/<class>/*.JPEG)")
    parser.add_argument("--backend", choices=("dali", "torchvision"), default="dali")
    parser.add_argument("--dali-device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads or DataLoader workers (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to measure, after the first batch")
    parser.add_argument("--image-size", type=int, default=224, help="crop side (default 224)")
    parser.add_argument("--no-decode", action="store_true", help="read, check and plan, but decode nothing")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulate a training step of X ms per batch")
    parser.add_argument("--reference", action="store_true", help="time DALI's fn.readers.file alone on the same files")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the numbers here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.workers < 0 or args.seconds <= 0 or args.step_ms < 0:
        parser.error("--batch must be ≥ 1, --workers ≥ 0, --seconds > 0 and --step-ms ≥ 0")
    return args


def main(argv=None) -> int:
    from .samples import DataError

    args = parse_args(argv)
    try:
        result = run(args.root, args.backend, args.dali_device, args.batch, args.workers, args.seconds,
                     not args.no_decode, args.step_ms, args.reference, args.image_size)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
