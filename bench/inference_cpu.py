"""CPU inference, dense vs low-rank, as exported: the targets of issue 22, side by side in one run.

    python bench/inference_cpu.py                      # 3 rounds: VGG-16, CaffeNet-BN, GoogLeNet; export time
    python bench/inference_cpu.py --rounds 1 --models googlenet --no-export-time

For each model (VGG-16 at the authors' ranks, 224²; CaffeNet-BN at the authors' ranks, 227²;
GoogLeNet at speedup 2, 224²) and each batch (1 and --batch), fp32, on onnxruntime's CPU provider
and torch eager, both with torch's thread count:
- *plain*: `torch.onnx.export` (dynamo) of the models as `build_model` makes them — no folding, every
  factorized layer factorized — the floor the issue measured (2.38×/2.78× for VGG-16);
- *export*: what `python -m lowrank_dist.export` writes — BatchNorm folded, dropout gone, each
  factorized layer in the form its plan measured faster on that runtime at that batch
  (speed.inference.time_layers) — against the dense model with BatchNorm folded.
The exports and plans are made once; then each round times every variant of a model and batch in
alternation (speed.timing.measure: warm-up, median of `--repeats` single calls), so a neighbour's
load weighs on all alike. Prints each round's ratios (dense time / low-rank time) as it goes, the
plans' slowest layer against its dense twin, then a table of every round beside the targets.
Last, the time `python -m lowrank_dist.export` takes for VGG-16 (equality check on 256 images
included): a random dense VGG-16 state dict decomposed at the authors' ranks (--from-state-dict),
checked on 256 synthetic val images at 224² (the SVDs are part of the time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowrank_dist.deploy.forms import inference_model  # noqa: E402
from lowrank_dist.models import build_model, model_spec  # noqa: E402
from lowrank_dist.speed.inference import layer_inputs, model_call, time_layers  # noqa: E402
from lowrank_dist.speed.timing import device_description, measure  # noqa: E402

CASES = {  # name → (build dict, targets: batch 1, throughput batch)
    "vgg16": ({"name": "vgg16", "lowrank": {"preset": "tai2016"}}, (2.4, 2.8)),
    "caffenet": ({"name": "caffenet", "lowrank": {"preset": "tai2016"}}, (1.5, 2.5)),
    "googlenet": ({"name": "googlenet", "lowrank": {"speedup": 2.0}}, (1.0, 1.3)),
}
RUNTIMES = ("ort-cpu", "torch")


def models_of(name: str) -> dict:
    build, _ = CASES[name]
    torch.manual_seed(0)
    lowrank, dense = build_model(build).eval(), build_model(build, dense=True).eval()
    return {"lowrank": lowrank, "dense": dense, "deployed dense": inference_model(dense),
            "size": model_spec(name).input_size}


def plans(name: str, models: dict, batches, repeats: int) -> dict:
    """Per (runtime, batch): the plan's layers (each timed dense and factorized there)."""
    inputs = layer_inputs(models["lowrank"], models["size"])
    found = {}
    for runtime in RUNTIMES:
        for batch in batches:
            started = time.perf_counter()
            plan = time_layers(models["lowrank"], models["size"], batch, runtime, torch.device("cpu"), repeats=repeats,
                               inputs=inputs)
            slowest = min(plan, key=lambda layer: layer.speedup)
            forms = Counter(layer.form for layer in plan)
            print(f"{name} {runtime} batch {batch}: plan {', '.join(f'{n} {form}' for form, n in forms.items())};"
                  f" slowest layer {slowest.layer} {slowest.speedup:.2f}× dense ({time.perf_counter() - started:.0f} s)",
                  flush=True)
            found[runtime, batch] = plan
    return found


def calls(name: str, models: dict, runtime: str, batch: int, plan, folder: Path) -> dict:
    """The four models' forward calls (plain and exported, dense and low-rank); ONNX files are
    written into `folder` the first time and reused."""
    shape = (batch, *models["size"])
    forms = {layer.module: layer.form for layer in plan}
    return {
        "plain dense": model_call(models["dense"], shape, runtime, "cpu", folder, f"{name}-plain-dense-b{batch}"),
        "plain low-rank": model_call(models["lowrank"], shape, runtime, "cpu", folder, f"{name}-plain-lowrank-b{batch}"),
        "export dense": model_call(models["deployed dense"], shape, runtime, "cpu", folder, f"{name}-dense-b{batch}"),
        "export low-rank": model_call(inference_model(models["lowrank"], forms), shape, runtime, "cpu", folder,
                                      f"{name}-{runtime}-lowrank-b{batch}"),
    }


def one_round(name: str, models: dict, found: dict, folder: Path, repeats: int, warmup: int) -> dict:
    """Every runtime and batch timed once, the four variants alternated; sessions made and dropped
    here, so that only one set of a model's copies is in memory at a time."""
    ratios = {}
    for (runtime, batch), plan in found.items():
        times = measure(calls(name, models, runtime, batch, plan, folder), "cpu", repeats=repeats, warmup=warmup,
                        min_sample_s=0.0)
        ms = {key: timing.median * 1e3 for key, timing in times.items()}
        ratios[f"{runtime} b{batch}"] = {
            "plain": ms["plain dense"] / ms["plain low-rank"], "export": ms["export dense"] / ms["export low-rank"],
            "ms": ms}
    return ratios


def export_time(folder: Path, images: int) -> float:
    """Seconds of `python -m lowrank_dist.export --from-state-dict` for VGG-16 at the authors' ranks."""
    from lowrank_dist.data.synthetic import make_synthetic

    state = folder / "vgg16_dense.pth"
    torch.manual_seed(0)
    torch.save(build_model({"name": "vgg16"}).state_dict(), state)
    data = folder / "synthetic"
    make_synthetic(data, classes=8, train_per_class=1, val_per_class=images // 8, seed=0, min_side=240, max_side=320)
    command = [sys.executable, "-m", "lowrank_dist.export", "--from-state-dict", str(state), "--model", "vgg16",
               "--preset", "tai2016", "--data", str(data), "--out", str(folder / "vgg16_export"),
               "--check-images", str(images)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(done.stdout[-1500:] + done.stderr[-1500:])
    if done.returncode != 0:
        raise SystemExit(f"the export failed (exit {done.returncode})")
    return seconds


def summary(results: dict, batch: int) -> str:
    lines = ["| model | runtime, batch | " + " | ".join(f"round {i + 1}: export (plain)" for i in
                                                       range(len(next(iter(results.values()))))) + " | target |",
             "|---|---|" + "---:|" * len(next(iter(results.values()))) + "---:|"]
    for name, rounds in results.items():
        targets = CASES[name][1]
        for key in rounds[0]:
            target = targets[0] if key.endswith("b1") else targets[1]
            cells = [f"{r[key]['export']:.2f}× ({r[key]['plain']:.2f}×)" for r in rounds]
            mark = "" if key.startswith("torch") else f"≥ {target}× {'✓' if all(r[key]['export'] >= target for r in rounds) else '✗'}"
            lines.append(f"| {name} | {key} | " + " | ".join(cells) + f" | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, default=8, help="the throughput batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant and round (median taken)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-export-time", action="store_true", help="skip timing the VGG-16 export command")
    parser.add_argument("--check-images", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    import onnxruntime

    print(f"{device_description(torch.device('cpu'))}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__},"
          f" load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            models = models_of(name)
            found = plans(name, models, (1, args.batch), args.repeats)
            results[name] = []
            for index in range(args.rounds):
                ratios = one_round(name, models, found, Path(folder), args.repeats, args.warmup)
                results[name].append(ratios)
                print(f"{name} round {index + 1}: " + ", ".join(
                    f"{key} {r['export']:.2f}× (plain {r['plain']:.2f}×)" for key, r in ratios.items()), flush=True)
            del models
        seconds = None if args.no_export_time else export_time(Path(folder), args.check_images)
    print("\n" + summary(results, args.batch))
    if seconds is not None:
        print(f"\nVGG-16 export (--from-state-dict, {args.check_images} check images): {seconds:.0f} s (target < 120 s)")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "export_s": seconds}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
