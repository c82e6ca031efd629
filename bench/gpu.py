"""One GPU run that proves the GPU path: the checks first, then does factorizing make AlexNet, VGG-16 and GoogLeNet train faster here?

In this order, so the time budget covers the most important first (bench/gpu_checks.py has the details
and the tolerances, each stated with its reason):
1. correctness: `dali` (DALI's GPU pipeline against its CPU pipeline on generated JPEGs: the same
   samples, labels, bytes and crop windows, images within the decoders' tolerance; without DALI,
   torchvision feeding the GPU), `train` (the debug model, 50 steps from those JPEGs through the
   trainer: finite, falling loss), `layer` (LowRankConv2d forward/backward on CUDA against float64
   on the CPU), `executions` (composed and factorized forms of whole models agree);
2. `syncs`: the trainer's loop between sync points with torch.cuda.set_sync_debug_mode("warn") and
   every host read counted: none expected;
3. `nccl`: a process group of one over NCCL (process_group(group_of_one=True)), the trainer on it
   (DDP, every all-reduce through NCCL), then the evaluation's exactly-once count over 3 shards;
4. `speed`: for each model, dense against four low-rank variants: the authors' ranks (where
   published), a 2× per-layer theoretical target, speed-aware ranks (lowrank_dist.speed.speed_aware:
   the default policy's ranks and those of 2/3/4× targets, each layer kept factorized only where it is
   measured faster on this card), and `auto`: the default policy's ranks (the authors' for AlexNet and
   VGG-16, 2× for GoogLeNet) with each layer run factorized or composed, whichever its forward+backward
   is measured faster here (lowrank_dist.speed.execution, as `precision.execution: auto` does at a
   run's start; the plan is printed). Measured: train-step images/s (forward, backward, SGD update) in
   eager mode and under torch.compile, bf16 autocast, channels_last, each variant alternated with
   dense; per model the layer table of the auto variant (dense, factorized and composed per layer, the
   plan's choice, theoretical vs measured; VGG-16's forward times also checked by hand,
   bench/report_vs_hand.py); VGG-16 and GoogLeNet fed from JPEGs (DALI on the GPU) against synthetic
   input; the projected mode's projection time against the dense steps between two projections.
   Every model's eager numbers come first; compiled runs follow while time is left (auto first, then
   speed-aware for every model, VGG-16's authors' ranks too).
Targets printed at the end, reported, not tuned to: auto at least as fast as dense for every layer
and whole model, compiled VGG-16 ≥ 1.4×, AlexNet and GoogLeNet ≥ 1.1× dense; from JPEGs ≥ 95% of the
synthetic images/s; projection ≤ 2% of the step time at the default project_every.

Each section's status (ok, failed, skipped with the reason) is in the JSON; one that fails is
recorded and the next runs; one the budget (--budget-s, for the whole run) cannot cover is skipped.
The JSON is rewritten after every section, so a run killed at its time limit keeps what it measured.
Writes bench/results/gpu_<date>_<card>.json and .md (+ each layer table as .md and .png beside
them) and prints the sections table and the speed table. Exit code 1 if a section failed.

    python bench/gpu.py                 # on a CUDA machine, within --budget-s (default 300 s)
    python bench/gpu.py --sections nccl,speed --budget-s 120    # a rerun of what failed
    python bench/gpu.py --smoke         # every section on the CPU at toy sizes, in fp32 (CPUs have no
                                        # fast bf16 convolution), torch.compile's "eager" backend;
                                        # the CUDA-only parts are recorded "skipped: no CUDA"

Runs with the GPU machine's packages (torch, torchvision, PyYAML, matplotlib) plus pydantic, without
`pip install -e .`: the repository root is put on sys.path.

How to run on a GPU (the device tool; 15 minutes of device time for everything, tries included):
the machine has no DALI and no pydantic and no network, so their wheels travel with the calls, one
part per call (a call carries at most 64 MiB), and the machine keeps /tmp only while it stays warm,
30 s after a call: make calls 1-5 back to back.
  0. Here, no device time:  bash bench/gpu_carry.sh   → .gpu_wheels/part-00 … part-03 (231 MB in all,
     DALI 199 MB, nvImageCodec 25 MB, nvJPEG 4 MB, pydantic and DALI's small imports 3 MB) and
     .gpu_wheels/bundle.sha256.
  1. run(carry=[".gpu_wheels/part-00"], timeout_s=180, command=
       "mkdir -p /tmp/w && cp .gpu_wheels/part-00 /tmp/w/ && nvidia-smi -L && python3 -c 'import torch; print(torch.__version__)'")
     (starts the machine: one to two minutes)
  2.-4. run(carry=[".gpu_wheels/part-0N"], timeout_s=60, command="cp .gpu_wheels/part-0N /tmp/w/ && ls -l /tmp/w")
     for N = 1, 2, 3; if `ls` shows an earlier part missing, the machine was replaced: start again at 1.
  5. run(carry=[".gpu_wheels/bundle.sha256"], timeout_s=420, command=
       "set -o pipefail; cp .gpu_wheels/bundle.sha256 /tmp/w/ && (cd /tmp/w && cat part-* > bundle.tar
        && sha256sum -c bundle.sha256 && tar -xf bundle.tar) && python3 -m pip install -q --no-index --no-deps
        --no-compile /tmp/w/wheels/*.whl && PYTHONUNBUFFERED=1 python3 bench/gpu.py --budget-s 300 --out /tmp/res
        2>&1 | tee $OUT/gpu.log; tar -cf $OUT/gpu_results.tar -C /tmp/res ."
     (pip installs into the machine's own environment, so DALI's nvidia/ folders join torch's; the
     results come back as one tar: $OUT returns at most 8 files)
  Device time: ≈ 2 min (start) + ≈ 1 min (calls 2-4) + at most 7 min (call 5: ≈ 30 s install, the
  300 s budget, the last section's overrun and writing) ≈ 10 min, leaving ≥ 4.5 min: enough for one
  fresh machine (none starts with under 4 min left) running `--sections <what failed> --budget-s 120`
  with timeout_s=180, without the wheels unless `dali` is among them. Untar gpu_results.tar into
  bench/results/ and commit the .json and .md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # lowrank_dist, and report_vs_hand beside this script

import torch  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from gpu_checks import CHECKS, ESTIMATE_S, Checks, run_check  # noqa: E402
from lowrank_dist.config import DataConfig  # noqa: E402
from lowrank_dist.data import build_loaders  # noqa: E402
from lowrank_dist.data.synthetic import make_synthetic  # noqa: E402
from lowrank_dist.lowrank.layers import LowRankConv2d  # noqa: E402
from lowrank_dist.models import build_model, choose_ranks, lowrank_policy, model_spec  # noqa: E402
from lowrank_dist.speed.costs import DEFAULT_LOWRANK, conv_costs  # noqa: E402
from lowrank_dist.speed.execution import plan_execution, set_execution  # noqa: E402
from lowrank_dist.speed.report import device_description, speed_report  # noqa: E402
from lowrank_dist.speed.speed_aware import speed_aware_ranks  # noqa: E402
from lowrank_dist.speed.timing import Timing, measure, model_functions, synchronize  # noqa: E402
from lowrank_dist.runtime import autocast_for, logits_of  # noqa: E402
from lowrank_dist.training.projection import Projector  # noqa: E402
from report_vs_hand import hand_check  # noqa: E402

MODELS = ("alexnet", "vgg16", "googlenet")
# compiled: the variants timed under torch.compile, in order, while the time budget lasts;
# skip: variants left out (the smoke run skips VGG-16's speedup2: with its 102M-parameter classifier
# a CPU train step takes about half a second, and GoogLeNet covers that variant's code path);
# eager_s: a model's eager phase is skipped when less of the budget is left;
# from_jpeg: the models also timed fed from JPEGs, jpeg_warmup + jpeg_steps batches of photos with
# sides in jpeg_sides (ImageNet's are mostly 300-500 px), jpeg_threads decoding threads;
# projection: the models whose projection (projected mode) is timed against their dense step,
# projection_calls times (the last one counts: the first also sets up the GPU's eigensolver)
GPU = {"batch": {"alexnet": 128, "vgg16": 64, "googlenet": 128}, "image_size": 224, "dtype": torch.bfloat16,
       "repeats": 10, "warmup": 3, "layer_repeats": 5, "search": (2.0, 3.0, 4.0), "backend": "inductor",
       "compiled": {"vgg16": ("auto", "authors", "speed-aware"), "alexnet": ("auto", "speed-aware"),
                    "googlenet": ("auto", "speed-aware")},
       "skip": {}, "eager_s": 45.0, "from_jpeg": ("vgg16", "googlenet"), "jpeg_steps": 10, "jpeg_warmup": 3,
       "jpeg_sides": (300, 500), "jpeg_threads": 8, "projection": MODELS, "projection_calls": 2}
SMOKE = {"batch": {"alexnet": 2, "vgg16": 2, "googlenet": 2}, "image_size": 64, "dtype": torch.float32,
         "repeats": 1, "warmup": 0, "layer_repeats": 2, "search": (2.0,), "backend": "eager",
         "compiled": {"vgg16": ("speed-aware",), "alexnet": ("auto", "speed-aware"), "googlenet": ("speed-aware",)},
         "skip": {"vgg16": ("speedup2",)}, "eager_s": 0.0, "from_jpeg": ("googlenet",), "jpeg_steps": 2,
         "jpeg_warmup": 1, "jpeg_sides": (64, 96), "jpeg_threads": 1, "projection": ("alexnet",),
         "projection_calls": 1}
# the targets: auto ÷ dense per layer and per model (eager and compiled), compiled per model;
# from-JPEG ÷ synthetic images/s; projection time ÷ the dense steps between two projections
TARGETS = {"layer": 1.0, "model": 1.0, "compiled": {"vgg16": 1.4, "alexnet": 1.1, "googlenet": 1.1},
           "from_jpeg": 0.95, "projection": 0.02}
SECTIONS = (*CHECKS, "speed")  # in the order they run: correctness first, the speed tables last


class Bench:
    def __init__(self, device: torch.device, settings: dict, deadline: float, work: Path):
        self.device, self.settings, self.deadline, self.work = device, settings, deadline, work
        self._photos: Path | None = None
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

    def photos(self) -> Path:
        """A JPEG folder of photo-sized images, enough for every from-JPEG run: a few rendered
        (make_synthetic), the rest hard links to them under other names (decoding costs the same)."""
        if self._photos is None:
            root = self._photos = self.work / "photos"
            low, high = self.settings["jpeg_sides"]
            make_synthetic(root, classes=8, train_per_class=8, val_per_class=1, seed=1, min_side=low, max_side=high)
            files = sorted(root.glob("train/*/*.JPEG"))
            need = max((self.settings["jpeg_warmup"] + self.settings["jpeg_steps"]) * self.settings["batch"][name]
                       for name in self.settings["from_jpeg"])
            for i in range(need - len(files)):
                source = files[i % len(files)]
                os.link(source, source.with_name(f"{source.stem}_copy{i}.JPEG"))
        return self._photos

    def from_jpeg(self, name: str, result: dict) -> None:
        """Train-step images/s of the auto variant fed by the data loaders from JPEGs (DALI on the GPU
        when installed) against the same steps on one synthetic batch, both timed alike (wall clock,
        synchronized at both ends, after the same warm-up): what the input pipeline costs a run."""
        model, batch = self.kept[(name, "auto")], self.settings["batch"][name]
        steps, warmup = self.settings["jpeg_steps"], self.settings["jpeg_warmup"]
        data = DataConfig(root=self.photos(), batch_size=batch, image_size=self.size,
                          workers=self.settings["jpeg_threads"], dali_device="gpu" if self.device.type == "cuda" else "cpu")
        loaders = build_loaders(data, device=self.device, channels_last=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            with autocast_for(self.device, self.settings["dtype"]):
                loss = F.cross_entropy(logits_of(model(images)).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def images_per_s(batches) -> float:
            model.train()
            i = -1
            for i, (images, labels) in enumerate(itertools.islice(batches, warmup + steps)):
                if i == warmup:
                    synchronize(self.device)
                    started = time.perf_counter()
                step(images, labels)
            synchronize(self.device)
            assert i == warmup + steps - 1, f"the JPEG folder gave {i + 1} batches, {warmup + steps} needed"
            return steps * batch / (time.perf_counter() - started)

        example = self.example(name)
        labels = torch.randint(0, 8, (batch,), device=self.device)
        fed = images_per_s(loaders.train.epoch(0))
        synthetic = images_per_s(itertools.repeat((example, labels)))
        result["from_jpeg"] = {"backend": loaders.backend, "images_per_s": fed, "synthetic_images_per_s": synthetic,
                               "ratio": fed / synthetic, "target": TARGETS["from_jpeg"], "steps": steps,
                               "jpeg_sides": list(self.settings["jpeg_sides"])}
        print(f"  {name} from JPEGs ({loaders.backend}): {_rate(fed)} img/s, {fed / synthetic:.2f}× synthetic",
              flush=True)

    def projection(self, name: str, result: dict) -> None:
        """Projected mode's cost: one projection of the dense model's kernels onto the default
        policy's ranks, against the dense train steps taken between two projections."""
        from lowrank_dist.config import LowRankConfig  # needs pydantic, as the trainer does

        every = LowRankConfig.model_fields["project_every"].default
        dense = copy.deepcopy(self.dense_model(name))
        projector = Projector(dense, choose_ranks(dense, lowrank_policy(model_spec(name), DEFAULT_LOWRANK[name])))
        seconds = []
        for _ in range(self.settings["projection_calls"]):
            synchronize(self.device)
            started = time.perf_counter()
            projector.project()
            synchronize(self.device)
            seconds.append(time.perf_counter() - started)
        step = next(iter(result["variants"].values()))["eager"]["dense"]["median_s"]
        result["projection"] = {"project_every": every, "projection_s": seconds[-1], "dense_step_s": step,
                                "fraction": seconds[-1] / (every * step), "target": TARGETS["projection"]}
        del dense, projector
        print(f"  {name} projection: {seconds[-1] * 1e3:.0f} ms every {every} steps of {step * 1e3:.1f} ms:"
              f" {result['projection']['fraction']:.2%} of the step time", flush=True)

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
        lines += [f"| {name} | skipped {phase}: {why} | | | | | | |" for phase, why in result.get("skipped", {}).items()]
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
                target = TARGETS["compiled"][name] if mode == "compiled" else TARGETS["model"]
                ok = "yes" if entry[mode]["speedup"] >= target else "NO"
                auto.append(f"{name} {mode} {entry[mode]['speedup']:.2f}× (≥ {target:g}×: {ok})")
        verdict = result.get("layer_verdict")
        if verdict is not None:
            below = verdict["below"]
            auto.append(f"{name} layers: {verdict['factorized'] - len(below)} of {verdict['factorized']} ≥"
                        f" {TARGETS['layer']:g}× fwd+bwd" + (f" (below: {', '.join(below)})" if below else " (yes)"))
    inputs = [f"{name} {r['from_jpeg']['ratio']:.2f}× ({r['from_jpeg']['backend']}, {_rate(r['from_jpeg']['images_per_s'])}"
              f" vs {_rate(r['from_jpeg']['synthetic_images_per_s'])} img/s:"
              f" {'yes' if r['from_jpeg']['ratio'] >= TARGETS['from_jpeg'] else 'NO'})"
              for name, r in results.items() if "from_jpeg" in r]
    projections = [f"{name} {r['projection']['fraction']:.2%} ({r['projection']['projection_s'] * 1e3:.0f} ms per"
                   f" {r['projection']['project_every']} steps: {'yes' if r['projection']['fraction'] <= TARGETS['projection'] else 'NO'})"
                   for name, r in results.items() if "projection" in r]
    compiled_targets = ", ".join(f"{name} {target:g}×" for name, target in TARGETS["compiled"].items())
    lines += ["", "× dense: against dense in the same alternated run (the dense row shows its first run).",
              "Target, speed-aware trains at least as fast as dense: " + ("; ".join(verdicts) or "no data"),
              "Targets, auto (each layer factorized or composed, whichever is faster) at least as fast as dense per"
              f" layer and whole model, compiled {compiled_targets}: " + ("; ".join(auto) or "no data"),
              f"Target, from JPEGs ≥ {TARGETS['from_jpeg']:g}× the synthetic-input images/s (auto variant, eager): "
              + ("; ".join(inputs) or "no data"),
              f"Target, projection ≤ {TARGETS['projection']:.0%} of the dense step time at the default project_every: "
              + ("; ".join(projections) or "no data")]
    return "\n".join(lines)


def sections_table(sections: dict) -> str:
    """One line per section of the run: its status, time and why it failed or was skipped."""
    lines = ["| section | status | s | note |", "|---|---|---:|---|"]
    for name, section in sections.items():
        parts = section.get("parts_skipped", [])
        note = section.get("reason") or (f"skipped parts: {', '.join(parts[:3])}{' …' if len(parts) > 3 else ''}"
                                         if parts else "")
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', 0):.0f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes, fp32, compile backend 'eager': the code path in seconds")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (a rerun of what failed), run in that order")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="the whole run's time budget: a section, model phase or compiled run that would end"
                             " after it (by its estimate) is skipped and recorded as such")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: bench/results on a GPU, a temporary one in --smoke)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if not set(models) <= set(MODELS):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    sections = [name for name in SECTIONS if name in args.sections.split(",")]
    if set(args.sections.split(",")) - set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --smoke for the CPU code path")

    started = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    settings = SMOKE if args.smoke else GPU
    torch.backends.cudnn.benchmark = True
    deadline = started + args.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))  # JPEG folders and training runs, never the results
    bench = Bench(device, settings, deadline, work)
    card = device_description(device)
    header = (f"{card}: torch {torch.__version__}, cuDNN {torch.backends.cudnn.version() if device.type == 'cuda' else '-'},"
              f" {'bf16 autocast' if settings['dtype'] == torch.bfloat16 else 'fp32'}, channels_last,"
              f" {bench.size}×{bench.size}; train-step images/s (forward, backward, SGD), low-rank alternated with dense")
    print(header, flush=True)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", (card if device.type == "cuda" else "cpu-smoke").lower()).strip("-")
    out = args.out or (REPO / "bench/results" if device.type == "cuda" else Path(tempfile.mkdtemp(prefix="gpu-smoke-")))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_{date}_{slug}"
    results = {name: {"batch": settings["batch"][name], "variants": {}, "errors": []} for name in models}
    payload = {
        "card": card, "device": str(device), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "date": date, "smoke": args.smoke,
        "budget_s": args.budget_s, "settings": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in settings.items()},
        "sections": {}, "models": results,
    }

    def save() -> None:
        """The JSON so far, rewritten after every section and phase: a run killed at its time limit
        still leaves everything measured before."""
        payload["elapsed_s"] = time.monotonic() - started
        partial = stem.with_suffix(".json.tmp")
        partial.write_text(json.dumps(payload, indent=1) + "\n")
        partial.replace(stem.with_suffix(".json"))

    checks = Checks(device, args.smoke, work)
    for name in [name for name in sections if name in CHECKS]:
        left = deadline - time.monotonic()
        section_started = time.monotonic()
        if left < ESTIMATE_S[name]:
            section = {"status": "skipped", "reason": f"time budget ({left:.0f} s left, about {ESTIMATE_S[name]} s needed)"}
        else:
            print(f"== {name}", flush=True)
            section = run_check(name, checks)
        section["seconds"] = time.monotonic() - section_started
        payload["sections"][name] = section
        print(f"== {name}: {section['status']}" + (f" ({section['reason']})" if "reason" in section else "")
              + f", {section['seconds']:.0f} s", flush=True)
        save()

    layer_tables = {}
    if "speed" in sections:
        speed_started = time.monotonic()
        run_speed(bench, models, results, layer_tables, save)
        failed_models = [name for name, result in results.items() if result["errors"]]
        payload["sections"]["speed"] = {
            "status": "failed" if failed_models else "ok", "seconds": time.monotonic() - speed_started,
            **({"reason": f"errors in {', '.join(failed_models)} (see models)"} if failed_models else {}),
            **({"parts_skipped": [f"{name} {phase}" for name, r in results.items() for phase in r.get("skipped", {})]}
               if any(r.get("skipped") for r in results.values()) else {}),
        }
    else:
        payload["models"] = {}

    text = sections_table(payload["sections"]) + ("\n\n" + summary(results, header) if "speed" in sections else "")
    print("\n" + text)
    payload["summary"] = text
    payload["layers"] = {name: table["report"].as_dict() for name, table in layer_tables.items()}
    if "vgg16" in layer_tables:
        payload["vgg16_layers"] = payload["layers"]["vgg16"]
        hand = layer_tables["vgg16"]["hand"]
        payload["vgg16_layers_by_hand"] = {k: hand[k] for k in ("rows", "agree", "total")}
    save()
    markdown = [f"# {header}", "", text] + [f"\n## {name}, per layer\n\n{table['markdown']}" for name, table in layer_tables.items()]
    stem.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and .md ({payload['elapsed_s']:.0f} s)")
    failed = any(section["status"] == "failed" for section in payload["sections"].values())
    for name, table in layer_tables.items():
        try:  # the numbers are safe in the JSON already; the chart needs matplotlib
            files = table["report"].write(out / f"{stem.name}_{name}_layers")
            print(f"{name} layer table: {files['md']}, {files['png']}")
        except Exception:
            traceback.print_exc()
            failed = True
    return 1 if failed else 0


def run_speed(bench: Bench, models: list[str], results: dict, layer_tables: dict, save) -> None:
    """The speed section, phase by phase across the models, so that every model's eager numbers come
    before any compiled run. A phase that fails is recorded in its model's errors and the others go
    on; one that the budget cannot cover is recorded in its model's skipped."""
    settings = bench.settings
    for phase in ("eager", "layers", "from_jpeg", "projection", "compiled"):
        for name in models:
            result = results[name]
            if phase != "eager" and not result["variants"] or phase == "layers" and "plan" not in result:
                continue
            if (phase == "from_jpeg" and name not in settings["from_jpeg"]
                    or phase == "projection" and name not in settings["projection"]
                    or phase in ("layers", "from_jpeg") and (name, "auto") not in bench.kept):
                continue
            left = bench.deadline - time.monotonic()
            if phase != "compiled" and left < settings["eager_s"]:  # compiled runs check the budget one by one
                result.setdefault("skipped", {})[phase] = f"time budget ({left:.0f} s left)"
                continue
            phase_started = time.monotonic()
            try:
                if phase == "eager":
                    bench.eager(name, result)
                elif phase == "layers":
                    layer_tables[name] = bench.layers(name, result)
                    print(layer_tables[name]["markdown"], flush=True)
                elif phase == "from_jpeg":
                    bench.from_jpeg(name, result)
                elif phase == "projection":
                    bench.projection(name, result)
                else:
                    bench.compiled(name, result)
            except Exception as error:  # one model failing must not lose the others' numbers
                traceback.print_exc()
                result["errors"].append(f"{phase}: {type(error).__name__}: {error}".splitlines()[0])
                bench.free()
            result.setdefault("seconds", {})[phase] = seconds = time.monotonic() - phase_started
            print(f"  {name} {phase}: {seconds:.0f} s", flush=True)
            save()


if __name__ == "__main__":
    sys.exit(main())
