"""One-shot GPU benchmark: does factorizing make AlexNet, VGG-16 and GoogLeNet train faster here?

For each model, dense against four low-rank variants: the authors' ranks (where published), a 2×
per-layer theoretical target, speed-aware ranks (lowrank_dist.report.speed_aware: the default
policy's ranks and those of 2/3/4× targets, each layer kept factorized only where it is measured
faster on this card), and `auto`: the default policy's ranks (the authors' for AlexNet and VGG-16,
2× for GoogLeNet) with each layer run factorized or composed, whichever its forward+backward is
measured faster here (lowrank_dist.report.execution, as `model.lowrank.execution: auto` does at a
run's start; the plan is printed). Measured: train-step images/s (forward, backward, SGD update)
in eager mode and under torch.compile, bf16 autocast, channels_last, each variant alternated with
dense; then per model the layer table of the auto variant — dense, factorized and composed per
layer, the plan's choice, theoretical vs measured — with VGG-16's forward times also checked by
hand (bench/report_vs_hand.py). Targets printed at the end: auto at least as fast as dense for
every layer and whole model, VGG-16 auto ≥ 1.4× dense compiled. Prints a short table headed by
the card's name and writes bench/results/gpu_<date>_<card>.json (+ each layer table as .md and
.png beside it).

    python bench/gpu.py            # on a CUDA machine: about 6-8 minutes (see --budget-s)
    python bench/gpu.py --smoke    # the same code path on the CPU at tiny sizes, in fp32 (CPUs have
                                   # no fast bf16 convolution) with torch.compile's "eager" backend

Order matters for the time budget: every model's eager numbers and layer tables come first;
compiled runs follow while time is left (auto first, then speed-aware for every model, VGG-16's
authors' ranks too), each skipped with a note when the budget would be exceeded. Runs with only torch,
torchvision and matplotlib installed and without `pip install -e .`: the repository root is put on
sys.path. A model that fails prints its error and the others go on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # lowrank_dist, and report_vs_hand beside this script

import torch  # noqa: E402

from lowrank_dist.layers import LowRankConv2d  # noqa: E402
from lowrank_dist.models import build_model, lowrank_policy, model_spec  # noqa: E402
from lowrank_dist.report.costs import DEFAULT_LOWRANK, conv_costs  # noqa: E402
from lowrank_dist.report.execution import plan_execution, set_execution  # noqa: E402
from lowrank_dist.report.speed import device_description, speed_report  # noqa: E402
from lowrank_dist.report.speed_aware import speed_aware_ranks  # noqa: E402
from lowrank_dist.report.timing import Timing, logits_of, measure, model_functions  # noqa: E402
from report_vs_hand import hand_check  # noqa: E402

MODELS = ("alexnet", "vgg16", "googlenet")
# compiled: the variants timed under torch.compile, in order, while the time budget lasts;
# skip: variants left out (the smoke run skips VGG-16's speedup2: with its 102M-parameter classifier
# a CPU train step takes about half a second, and GoogLeNet covers that variant's code path)
GPU = {"batch": {"alexnet": 128, "vgg16": 64, "googlenet": 128}, "image_size": 224, "dtype": torch.bfloat16,
       "repeats": 10, "warmup": 3, "layer_repeats": 5, "search": (2.0, 3.0, 4.0), "backend": "inductor",
       "compiled": {"vgg16": ("auto", "authors", "speed-aware"), "alexnet": ("auto", "speed-aware"),
                    "googlenet": ("auto", "speed-aware")},
       "skip": {}}
SMOKE = {"batch": {"alexnet": 2, "vgg16": 2, "googlenet": 2}, "image_size": 64, "dtype": torch.float32,
         "repeats": 1, "warmup": 0, "layer_repeats": 2, "search": (2.0,), "backend": "eager",
         "compiled": {"vgg16": ("speed-aware",), "alexnet": ("auto", "speed-aware"), "googlenet": ("speed-aware",)},
         "skip": {"vgg16": ("speedup2",)}}
TARGETS = {"layer": 1.0, "model": 1.0, "vgg16 compiled": 1.4}  # auto ÷ dense, the targets


class Bench:
    def __init__(self, device: torch.device, settings: dict, deadline: float):
        self.device, self.settings, self.deadline = device, settings, deadline
        self.size = settings["image_size"]
        self.compile_seconds = 60.0  # the longest compiled pair so far (a guess before the first)
        self.dense: dict[str, torch.nn.Module] = {}  # built once per model, on the device
        self.kept: dict[tuple[str, str], torch.nn.Module] = {}  # variants the later phases use again

    def shape(self, name: str) -> tuple[int, int, int, int]:
        return (self.settings["batch"][name], 3, self.size, self.size)

    def variants(self, name: str) -> dict[str, dict]:
        """The low-rank policies compared with dense (speed-aware ranks are added once measured)."""
        found = {"authors": {"preset": "tai2016"}} if "tai2016" in model_spec(name).presets else {}
        found["speedup2"] = {"speedup": 2.0}
        return {k: v for k, v in found.items() if k not in self.settings["skip"].get(name, ())}

    def on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device).to(memory_format=torch.channels_last)

    def example(self, name: str) -> torch.Tensor:
        return torch.randn(self.shape(name), device=self.device).contiguous(memory_format=torch.channels_last)

    def needed_later(self, name: str, variant: str) -> bool:
        return variant in self.settings["compiled"][name] or variant == "auto"  # auto: the layer tables

    def dense_model(self, name: str) -> torch.nn.Module:
        if name not in self.dense:
            self.dense[name] = self.on_device(self.build(name, None))
        return self.dense[name]

    def speed_aware(self, name: str) -> dict:
        spec = model_spec(name)
        chosen = speed_aware_ranks(
            self.dense_model(name), self.shape(name), lowrank_policy(spec, DEFAULT_LOWRANK[name]),
            search=self.settings["search"], device=self.device, dtype=self.settings["dtype"], channels_last=True,
            repeats=self.settings["layer_repeats"], warmup=self.settings["warmup"], model_name=name,
        )
        return chosen.as_dict()

    def pair(self, dense: torch.nn.Module, lowrank: torch.nn.Module, example: torch.Tensor, compiled: bool) -> dict:
        """Train-step time of dense and one low-rank variant, alternated."""
        options = {"backend": self.settings["backend"], "dynamic": False} if compiled else {}
        fns = {
            "dense": model_functions(dense, example, self.settings["dtype"], compiled, **options)[1],
            "lowrank": model_functions(lowrank, example, self.settings["dtype"], compiled, **options)[1],
        }
        timings = measure(fns, self.device, self.settings["repeats"], self.settings["warmup"])
        for key, timing in timings.items():
            assert all(s > 0 for s in timing.samples), f"non-positive time for {key}: {timing.samples}"
        batch = example.shape[0]
        return {
            "dense_images_per_s": batch / timings["dense"].median,
            "images_per_s": batch / timings["lowrank"].median,
            "speedup": timings["dense"].median / timings["lowrank"].median,
            "dense": timings["dense"].as_dict(), "lowrank": timings["lowrank"].as_dict(),
        }

    def check(self, dense: torch.nn.Module, lowrank: torch.nn.Module, ranks: dict, example: torch.Tensor) -> None:
        """The low-rank twin has the ranks asked for and gives finite logits of the dense shape."""
        built = {n: m.rank for n, m in lowrank.named_modules() if isinstance(m, LowRankConv2d)}
        assert built == {n: k for n, k in ranks.items() if k is not None}, f"built ranks {built} != chosen {ranks}"
        with torch.no_grad():
            want = logits_of(dense.eval()(example)).shape
            got = logits_of(lowrank.eval()(example))
        assert got.shape == want, f"low-rank output {tuple(got.shape)} != dense {tuple(want)}"
        assert torch.isfinite(got).all(), "low-rank output is not finite"

    def build(self, name: str, lowrank: dict | None) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model({"name": name} | ({"lowrank": lowrank} if lowrank else {}))

    def plan(self, name: str, lowrank: torch.nn.Module, result: dict) -> None:
        """The auto plan of `lowrank` at this model's batch, timed layer by layer, applied to it."""
        plan = plan_execution(lowrank, self.shape(name), "auto", self.device, self.settings["dtype"], channels_last=True,
                              repeats=self.settings["layer_repeats"], warmup=self.settings["warmup"])
        plan.apply(lowrank)
        result["plan"] = plan.as_dict()
        print(plan.to_markdown(), flush=True)

    def eager(self, name: str, result: dict) -> None:
        """Speed-aware ranks, then every variant against dense, eager; last the auto plan."""
        result["speed_aware"] = self.speed_aware(name)
        policies = self.variants(name) | {"speed-aware": {"ranks": result["speed_aware"]["ranks"]},
                                          "auto": DEFAULT_LOWRANK[name]}
        dense = self.dense_model(name)
        example = self.example(name)
        input_size = (3, self.size, self.size)
        for variant, policy in policies.items():
            lowrank = self.build(name, policy)
            rows = conv_costs(lowrank, input_size)
            ranks = {row.module: row.rank for row in rows}
            lowrank = self.on_device(lowrank)
            self.check(dense, lowrank, ranks, example)
            if variant == "auto":
                self.plan(name, lowrank, result)
            result["variants"][variant] = {
                "lowrank": policy, "ranks": {n: k for n, k in ranks.items() if k is not None},
                "theoretical": sum(r.dense_macs for r in rows) / sum(r.lowrank_macs for r in rows),
                "eager": self.pair(dense, lowrank, example, compiled=False),
            }
            print(f"  {name} {variant}: eager {result['variants'][variant]['eager']['speedup']:.2f}× dense", flush=True)
            if self.needed_later(name, variant):
                self.kept[name, variant] = lowrank
            del lowrank
            self.free()

    def compiled(self, name: str, result: dict) -> None:
        """The listed variants against dense under torch.compile, while the budget lasts; then the
        model's modules and compiled graphs are released whatever happened."""
        try:
            dense, example = self.dense_model(name), self.example(name)
            for variant in self.settings["compiled"][name]:
                entry = result["variants"].get(variant)
                if entry is None:
                    continue
                left = self.deadline - time.monotonic()
                if left < self.compile_seconds:
                    entry["compiled"] = {"skipped": f"time budget ({left:.0f} s left)"}
                    print(f"  {name} {variant}: compiled run skipped, {left:.0f} s of the budget left", flush=True)
                    continue
                started = time.monotonic()
                entry["compiled"] = self.pair(dense, self.kept.pop((name, variant)), example, compiled=True)
                entry["compiled"]["seconds"] = time.monotonic() - started
                self.compile_seconds = max(self.compile_seconds, entry["compiled"]["seconds"])
                print(f"  {name} {variant}: compiled {entry['compiled']['speedup']:.2f}× dense"
                      f" ({entry['compiled']['seconds']:.0f} s)", flush=True)
                self.free()
        finally:
            self.dense.pop(name, None)
            for key in [key for key in self.kept if key[0] == name]:
                del self.kept[key]
            torch._dynamo.reset()
            self.free()

    def layers(self, name: str, result: dict) -> dict:
        """The auto variant per layer: dense, factorized and composed, and the plan's choice (the
        whole-model numbers are in the summary already). VGG-16's forward times also by hand."""
        auto = self.kept[(name, "auto")]
        plan = {layer["module"]: layer["execution"] for layer in result["plan"]["layers"]}
        report = speed_report(
            self.dense_model(name), auto, self.shape(name), self.device, self.settings["dtype"],
            repeats=self.settings["layer_repeats"], warmup=self.settings["warmup"], channels_last=True,
            whole_model=False, title=f"{name}, {_policy_text(DEFAULT_LOWRANK[name])}, auto plan", plan=plan,
            plan_source="auto, timed before the eager runs",
        )
        assert all(isinstance(row.dense_train, Timing) and row.dense_train.median > 0 for row in report.rows)
        slow = [f"{row.layer} {row.planned_train_speedup:.2f}×" for row in report.rows
                if row.execution != "dense" and row.planned_train_speedup < TARGETS["layer"]]
        result["layer_verdict"] = {"below": slow, "factorized": sum(row.execution != "dense" for row in report.rows)}
        table = {"report": report, "markdown": report.to_markdown()}
        if name == "vgg16":
            assert len(report.rows) == 13, f"VGG-16 has 13 convs, the report has {len(report.rows)} rows"
            # the report agrees with a timing of each layer by hand (bench/report_vs_hand.py); the
            # report's low-rank forward column is the factorized form, so the hand check times that
            factorized = copy.deepcopy(auto)
            set_execution(factorized, "factorized")
            table["hand"] = hand_check(report, self.dense_model(name), factorized, self.device, self.settings["dtype"],
                                       channels_last=True, repeats=self.settings["layer_repeats"])
            table["markdown"] += "\n\nBy hand:\n" + table["hand"]["markdown"]
        return table

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _policy_text(policy: dict) -> str:
    return "the authors' ranks" if policy.get("preset") == "tai2016" else ", ".join(f"{k} {v}" for k, v in policy.items())


def _rate(images_per_s: float) -> str:
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def summary(results: dict, header: str) -> str:
    """The table: dense's images/s from its first pair (every pair re-times it; the ratios come
    from each variant's own pair)."""
    lines = [header, "",
             "| model | variant | batch | conv MACs ÷ | eager img/s | eager × dense | compiled img/s | compiled × dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        lines += [f"| {name} | failed in {error} | | | | | | |" for error in result["errors"]]
        entries = result["variants"]
        if entries:
            eager = next(iter(entries.values()))["eager"]
            compiled = next((e["compiled"] for e in entries.values() if "speedup" in e.get("compiled", {})), None)
            compiled_dense = f"{_rate(compiled['dense_images_per_s'])} | 1.00×" if compiled else "— |"
            lines.append(f"| {name} | dense | {result['batch']} | 1.00× | {_rate(eager['dense_images_per_s'])} | 1.00×"
                         f" | {compiled_dense} |")
        for variant, entry in entries.items():
            eager, compiled = entry["eager"], entry.get("compiled", {})
            compiled_text = (f"{_rate(compiled['images_per_s'])} | {compiled['speedup']:.2f}×" if "speedup" in compiled
                             else f"{compiled.get('skipped', '—')} |")
            lines.append(f"| {name} | {variant} | {result['batch']} | {entry['theoretical']:.2f}×"
                         f" | {_rate(eager['images_per_s'])}"
                         f" | {eager['speedup']:.2f}× | {compiled_text} |")
    verdicts = []
    for name, result in results.items():
        entry = result.get("variants", {}).get("speed-aware", {})
        for mode in ("eager", "compiled"):
            if "speedup" in entry.get(mode, {}):
                ok = "yes" if entry[mode]["speedup"] >= 1.0 else "NO"
                verdicts.append(f"{name} {mode} {entry[mode]['speedup']:.2f}× ({ok})")
    auto = []
    for name, result in results.items():
        entry = result.get("variants", {}).get("auto", {})
        for mode in ("eager", "compiled"):
            if "speedup" in entry.get(mode, {}):
                target = TARGETS["vgg16 compiled"] if (name, mode) == ("vgg16", "compiled") else TARGETS["model"]
                ok = "yes" if entry[mode]["speedup"] >= target else "NO"
                auto.append(f"{name} {mode} {entry[mode]['speedup']:.2f}× (≥ {target:g}×: {ok})")
        verdict = result.get("layer_verdict")
        if verdict is not None:
            below = verdict["below"]
            auto.append(f"{name} layers: {verdict['factorized'] - len(below)} of {verdict['factorized']} ≥"
                        f" {TARGETS['layer']:g}× fwd+bwd" + (f" (below: {', '.join(below)})" if below else " (yes)"))
    lines += ["", "× dense: against dense in the same alternated run (the dense row shows its first run).",
              "Target, speed-aware trains at least as fast as dense: " + ("; ".join(verdicts) or "no data"),
              "Targets, auto (each layer factorized or composed, whichever is faster) at least as fast as dense per"
              " layer and whole model, VGG-16 ≥ 1.4× compiled: " + ("; ".join(auto) or "no data")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes, fp32, compile backend 'eager': the code path in seconds")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no compiled run that would end (by the longest so far) after this many seconds")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: bench/results on a GPU, a temporary one in --smoke)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not set(models) <= set(MODELS):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --smoke for the CPU code path")

    started = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    settings = SMOKE if args.smoke else GPU
    torch.backends.cudnn.benchmark = True
    bench = Bench(device, settings, started + args.budget_s)
    card = device_description(device)
    header = (f"{card}: torch {torch.__version__}, cuDNN {torch.backends.cudnn.version() if device.type == 'cuda' else '-'},"
              f" {'bf16 autocast' if settings['dtype'] == torch.bfloat16 else 'fp32'}, channels_last,"
              f" {bench.size}×{bench.size}; train-step images/s (forward, backward, SGD), low-rank alternated with dense")
    print(header, flush=True)

    results = {name: {"batch": settings["batch"][name], "variants": {}, "errors": []} for name in models}
    layer_tables = {}
    for phase in ("eager", "layers", "compiled"):
        for name in models:
            if phase != "eager" and not results[name]["variants"] or phase == "layers" and "plan" not in results[name]:
                continue
            phase_started = time.monotonic()
            try:
                if phase == "eager":
                    bench.eager(name, results[name])
                elif phase == "layers":
                    layer_tables[name] = bench.layers(name, results[name])
                    print(layer_tables[name]["markdown"], flush=True)
                else:
                    bench.compiled(name, results[name])
            except Exception as error:  # one model failing must not lose the others' numbers
                traceback.print_exc()
                results[name]["errors"].append(f"{phase}: {type(error).__name__}: {error}".splitlines()[0])
                bench.free()
            results[name].setdefault("seconds", {})[phase] = seconds = time.monotonic() - phase_started
            print(f"  {name} {phase}: {seconds:.0f} s", flush=True)

    text = summary(results, header)
    print("\n" + text)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", (card if device.type == "cuda" else "cpu-smoke").lower()).strip("-")
    out = args.out or (REPO / "bench/results" if device.type == "cuda" else Path(tempfile.mkdtemp(prefix="gpu-smoke-")))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_{date}_{slug}"
    payload = {
        "card": card, "device": str(device), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "date": date, "smoke": args.smoke,
        "settings": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in settings.items()},
        "models": results, "summary": text, "elapsed_s": time.monotonic() - started,
    }
    payload["layers"] = {name: table["report"].as_dict() for name, table in layer_tables.items()}
    if "vgg16" in layer_tables:
        payload["vgg16_layers"] = payload["layers"]["vgg16"]
        hand = layer_tables["vgg16"]["hand"]
        payload["vgg16_layers_by_hand"] = {k: hand[k] for k in ("rows", "agree", "total")}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {stem.with_suffix('.json')} ({payload['elapsed_s']:.0f} s)")
    failed = any(r["errors"] for r in results.values())
    for name, table in layer_tables.items():
        try:  # the numbers are safe in the JSON already; the chart needs matplotlib
            files = table["report"].write(out / f"{stem.name}_{name}_layers")
            print(f"{name} layer table: {files['md']}, {files['png']}")
        except Exception:
            traceback.print_exc()
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
