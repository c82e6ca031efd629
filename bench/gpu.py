"""The GPU run, ordered by value: does factorizing make VGG-16, AlexNet and GoogLeNet train faster here?

bench/ only measures: what the GPU path must get right is asserted by the tests in tests/gpu/, which
the device plan runs first. Two phases, each one device call (phase 2 also a few calls that only
move DALI's parts), each complete on its own: its files are in $OUT after every section, and a
phase cut short by its time limit returns what it has.

Phase 1 — no DALI; carries pydantic's wheels (~3 MB):
  1. `pytest tests/gpu` (at most 150 s): the trainer from JPEGs through torchvision in bf16 and
     fp16, channels_last, GradScaler with the skipping SGD; no host syncs between sync points; a
     group of one over NCCL and exactly-once evaluation; LowRankConv2d against float64; the two
     execution forms of whole models; torchvision feeding the GPU. DALI's test skips (no DALI yet).
  2. `bench/gpu.py --phase 1` (at most 240 s), its sections in this order, each skipped when its
     estimate (ESTIMATE_S) exceeds the budget left:
     vgg16           the auto execution plan at batch 64 (each factorized layer timed both ways and
                     run the faster), then train-step images/s of dense, all factorized and auto at
                     the authors' ranks, alternated in one run, eager;
     vgg16-layers    the auto variant layer by layer (dense, factorized, composed, the plan's choice),
                     and the same layers timed by hand (bench/report_vs_hand.py);
     alexnet, googlenet   the same three, eager, whole model (the default ranks: the authors' for
                     AlexNet, a 2× target per layer for GoogLeNet);
     vgg16-compiled  dense, auto, then all factorized under torch.compile: each compiled while the
                     budget lasts (a cold compile takes ~45–90 s; the first is guessed at 90, the
                     next at the longest so far), then the compiled ones timed alternated.
Phase 2 — DALI, only if device time is left: DALI, nvImageCodec and nvJPEG pre-installed for the
machine's Python as one tar.xz in ≤ 60 MB parts, one part a call, joined, checked and unpacked into
the machine's site-packages by the last call, which then runs
  1. `pytest tests/gpu/test_dali.py` (at most 50 s): DALI's GPU pipeline against its CPU pipeline,
     in a child process (a decoder that crashes fails that test alone);
  2. `bench/gpu.py --phase 2`: projection (the projected mode's cost: one projection of VGG-16's
     dense kernels onto the authors' ranks against the dense steps between two projections; then
     AlexNet and GoogLeNet), from-jpeg (train-step images/s of VGG-16's and GoogLeNet's auto variant
     fed by DALI on the GPU against one synthetic batch).

Budget: 15 minutes of device time for the session, tries included; one call at most 10 minutes; no
machine starts with less than 4 minutes left; a machine goes back 30 s after a call.
  cold start                    120–240 s
  phase 1                       timeout_s=475, typically ~350 s (tests ~110 s, bench ≤ 240 s)
  left after phase 1            ~360 s typically, 175 s at worst: too little for a fresh machine
  phase 2, each part but the last   timeout_s=30, a few seconds
  phase 2, the last call        timeout_s sized to what is left (at most 265); phase 2 needs ≥ 300 s of
                                device time with 3 parts (10 s a call for the transfers), or is left out
  then give_back
`python bench/gpu.py --plan` prints the exact calls (command, carry, timeout_s) and their carry
sizes (bench/gpu_plan.py; tests/test_gpu_bench.py checks them against these limits).

How to run it (the device tool's verbs; nothing here needs a GPU until step 2):
  0. Here: `bash bench/gpu_carry.sh` (.gpu_wheels/: phase 1's wheels, DALI's parts) and
     `python bench/gpu.py --plan`.
  1. status: can_start_another must be true. Then run() phase 1's call exactly as printed.
  2. Within 30 s of its reply: if its lease.budget_left_s covers phase 2, run
     `python bench/gpu.py --plan --left-s <budget_left_s>` and phase 2's calls back to back, each
     within 30 s of the last (a part missing from /tmp/dali means the machine was replaced: the
     last call says so and stops). Otherwise, or afterwards, give_back.
  3. Copy the JSON and markdown from files_at to bench/results/ and commit them, the card named.
  A rerun of what a phase missed: `--sections` (e.g. `--phase 1 --sections vgg16-compiled`).

Results: gpu_<date>_<card>_phase<N>.json and .md in --out (bench/results on a GPU), rewritten after
every section; each section's status (ok, failed, skipped with the reason, interrupted) is in them.
A missing optional package (pydantic, PyYAML, DALI) skips what needs it, naming it. Exit code 1
if a section failed or was interrupted.

    python bench/gpu.py                          # on a CUDA machine: both phases (phase 2 needs DALI)
    python bench/gpu.py --phase 1 --budget-s 225 --out $OUT
    python bench/gpu.py --smoke                  # both phases on the CPU at toy sizes, fp32, compile
                                                 # backend "eager": the code paths in a minute or two

Runs with the GPU machine's packages (torch, torchvision, numpy) plus pydantic, without
`pip install -e .`: the repository root is put on sys.path.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--plan" in sys.argv[1:]:
    # the dry run needs no torch: it runs here between two device calls, inside the 30 s idle window
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_plan import main as plan_main

    sys.exit(plan_main([arg for arg in sys.argv[1:] if arg != "--plan"]))

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # lowrank_dist, and report_vs_hand beside this script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lowrank_dist.files import write_text_atomic  # noqa: E402
from lowrank_dist.lowrank.layers import LowRankConv2d  # noqa: E402
from lowrank_dist.models import build_model, choose_ranks, lowrank_policy, model_spec  # noqa: E402
from lowrank_dist.speed.costs import DEFAULT_LOWRANK, conv_costs  # noqa: E402
from lowrank_dist.speed.execution import plan_execution, set_execution  # noqa: E402
from lowrank_dist.speed.report import device_description, speed_report  # noqa: E402
from lowrank_dist.speed.timing import Timing, measure, model_functions, synchronize  # noqa: E402
from lowrank_dist.runtime import autocast_for, logits_of  # noqa: E402
from lowrank_dist.training.projection import Projector  # noqa: E402
from report_vs_hand import hand_check  # noqa: E402

PHASES = {1: ("vgg16", "vgg16-layers", "alexnet", "googlenet", "vgg16-compiled"), 2: ("projection", "from-jpeg")}
SECTIONS = PHASES[1] + PHASES[2]
# seconds a section needs on the GPU, at least (cold CUDA and cuDNN included): skipped when less is left
ESTIMATE_S = {"vgg16": 30, "vgg16-layers": 20, "alexnet": 15, "googlenet": 25, "vgg16-compiled": 90,
              "projection": 15, "from-jpeg": 40}
VARIANTS = ("dense", "factorized", "auto")  # timed against each other, in one alternated run
# packages a section may need that a GPU machine may lack: missing, the section is skipped, not failed
OPTIONAL = ("pydantic", "yaml", "nvidia")
# batch: per model; repeats/warmup: whole-model timing; layer_repeats: the plan's and the layer table's;
# compile_guess_s: a cold compile before the first is measured; from_jpeg: the models fed from
# JPEGs, jpeg_warmup + jpeg_steps batches of photos with sides in jpeg_sides (ImageNet's are mostly
# 300-500 px), jpeg_threads decoding threads; projection: the models whose projection is timed,
# projection_calls times (the last one counts: the first also sets up the eigensolver)
GPU = {"batch": {"alexnet": 128, "vgg16": 64, "googlenet": 128}, "image_size": 224, "dtype": torch.bfloat16,
       "repeats": 10, "warmup": 3, "layer_repeats": 5, "backend": "inductor", "compile_guess_s": 90.0,
       "from_jpeg": ("vgg16", "googlenet"), "jpeg_steps": 10, "jpeg_warmup": 3, "jpeg_sides": (300, 500),
       "jpeg_threads": 8, "dali_device": "gpu", "projection": ("vgg16", "alexnet", "googlenet"), "projection_calls": 2,
       "estimates": True}
# the CPU: toy sizes, fp32 (CPUs have no fast bf16 convolution), torch.compile's "eager" backend
SMOKE = {"batch": {"alexnet": 2, "vgg16": 2, "googlenet": 2}, "image_size": 64, "dtype": torch.float32,
         "repeats": 1, "warmup": 0, "layer_repeats": 2, "backend": "eager", "compile_guess_s": 0.0,
         "from_jpeg": ("googlenet",), "jpeg_steps": 2, "jpeg_warmup": 1, "jpeg_sides": (64, 96), "jpeg_threads": 1,
         "dali_device": "cpu", "projection": ("alexnet",), "projection_calls": 1, "estimates": False}
# issue 21's targets: every layer under the auto plan ≥ 1.0× its dense twin (within 3%); auto ≥
# dense whole-model; VGG-16 at the authors' ranks compiled ≥ 1.6× dense (about the bound activation
# traffic sets); from JPEGs ≥ 95% of the synthetic rate; a projection ≤ 2% of the step time
TARGETS = {"layer": 0.97, "model": 1.0, "vgg16_compiled": 1.6, "from_jpeg": 0.95, "projection": 0.02}


class Skip(Exception):
    """The section cannot run here; the message says why."""


class Bench:
    def __init__(self, device: torch.device, settings: dict, deadline: float, work: Path):
        self.device, self.settings, self.deadline, self.work = device, settings, deadline, work
        self.size = settings["image_size"]
        self.compiles: list[float] = []  # seconds of each cold compile so far
        self.models: dict[str, dict[str, torch.nn.Module]] = {}  # per model: dense, factorized, auto
        self._photos: Path | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def shape(self, name: str) -> tuple[int, int, int, int]:
        return (self.settings["batch"][name], 3, self.size, self.size)

    def example(self, name: str) -> torch.Tensor:
        return torch.randn(self.shape(name), device=self.device).contiguous(memory_format=torch.channels_last)

    def build(self, name: str, lowrank: dict | None) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model({"name": name} | ({"lowrank": lowrank} if lowrank else {}))

    def on_device(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device).to(memory_format=torch.channels_last)

    def variants(self, name: str, record: dict) -> dict[str, torch.nn.Module]:
        """Dense, all factorized and auto (the default ranks, each layer run in the form its timing
        chose at this batch) on the device, built once; the plan and the ranks go into `record`."""
        if name not in self.models:
            policy = DEFAULT_LOWRANK[name]
            factorized = self.build(name, policy)
            rows = conv_costs(factorized, (3, self.size, self.size))
            dense, factorized = self.on_device(self.build(name, None)), self.on_device(factorized)
            set_execution(factorized, "factorized")
            check_twin(dense, factorized, {row.module: row.rank for row in rows}, self.example(name))
            auto = copy.deepcopy(factorized)
            plan = plan_execution(auto, self.shape(name), "auto", self.device, self.settings["dtype"],
                                  channels_last=True, repeats=self.settings["layer_repeats"],
                                  warmup=self.settings["warmup"])
            plan.apply(auto)
            print(plan.to_markdown(), flush=True)
            record.update(batch=self.shape(name)[0], policy=policy, plan=plan.as_dict(),
                          ranks={row.module: row.rank for row in rows if row.rank is not None},
                          theoretical=sum(r.dense_macs for r in rows) / sum(r.lowrank_macs for r in rows))
            self.models[name] = {"dense": dense, "factorized": factorized, "auto": auto}
        return self.models[name]

    def eager(self, name: str, record: dict) -> None:
        """Train-step images/s of the three variants, eager, alternated in one run."""
        models, example = self.variants(name, record), self.example(name)
        fns = {variant: model_functions(model, example, self.settings["dtype"])[1] for variant, model in models.items()}
        record["eager"] = rates(measure(fns, self.device, self.settings["repeats"], self.settings["warmup"]),
                                example.shape[0])
        print(f"  {name} eager: " + ", ".join(f"{v} {r['speedup']:.2f}×" for v, r in record["eager"].items()), flush=True)

    def compiled(self, name: str, record: dict) -> None:
        """The three variants under torch.compile, dense first, then auto (what a run uses), then all
        factorized: each compiled (its first step) while the budget lasts, by the longest compile so
        far (compile_guess_s before the first), then those compiled timed alternated. The compiled
        graphs are released after."""
        models, example = self.variants(name, record), self.example(name)
        fns, record["compile_s"] = {}, {}
        try:
            for variant in ("dense", "auto", "factorized"):
                model, estimate = models[variant], max(self.compiles, default=self.settings["compile_guess_s"])
                if self.left() < estimate:
                    record.setdefault("skipped", {})["compiled " + variant] = f"time budget ({self.left():.0f} s left)"
                    continue
                options = {"backend": self.settings["backend"], "dynamic": False}
                step = model_functions(model, example, self.settings["dtype"], True, **options)[1]
                started = time.monotonic()
                step()  # the compile
                synchronize(self.device)
                record["compile_s"][variant] = seconds = time.monotonic() - started
                self.compiles.append(seconds if self.settings["estimates"] else 0.0)
                fns[variant] = step
                print(f"  {name} {variant}: compiled in {seconds:.0f} s", flush=True)
            if "dense" not in fns or len(fns) < 2:
                raise Skip(f"time budget: compiled {sorted(fns) or 'nothing'}, dense and one other needed")
            timed = {variant: fns[variant] for variant in VARIANTS if variant in fns}  # the tables' order
            record["compiled"] = rates(measure(timed, self.device, self.settings["repeats"], self.settings["warmup"]),
                                       example.shape[0])
            print(f"  {name} compiled: " + ", ".join(f"{v} {r['speedup']:.2f}×" for v, r in record["compiled"].items()),
                  flush=True)
        finally:
            torch._dynamo.reset()
            free(self.device)

    def layers(self, name: str, record: dict) -> None:
        """The auto variant layer by layer (dense, factorized, composed, the plan's choice); VGG-16's
        forward times also by hand (bench/report_vs_hand.py)."""
        models = self.variants(name, record)
        plan = {layer["module"]: layer["execution"] for layer in record["plan"]["layers"]}
        report = speed_report(
            models["dense"], models["auto"], self.shape(name), self.device, self.settings["dtype"],
            repeats=self.settings["layer_repeats"], warmup=self.settings["warmup"], channels_last=True,
            whole_model=False, title=f"{name}, {policy_text(DEFAULT_LOWRANK[name])}, auto plan", plan=plan,
            plan_source="auto, timed by this run",
        )
        record["layers"] = report.as_dict()
        record["layers_markdown"] = report.to_markdown()
        slow = [f"{row.layer} {row.planned_train_speedup:.2f}×" for row in report.rows
                if row.execution != "dense" and row.planned_train_speedup < TARGETS["layer"]]
        record["layer_verdict"] = {"below": slow, "factorized": sum(row.execution != "dense" for row in report.rows)}
        # the report's low-rank forward column is the factorized form, so the hand check times that
        hand = hand_check(report, models["dense"], models["factorized"], self.device, self.settings["dtype"],
                          channels_last=True, repeats=self.settings["layer_repeats"])
        record["layers_by_hand"] = {k: hand[k] for k in ("rows", "agree", "total")}
        record["layers_markdown"] += "\n\nBy hand:\n" + hand["markdown"]
        print(record["layers_markdown"], flush=True)

    def projection(self, name: str, record: dict) -> None:
        """The projected mode's cost: one projection of the dense model's kernels onto the default
        ranks, against the dense train steps taken between two projections."""
        from lowrank_dist.config import LowRankConfig  # the default interval (pydantic, as the trainer)

        every = LowRankConfig.model_fields["project_every"].default
        dense = self.on_device(self.build(name, None))
        example = self.example(name)
        step = measure({"dense": model_functions(dense, example, self.settings["dtype"])[1]}, self.device,
                       self.settings["repeats"], self.settings["warmup"])["dense"].median
        projector = Projector(dense, choose_ranks(dense, lowrank_policy(model_spec(name), DEFAULT_LOWRANK[name])))
        seconds = []
        for _ in range(self.settings["projection_calls"]):
            synchronize(self.device)
            started = time.perf_counter()
            projector.project()
            synchronize(self.device)
            seconds.append(time.perf_counter() - started)
        record["projection"] = {"project_every": every, "projection_s": seconds[-1], "dense_step_s": step,
                                "fraction": seconds[-1] / (every * step), "target": TARGETS["projection"]}
        print(f"  {name} projection: {seconds[-1] * 1e3:.0f} ms every {every} steps of {step * 1e3:.1f} ms:"
              f" {record['projection']['fraction']:.2%} of the step time", flush=True)

    def photos(self) -> Path:
        """A JPEG folder of photo-sized images, enough for every from-JPEG run: a few rendered
        (make_synthetic), the rest hard links to them under other names (decoding costs the same)."""
        from lowrank_dist.data.synthetic import make_synthetic

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

    def from_jpeg(self, name: str, record: dict) -> None:
        """Train-step images/s of the auto variant fed by DALI from JPEGs against the same steps on
        one synthetic batch, both timed alike (wall clock, synchronized at both ends, after the same
        warm-up): what the input pipeline costs a run."""
        from lowrank_dist.config import DataConfig
        from lowrank_dist.data import build_loaders
        from lowrank_dist.data.dali import dali_available

        if not dali_available():
            raise Skip("nvidia.dali is not installed (phase 2 carries it)")
        model, batch = self.variants(name, record)["auto"], self.settings["batch"][name]
        data = DataConfig(root=self.photos(), backend="dali", dali_device=self.settings["dali_device"],
                          batch_size=batch, image_size=self.size, workers=self.settings["jpeg_threads"])
        loaders = build_loaders(data, device=self.device, channels_last=True)
        fed = self._images_per_s(model, loaders.train.epoch(0), batch)
        example, labels = self.example(name), torch.randint(0, 8, (batch,), device=self.device)
        synthetic = self._images_per_s(model, itertools.repeat((example, labels)), batch)
        record["from_jpeg"] = {"backend": loaders.backend, "images_per_s": fed, "synthetic_images_per_s": synthetic,
                               "ratio": fed / synthetic, "target": TARGETS["from_jpeg"],
                               "steps": self.settings["jpeg_steps"], "jpeg_sides": list(self.settings["jpeg_sides"])}
        print(f"  {name} from JPEGs ({loaders.backend}): {rate(fed)} img/s, {fed / synthetic:.2f}× synthetic",
              flush=True)

    def _images_per_s(self, model: torch.nn.Module, batches, batch: int) -> float:
        steps, warmup = self.settings["jpeg_steps"], self.settings["jpeg_warmup"]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
        model.train()
        i, started = -1, time.perf_counter()
        for i, (images, labels) in enumerate(itertools.islice(batches, warmup + steps)):
            if i == warmup:
                synchronize(self.device)
                started = time.perf_counter()
            with autocast_for(self.device, self.settings["dtype"]):
                loss = F.cross_entropy(logits_of(model(images)).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        if i != warmup + steps - 1:
            raise RuntimeError(f"the JPEG folder gave {i + 1} batches, {warmup + steps} needed")
        return steps * batch / (time.perf_counter() - started)


def check_twin(dense: torch.nn.Module, lowrank: torch.nn.Module, ranks: dict, example: torch.Tensor) -> None:
    """The low-rank twin has the ranks chosen and gives finite logits of the dense shape: a
    measurement of a wrong model is worth nothing."""
    built = {n: m.rank for n, m in lowrank.named_modules() if isinstance(m, LowRankConv2d)}
    if built != {n: k for n, k in ranks.items() if k is not None}:
        raise RuntimeError(f"built ranks {built} != chosen {ranks}")
    with torch.no_grad():
        want = logits_of(dense.eval()(example)).shape
        got = logits_of(lowrank.eval()(example))
    if got.shape != want or not torch.isfinite(got).all():
        raise RuntimeError(f"low-rank output {tuple(got.shape)} (finite: {bool(torch.isfinite(got).all())}) vs dense {tuple(want)}")


def rates(timings: dict[str, Timing], batch: int) -> dict[str, dict]:
    """images/s of each variant and its speed-up over dense in the same alternated run."""
    if any(s <= 0 for t in timings.values() for s in t.samples):
        raise RuntimeError(f"a non-positive time: { {k: t.samples for k, t in timings.items()} }")
    dense = timings["dense"].median
    return {variant: {"images_per_s": batch / t.median, "speedup": dense / t.median, **t.as_dict()}
            for variant, t in timings.items()}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def policy_text(policy: dict) -> str:
    return "the authors' ranks" if policy.get("preset") == "tai2016" else ", ".join(f"{k} {v}" for k, v in policy.items())


def rate(images_per_s: float) -> str:
    return f"{images_per_s:,.0f}" if images_per_s >= 100 else f"{images_per_s:.3g}"


def run_section(bench: Bench, section: str, records: dict) -> dict:
    """One section: {"status": "ok" | "failed" | "skipped", "reason"?, "seconds"}; its numbers go
    into `records` (per model). A failure is recorded and the next section runs."""
    models = {"vgg16-layers": ("vgg16",), "vgg16-compiled": ("vgg16",), "projection": bench.settings["projection"],
              "from-jpeg": bench.settings["from_jpeg"]}.get(section, (section,))
    method = {"vgg16-layers": bench.layers, "vgg16-compiled": bench.compiled, "projection": bench.projection,
              "from-jpeg": bench.from_jpeg}.get(section, bench.eager)
    started = time.monotonic()
    try:
        for name in models:
            method(name, records.setdefault(name, {}))
        status = {"status": "ok"}
    except Skip as skip:
        status = {"status": "skipped", "reason": str(skip)}
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in OPTIONAL:
            raise
        status = {"status": "skipped", "reason": f"{error.name} is not installed"}
    except Exception as error:  # a crash is a finding too: recorded, and the next section runs
        traceback.print_exc()
        status = {"status": "failed", "reason": f"{type(error).__name__}: {error}".splitlines()[0]}
        free(bench.device)
    return status | {"seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    settings = SMOKE if args.smoke else GPU
    torch.backends.cudnn.benchmark = True  # fixed shapes throughout
    # `timeout -s INT` (the device plan's) and its TERM: save, then stop. SIGINT explicitly too: a
    # command started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt for it (the bench would run on past its limit).
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    started = time.monotonic()
    bench = Bench(device, settings, started + args.budget_s, Path(tempfile.mkdtemp(prefix="gpu-bench-")))
    card = device_description(device)
    header = (f"{card}: torch {torch.__version__}, cuDNN {torch.backends.cudnn.version() if device.type == 'cuda' else '-'},"
              f" {'bf16 autocast' if settings['dtype'] == torch.bfloat16 else 'fp32'}, channels_last,"
              f" {bench.size}×{bench.size}; train-step images/s (forward, backward, SGD), variants alternated")
    print(header, flush=True)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", (card if device.type == "cuda" else "cpu-smoke").lower()).strip("-")
    out = args.out or (REPO / "bench/results" if device.type == "cuda" else Path(tempfile.mkdtemp(prefix="gpu-smoke-")))
    stem = out / (f"gpu_{date}_{slug}" + (f"_phase{args.phase}" if args.phase else ""))
    payload = {"card": card, "device": str(device), "torch": torch.__version__,
               "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "date": date,
               "smoke": args.smoke, "phase": args.phase, "budget_s": args.budget_s,
               "settings": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in settings.items()},
               "targets": TARGETS, "sections": {}, "models": {}}
    try:
        run_sections(bench, args.sections, payload, lambda: save(stem, payload, header, started))
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)  # the generated JPEGs; the results are in `out`
    print("\n" + summary(payload))
    print(f"wrote {stem.with_suffix('.json')} and .md ({payload['elapsed_s']:.0f} s)")
    return 1 if any(s["status"] in ("failed", "interrupted") for s in payload["sections"].values()) else 0


def run_sections(bench: Bench, sections: tuple[str, ...], payload: dict, save) -> None:
    """Each section in turn, unless the budget left is below its estimate; the files are saved
    after each. A SIGINT (or SIGTERM) marks the section running then as interrupted and stops."""
    for section in sections:
        left, needed = bench.left(), ESTIMATE_S[section] if bench.settings["estimates"] else 0
        if left < needed:
            result = {"status": "skipped", "reason": f"time budget ({left:.0f} s left, about {needed} s needed)"}
        else:
            print(f"== {section}", flush=True)
            try:
                result = run_section(bench, section, payload["models"])
            except KeyboardInterrupt:  # `timeout -s INT`: keep what was measured, say where it stopped
                result = {"status": "interrupted", "reason": "the time limit (SIGINT/SIGTERM)"}
        payload["sections"][section] = result
        print(f"== {section}: {result['status']}" + (f" ({result['reason']})" if "reason" in result else ""), flush=True)
        save()
        if result["status"] == "interrupted":
            break


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true",
                        help="print the device plan's calls and their carry sizes (bench/gpu_plan.py; --left-s N sizes phase 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, toy sizes, fp32, compile backend 'eager': the code paths in a minute or two")
    parser.add_argument("--phase", type=int, choices=sorted(PHASES), help="one phase's sections (default: both)")
    parser.add_argument("--sections", help=f"comma-separated, of {', '.join(SECTIONS)} (a rerun of what was missed)")
    parser.add_argument("--budget-s", type=float, default=225.0,
                        help="the run's time budget: a section or compile that would end after it (by its estimate) is skipped")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results on a GPU, a temporary one in --smoke)")
    args = parser.parse_args(argv)
    chosen = PHASES[args.phase] if args.phase else SECTIONS
    if args.sections:
        asked = args.sections.split(",")
        if set(asked) - set(chosen):
            parser.error(f"--sections: choose from {', '.join(chosen)}")
        chosen = tuple(s for s in chosen if s in asked)
    args.sections = chosen
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --smoke for the CPU code path")
    return args


def save(stem: Path, payload: dict, header: str, started: float) -> None:
    """The JSON and the markdown so far, rewritten after every section: a run stopped at its time
    limit still leaves everything measured before."""
    payload["elapsed_s"] = time.monotonic() - started
    payload["summary"] = summary(payload)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(payload, indent=1) + "\n")
    layers = [f"\n## {name}, per layer\n\n{record['layers_markdown']}" for name, record in payload["models"].items()
              if "layers_markdown" in record]
    write_text_atomic(stem.with_suffix(".md"), "\n".join([f"# {header}", "", payload["summary"], *layers]) + "\n")


def summary(payload: dict) -> str:
    """The sections table, the speed table and the verdicts against the targets."""
    lines = ["| section | status | s | note |", "|---|---|---:|---|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {s.get('reason', '')} |"
              for name, s in payload["sections"].items()]
    models = payload["models"]
    speed = [(name, mode, variant, entry) for name, record in models.items() for mode in ("eager", "compiled")
             for variant, entry in record.get(mode, {}).items()]
    if speed:
        lines += ["", "| model | mode | variant | batch | conv MACs ÷ | img/s | × dense |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {mode} | {variant} | {models[name]['batch']}"
                  f" | {1.0 if variant == 'dense' else models[name]['theoretical']:.2f}× | {rate(entry['images_per_s'])}"
                  f" | {entry['speedup']:.2f}× |" for name, mode, variant, entry in speed]
    return "\n".join(lines + ["", *verdicts(models)])


def verdicts(models: dict) -> list[str]:
    """One line per target: met or not, with the number; "no data" where nothing was measured."""
    def mark(ok: bool) -> str:
        return "yes" if ok else "NO"

    auto = [f"{name} {mode} {r[mode]['auto']['speedup']:.2f}× ({mark(r[mode]['auto']['speedup'] >= TARGETS['model'])})"
            for name, r in models.items() for mode in ("eager", "compiled") if "auto" in r.get(mode, {})]
    layers = [f"{name}: {v['factorized'] - len(v['below'])} of {v['factorized']}"
              + (f" (below: {', '.join(v['below'])})" if v["below"] else " (yes)")
              for name, r in models.items() if (v := r.get("layer_verdict"))]
    compiled = models.get("vgg16", {}).get("compiled", {})
    vgg = [f"{variant} {compiled[variant]['speedup']:.2f}× ({mark(compiled[variant]['speedup'] >= TARGETS['vgg16_compiled'])})"
           for variant in ("factorized", "auto") if variant in compiled]
    jpeg = [f"{name} {r['from_jpeg']['ratio']:.2f}× ({r['from_jpeg']['backend']}: {rate(r['from_jpeg']['images_per_s'])}"
            f" vs {rate(r['from_jpeg']['synthetic_images_per_s'])} img/s; {mark(r['from_jpeg']['ratio'] >= TARGETS['from_jpeg'])})"
            for name, r in models.items() if "from_jpeg" in r]
    projection = [f"{name} {r['projection']['fraction']:.2%} ({r['projection']['projection_s'] * 1e3:.0f} ms per"
                  f" {r['projection']['project_every']} steps; {mark(r['projection']['fraction'] <= TARGETS['projection'])})"
                  for name, r in models.items() if "projection" in r]
    return [f"Target, auto ≥ {TARGETS['model']:g}× dense whole-model: " + ("; ".join(auto) or "no data"),
            f"Target, every layer under the auto plan ≥ 1.0× its dense twin (±3%), fwd+bwd: " + ("; ".join(layers) or "no data"),
            f"Target, VGG-16 at the authors' ranks compiled ≥ {TARGETS['vgg16_compiled']:g}× dense: " + ("; ".join(vgg) or "no data"),
            f"Target, from JPEGs ≥ {TARGETS['from_jpeg']:g}× the synthetic rate: " + ("; ".join(jpeg) or "no data"),
            f"Target, a projection ≤ {TARGETS['projection']:.0%} of the step time at the default interval: "
            + ("; ".join(projection) or "no data")]


if __name__ == "__main__":
    sys.exit(main())
