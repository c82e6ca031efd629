"""How fast the loaders feed here: one loader on a data set of yours, or the data targets side by side.

    python bench/loaders.py ROOT [--backend dali|torchvision] [--dali-device cpu|gpu] [--batch N]
        [--workers N] [--seconds S] [--image-size S] [--no-decode] [--step-ms X] [--reference] [--json FILE]
    python bench/loaders.py [--folder /tmp/lowrank-bench] [--images 2048] [--rounds 3] [--seconds S]
        [--workers 2] [--batch 256] [--json FILE]

One loader (ROOT given). It builds this rank's loaders exactly as training does (the data index is
built first if missing), then iterates train epochs for S seconds (default 10) after the first batch
and prints:
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
images_per_s_per_core, cores_busy, startup_s, first_batch_s, data_wait_fraction, …). A missing or
broken data set is one error line and exit status 2.

The targets (no ROOT). Writes (once; reused if present) `--images` distinct ImageNet-sized JPEGs
(500×375, ~113 KB, smooth noise at quality 90) in 16 classes, and a 100,000-image tree of hard links
to them in 1,000 class folders (the files cost no extra disk and share the page cache). Everything is
measured on the 100,000-image tree, whose epochs are long like ImageNet's: each pass (an epoch, or
the rest of one after a resume) builds a DALI pipeline and reads up to 2 batches past its end that
are thrown away, a cost that a 2,000-image epoch of 8 batches would inflate to 25%. Each round, with
the files in page cache and every loader measured as above (S seconds each, default 8):

  feed       DALI's own fn.readers.file alone, then this project's DALI feed with --no-decode (read,
             size check, crop windows; no decode): their ratio, and the feed's images/s per core;
  end to end DALI on the CPU and torchvision, decoding 224×224 crops: their per-core ratio;
  overlap    the host-side feed (what the host does per batch when the GPU decodes) with a batch
             sized for ~20 ms of it (from this round's feed images/s: wall time, which is what a
             step overlaps) and a simulated 40 ms step: the fraction of time spent waiting for data
             (before, the feed ran on the training thread and the two added up);
  start-up   build_loaders on the 100,000-image tree in a fresh process, without an index (listing,
             reading every header, writing the index) and with it.

Per-core numbers do not depend on how many cores the machine has or how busy it is, as long as the
measured process gets the CPU time it asks for; on a shared machine wall-clock numbers do.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lowrank_dist.config import DataConfig
from lowrank_dist.data import DataError, build_loaders
from lowrank_dist.data.index import FOLDER

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


def data_section(root: Path, **fields) -> DataConfig:
    """The config's data section for `root`; a missing root is left for the loaders to name (DataError)."""
    return DataConfig.model_validate({"root": root, **fields}, context={"check_paths": False})


def run(root: Path, backend: str = "dali", dali_device: str = "cpu", batch: int = 256, workers: int = 2,
        seconds: float = 10.0, decode: bool = True, step_ms: float = 0.0, reference: bool = False,
        image_size: int = 224) -> dict:
    """One measurement, as the command line describes; the numbers as a dict."""
    started = time.perf_counter()
    data = data_section(root, backend=backend, dali_device=dali_device, batch_size=batch, workers=workers,
                        image_size=image_size)
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


def write_photos(root: Path, images: int, classes: int = 16) -> Path:
    """ImageNet-sized JPEGs: bicubic-upsampled noise, which compresses like a photo (~113 KB)."""
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (126, 168, 3), dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(out, "JPEG", quality=90)
            (folder / f"{i:08d}.JPEG").write_bytes(out.getvalue())
    (root / "done").touch()
    return root


def write_links(root: Path, photos: Path, images: int = 100_000, classes: int = 1000) -> Path:
    """`images` train entries in `classes` folders, hard links to the photos, and a small val split."""
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    sources = sorted((photos / "train").rglob("*.JPEG"))
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(sources[i % len(sources)], folder / f"{i:08d}.JPEG")
    (root / "done").touch()
    return root


STARTUP = """
import sys, time
from lowrank_dist.config import DataConfig
from lowrank_dist.data import build_loaders
started = time.perf_counter()
build_loaders(DataConfig(root=sys.argv[1], backend="dali", dali_device="cpu", batch_size=256, workers=2))
print(time.perf_counter() - started)
"""


def startup(root: Path, with_index: bool) -> float:
    if not with_index:
        shutil.rmtree(root / FOLDER, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", STARTUP, str(root)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def targets(args: argparse.Namespace) -> None:
    """The targets, side by side (the module docstring), printed and, with --json, written."""
    photos = write_photos(args.folder / "photos", args.images)
    links = write_links(args.folder / "links100k", photos)
    for path in (photos / "train").rglob("*.JPEG"):  # into the page cache (the links share it)
        path.read_bytes()
    common = {"workers": args.workers, "seconds": args.seconds}
    cold, warm = startup(links, with_index=False), startup(links, with_index=True)  # leaves the index built
    rounds = []
    for number in range(1, args.rounds + 1):
        r = {
            "reference": run(links, "dali", reference=True, batch=args.batch, **common),
            "feed": run(links, "dali", decode=False, batch=args.batch, **common),
            "dali": run(links, "dali", batch=args.batch, **common),
            "torchvision": run(links, "torchvision", batch=args.batch, **common),
        }
        host_batch = max(1, round(0.020 * r["feed"]["images_per_s"]))  # ~20 ms of host work per batch
        r["overlap"] = run(links, "dali", decode=False, batch=host_batch, step_ms=40.0, **common)
        rounds.append(r)
        print(f"round {number}:")
        for result in r.values():
            print(f"  {result['loader']:<28} batch {result['batch']:>3}: {result['images_per_s']:>8,.0f} images/s"
                  f" {result['images_per_s_per_core']:>8,.0f} per core ({result['cores_busy']:.2f} cores busy)"
                  + (f", data wait {100 * result['data_wait_fraction']:.1f}% of a 40 ms step" if "step_ms" in result else ""))
        print(f"  feed / fn.readers.file alone, per core: {r['feed']['images_per_s_per_core'] / r['reference']['images_per_s_per_core']:.2f}x;"
              f" DALI-CPU / torchvision, per core: {r['dali']['images_per_s_per_core'] / r['torchvision']['images_per_s_per_core']:.2f}x",
              flush=True)

    def median(key, field="images_per_s_per_core"):
        return statistics.median(r[key][field] for r in rounds)

    print(f"\n{platform.machine()}, {os.cpu_count()} cores; 100,000 links to {args.images} JPEGs 500x375 (~113 KB) in page cache;"
          f" {args.workers} DALI threads / workers; median of {args.rounds} rounds")
    print(f"host-side feed: {median('feed'):,.0f} images/s per core, {median('feed') / median('reference'):.2f}x fn.readers.file alone")
    ratios = [r["dali"]["images_per_s_per_core"] / r["torchvision"]["images_per_s_per_core"] for r in rounds]
    print(f"DALI-CPU / torchvision per core, each round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    print(f"data wait, 40 ms step, ~20 ms host work per batch: {100 * median('overlap', 'data_wait_fraction'):.1f}%")
    print(f"start-up, 100,000 images in 1,000 folders: {cold:.2f} s building the index, {warm:.2f} s with it")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "startup_s": {"without_index": cold, "with_index": warm}},
                                        indent=2) + "\n")


ONE_LOADER = {"backend": "dali", "dali_device": "cpu", "image_size": 224, "no_decode": False, "step_ms": 0.0,
              "reference": False}  # options of a measurement on ROOT, and their defaults
TARGETS = {"folder": Path("/tmp/lowrank-bench"), "images": 2048, "rounds": 3}  # options of the targets run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/loaders.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?",
                        help="data set folder (train/<class>/*.JPEG, val/<class>/*.JPEG) to measure one loader on;"
                             " without it, the targets run on generated JPEGs")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads or DataLoader workers (default 2)")
    parser.add_argument("--seconds", type=float,
                        help="how long to measure, after the first batch (default 10; the targets: 8 each)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the numbers here")
    one = parser.add_argument_group("one loader on ROOT")
    one.add_argument("--backend", choices=("dali", "torchvision"), help="default dali")
    one.add_argument("--dali-device", choices=("cpu", "gpu"), help="default cpu")
    one.add_argument("--image-size", type=int, help="crop side (default 224)")
    one.add_argument("--no-decode", action="store_const", const=True, help="read, check and plan, but decode nothing")
    one.add_argument("--step-ms", type=float, help="simulate a training step of X ms per batch")
    one.add_argument("--reference", action="store_const", const=True,
                     help="time DALI's fn.readers.file alone on the same files")
    targets_group = parser.add_argument_group("the targets (no ROOT)")
    targets_group.add_argument("--folder", type=Path,
                               help="where the generated JPEGs are kept (default /tmp/lowrank-bench)")
    targets_group.add_argument("--images", type=int, help="distinct ImageNet-sized train JPEGs (default 2048)")
    targets_group.add_argument("--rounds", type=int, help="default 3")
    args = parser.parse_args(argv)
    mine, others = (ONE_LOADER, TARGETS) if args.root is not None else (TARGETS, ONE_LOADER)
    stray = [f"--{key.replace('_', '-')}" for key in others if getattr(args, key) is not None]
    if stray:
        parser.error(f"{', '.join(stray)}: {'only without ROOT' if args.root is not None else 'only with ROOT'}")
    for key, default in mine.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.seconds is None:
        args.seconds = 10.0 if args.root is not None else 8.0
    if args.batch < 1 or args.workers < 0 or args.seconds <= 0 or (args.step_ms or 0) < 0:
        parser.error("--batch must be ≥ 1, --workers ≥ 0, --seconds > 0 and --step-ms ≥ 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.root is None:
        targets(args)
        return 0
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
