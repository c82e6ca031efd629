"""Does the speed report measure what a stopwatch measures? Every layer's report time beside a
timing of the same layer by hand, in the same run.

The report (lowrank_dist.speed.report) times each conv layer with its own machinery: device
events on a GPU, a calibrated number of calls per sample, dense and low-rank alternated, the
median of repeats. Here each layer is timed again by the plainest code there is, sharing nothing
with it but the layer and the input shape: synchronize, `time.perf_counter()`, call the layer
`number` times in a loop, synchronize, read the clock. Forward only, in eval mode without
autograd, as the report's forward column. The two agree when the median by hand lies within the
report's own spread for that layer, from its fastest to its slowest sample; the table prints both
medians, that spread, their ratio and the verdict per layer.

    python bench/report_vs_hand.py                              # VGG-16, authors' ranks, CPU, 2×3×64×64
    python bench/report_vs_hand.py --device cuda --dtype bf16 --batch 64 --image-size 224

bench/gpu.py runs the same check on the GPU for VGG-16 (`hand_check`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_dist.models import build_model  # noqa: E402
from lowrank_dist.speed.report import SpeedReport, device_description, speed_report  # noqa: E402
from lowrank_dist.runtime import DTYPES, select_device  # noqa: E402


def stopwatch(layer: torch.nn.Module, x: torch.Tensor, number: int, repeats: int) -> list[float]:
    """Seconds per call, one value per sample of `number` calls: the plainest timing there is."""
    samples = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(number):
                layer(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        samples.append((time.perf_counter() - start) / number)
    return samples


def hand_check(report: SpeedReport, dense_model: torch.nn.Module, lowrank_model: torch.nn.Module,
               device: torch.device, dtype: torch.dtype, channels_last: bool, repeats: int = 10) -> dict:
    """Time every layer of `report` by hand (dense and low-rank, in turn) and compare with the
    report's forward timings. Returns {"rows": [...], "agree": n, "total": n, "markdown": str}."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    dense_layers, lowrank_layers = dict(dense_model.named_modules()), dict(lowrank_model.named_modules())
    rows = []
    for row in report.rows:
        x = torch.randn(row.input_shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        layers = {kind: copy.deepcopy(source[row.module]).to(device=device, dtype=dtype, memory_format=memory_format).eval()
                  for kind, source in (("dense", dense_layers), ("lowrank", lowrank_layers))}
        reported = {"dense": row.dense_forward, "lowrank": row.lowrank_forward}
        for kind, layer in layers.items():
            stopwatch(layer, x, reported[kind].number, 2)  # warm-up: cuDNN's algorithm choice, caches
        samples = {"dense": [], "lowrank": []}
        for round_index in range(repeats):  # in turn, as the report does, so drift weighs on both alike
            for kind in ("dense", "lowrank") if round_index % 2 == 0 else ("lowrank", "dense"):
                samples[kind] += stopwatch(layers[kind], x, reported[kind].number, 1)
        for kind in ("dense", "lowrank"):
            if kind == "lowrank" and row.cost.rank is None:
                continue  # a dense layer in both models: one row is enough
            hand = statistics.median(samples[kind])
            fastest, slowest = min(reported[kind].samples), max(reported[kind].samples)
            rows.append({
                "layer": row.layer, "kind": kind, "number": reported[kind].number,
                "report_ms": reported[kind].median * 1e3, "report_range_ms": (fastest * 1e3, slowest * 1e3),
                "hand_ms": hand * 1e3, "agree": fastest <= hand <= slowest,
            })
    lines = ["| layer | kind | calls/sample | report ms [fastest, slowest] | by hand ms | hand ÷ report | agree |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['number']}"
                     f" | {r['report_ms']:.3f} [{r['report_range_ms'][0]:.3f}, {r['report_range_ms'][1]:.3f}]"
                     f" | {r['hand_ms']:.3f} | {r['hand_ms'] / r['report_ms']:.2f} | {'yes' if r['agree'] else 'NO'} |")
    agree = sum(r["agree"] for r in rows)
    lines.append(f"\n{agree} of {len(rows)} layer timings agree (median by hand within the report's spread);"
                 f" median hand ÷ report {statistics.median(r['hand_ms'] / r['report_ms'] for r in rows):.2f}")
    return {"rows": rows, "agree": agree, "total": len(rows), "markdown": "\n".join(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--preset", default="tai2016", help="rank preset of the low-rank model")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    device, dtype = select_device(args.device, key="--device"), DTYPES[args.dtype]
    torch.manual_seed(0)
    dense = build_model({"name": args.model})
    lowrank = build_model({"name": args.model, "lowrank": {"preset": args.preset}})
    shape = (args.batch, 3, args.image_size, args.image_size)
    print(f"{device_description(device)}, torch {torch.__version__}, {args.model} ({args.preset}) vs dense,"
          f" input {shape}, {args.dtype}, forward per layer: the report's timing, then by hand", flush=True)
    report = speed_report(dense, lowrank, shape, device, dtype, repeats=args.repeats,
                          channels_last=args.channels_last, whole_model=False)
    check = hand_check(report, dense, lowrank, device, dtype, args.channels_last, args.repeats)
    print(check["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
