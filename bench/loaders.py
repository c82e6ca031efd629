"""The data targets, side by side in one run: host-side feed, DALI vs torchvision, overlap, start-up.

    python bench/loaders.py [--folder /tmp/lowrank-bench] [--images 2048] [--rounds 3] [--seconds 8]
                            [--workers 2] [--batch 256] [--json FILE]

Writes (once; reused if present) `--images` distinct ImageNet-sized JPEGs (500×375, ~113 KB, smooth
noise at quality 90) in 16 classes, and a 100,000-image tree of hard links to them in 1,000 class
folders (the files cost no extra disk and share the page cache). Everything is measured on the
100,000-image tree, whose epochs are long like ImageNet's: each pass (an epoch, or the rest of one
after a resume) builds a DALI pipeline and reads up to 2 batches past its end that are thrown away,
a cost that a 2,000-image epoch of 8 batches would inflate to 25%. Each round, with the files in
page cache and everything measured by `lowrank_dist.data.bench` (images per CPU-second):

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
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lowrank_dist.data.bench import run
from lowrank_dist.data.index import FOLDER


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/lowrank-bench"))
    parser.add_argument("--images", type=int, default=2048, help="distinct ImageNet-sized train JPEGs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
