"""Train-loader throughput, DALI on the CPU beside torchvision (PIL), per CPU core, in one run.

Both loaders read the same JPEGs (make_synthetic at ImageNet-like sizes, 300–500 px sides, into a
temporary folder) and produce the same thing: a random-resized 224×224 crop, a random mirror,
float32 normalized N×3×224×224 batches. Each round times one full train epoch of each back-end,
alternating, so drift (page cache, clocks, other load) hits both alike; the table shows medians.

Per core: images divided by the CPU seconds the work consumed — user + system time of this
process and of its reaped children (getrusage RUSAGE_SELF + RUSAGE_CHILDREN), so DALI's decoding
threads and torchvision's DataLoader worker processes (joined at the end of each epoch) are all
counted, whatever the number of cores. Wall-clock images/s is shown beside it.

    python bench/loaders.py [--images 512 --rounds 5 --workers 2 --batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def time_epoch(train, epoch: int) -> tuple[int, float, float]:
    """(images, CPU seconds, wall seconds) for one full train epoch."""
    cpu, wall, images = cpu_seconds(), time.perf_counter(), 0
    for batch, _ in train.epoch(epoch):
        images += batch.shape[0]
    return images, cpu_seconds() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="train images (spread over 8 classes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from lowrank_dist.data import build_loaders
    from lowrank_dist.data.synthetic import make_synthetic

    with tempfile.TemporaryDirectory() as folder:
        make_synthetic(folder, classes=8, train_per_class=args.images // 8, val_per_class=1, min_side=300, max_side=500)
        loaders = {
            name: build_loaders(folder, backend=backend, dali_device="cpu", batch_size=args.batch_size,
                                workers=args.workers).train
            for name, backend in (("DALI (CPU)", "dali"), ("torchvision", "torchvision"))
        }
        for train in loaders.values():  # warm-up: page cache, first-call costs
            time_epoch(train, 0)
        per_core = {name: [] for name in loaders}
        per_second = {name: [] for name in loaders}
        for round_ in range(1, args.rounds + 1):
            for name, train in loaders.items():
                images, cpu, wall = time_epoch(train, round_)
                per_core[name].append(images / cpu)
                per_second[name].append(images / wall)

    print(f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}")
    print(f"{args.images} JPEGs of 300-500 px -> 224x224 train crops, batch {args.batch_size},"
          f" {args.workers} workers/threads, median of {args.rounds} rounds")
    print(f"{'loader':<14}{'images/s per core':>20}{'images/s (wall)':>18}")
    for name in loaders:
        print(f"{name:<14}{statistics.median(per_core[name]):>20.0f}{statistics.median(per_second[name]):>18.0f}")
    ratio = statistics.median(per_core["DALI (CPU)"]) / statistics.median(per_core["torchvision"])
    print(f"DALI / torchvision per core: {ratio:.2f}x")


if __name__ == "__main__":
    main()
