"""CPU: does running each factorized layer in its faster form (factorized or composed) make a
low-rank VGG-16 train faster? Dense, all factorized, all composed and the `auto` plan, side by side.

    python bench/execution_cpu.py                                # VGG-16, authors' ranks, fp32, batch 8, 112×112
    python bench/execution_cpu.py --batch 4 --image-size 64 --repeats 3 --out results.json

First the plan: every factorized layer timed forward+backward both ways (speed.execution, the
same code as `precision.execution: auto`), printed as a table. Then the train step (forward,
cross-entropy, backward, SGD update) of the dense model and of the low-rank model run all
factorized, all composed and under the plan, timed in alternation by the project's harness
(speed.timing.measure: warm-up, calibrated calls per sample, median of repeats, order reversed
every other round), so that a neighbour's load weighs on all four alike. The three low-rank
variants are one model whose layers are switched between calls (the same parameters: only
`LowRankConv2d.execution` changes), which also keeps memory at two VGG-16s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_dist.models import build_model  # noqa: E402
from lowrank_dist.speed.execution import plan_execution, set_execution  # noqa: E402
from lowrank_dist.speed.timing import device_description, measure, model_functions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--preset", default="tai2016", help="rank preset of the low-rank model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=5, help="timed train steps per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layer-repeats", type=int, default=5, help="samples per layer and form for the plan")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    device, dtype = torch.device("cpu"), torch.float32
    shape = (args.batch, 3, args.image_size, args.image_size)
    torch.manual_seed(0)
    dense = build_model({"name": args.model})
    lowrank = build_model({"name": args.model, "lowrank": {"preset": args.preset}})
    print(f"{device_description(device)}, torch {torch.__version__}, fp32, {args.model} ({args.preset}) vs dense,"
          f" input {'×'.join(map(str, shape))}", flush=True)

    started = time.perf_counter()
    plan = plan_execution(lowrank, shape, "auto", device, dtype, repeats=args.layer_repeats, warmup=1)
    print(plan.to_markdown() + "\n", flush=True)

    example = torch.randn(shape)
    dense_step = model_functions(dense, example, dtype)[1]
    lowrank_step = model_functions(lowrank, example, dtype)[1]

    def variant(executions):
        def step():
            set_execution(lowrank, executions)
            return lowrank_step()
        return step

    fns = {"dense": dense_step, "all factorized": variant("factorized"), "all composed": variant("composed"),
           "auto": variant(plan.executions)}
    timings = measure(fns, device, repeats=args.repeats, warmup=args.warmup)
    lines = ["| variant | train img/s | × dense | q1–q3 ms per step |", "|---|---:|---:|---|"]
    for name, timing in timings.items():
        q1, q3 = timing.quartiles
        lines.append(f"| {name} | {args.batch / timing.median:.2f} | {timings['dense'].median / timing.median:.2f}×"
                     f" | {q1 * 1e3:,.0f}–{q3 * 1e3:,.0f} |")
    elapsed = time.perf_counter() - started
    print("\n".join(lines))
    print(f"\nTrain step: forward, cross-entropy, backward, SGD update; median of {args.repeats} alternated samples"
          f" after {args.warmup} warm-up; {elapsed:.0f} s in all.")
    if args.out is not None:
        args.out.write_text(json.dumps({
            "device": device_description(device), "torch": torch.__version__, "model": args.model,
            "preset": args.preset, "input_shape": list(shape), "plan": plan.as_dict(),
            "train_images_per_s": {name: args.batch / t.median for name, t in timings.items()},
            "timings": {name: t.as_dict() for name, t in timings.items()}, "elapsed_s": elapsed,
        }, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
