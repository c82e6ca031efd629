"""Time and peak memory of decomposing all 13 VGG-16 convs at the authors' ranks, beside
numpy.linalg.svd of the same unfolded float64 matrices, measured side by side in one run.

Each method runs in a fresh child process (so peak memory is its own), alternating
ours / reference for --repeats rounds to cancel drift; the table shows medians.
Peak memory is the rise of the child's resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the work) over its resident size at that moment.

    python bench/decompose_vgg16.py [--repeats 3] [--json bench/results/decompose_vgg16.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

TAI2016_VGG16_RANKS = [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str) -> None:
    import numpy as np
    import torch

    from lowrank_dist.lowrank.svd import decompose_kernel, unfold
    from lowrank_dist.models import build_model, factorizable_convs

    torch.manual_seed(0)
    weights = [conv.weight.detach().clone() for _, conv in factorizable_convs(build_model({"name": "vgg16"}))]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    if method == "lowrank_dist":
        run = lambda: [decompose_kernel(w, k) for w, k in zip(weights, TAI2016_VGG16_RANKS)]  # noqa: E731
    else:  # the reference: a full (thin) SVD of each unfolded matrix, float64
        run = lambda: [np.linalg.svd(unfold(w).double().numpy(), full_matrices=False) for w in weights]  # noqa: E731
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    results = run()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - baseline
    del results
    print(json.dumps({"method": method, "seconds": seconds, "peak_bytes": peak * 1024, "weight_bytes": weight_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    methods = ["lowrank_dist", "numpy.linalg.svd"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--child", method], check=True, capture_output=True, text=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))

    weight_mb = runs[methods[0]][0]["weight_bytes"] / 2**20
    summary = {}
    print(f"VGG-16, 13 convs at the authors' ranks, float64 inside; {platform.processor() or platform.machine()},"
          f" {len(__import__('os').sched_getaffinity(0))} cores; weights {weight_mb:.1f} MiB (fp32)")
    print("| method | median s | runs (s) | peak extra MiB | peak / weights |")
    print("|---|---:|---|---:|---:|")
    for method in methods:
        seconds = [r["seconds"] for r in runs[method]]
        peak = statistics.median(r["peak_bytes"] for r in runs[method]) / 2**20
        summary[method] = {"median_s": statistics.median(seconds), "runs_s": seconds, "peak_mib": peak}
        print(f"| {method} | {statistics.median(seconds):.2f} | {', '.join(f'{s:.2f}' for s in seconds)}"
              f" | {peak:.0f} | {peak / weight_mb:.2f}× |")
    ratio = summary["numpy.linalg.svd"]["median_s"] / summary["lowrank_dist"]["median_s"]
    print(f"\nlowrank_dist is {ratio:.2f}× the speed of numpy.linalg.svd (same run, medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weight_mib": weight_mb, "speed_ratio": ratio, "methods": summary}, f, indent=2)


if __name__ == "__main__":
    main()
