"""Inference speed of a low-rank model against its dense twin, on the runtimes people deploy with:
torch eager and onnxruntime's CPU provider; on a GPU also onnxruntime's CUDA and TensorRT providers.

    python -m lowrank_dist.speed.inference --model vgg16 --preset tai2016
    python -m lowrank_dist.speed.inference --model googlenet --speedup 2 --batch 8 --device cuda

What is timed is the deployed model (deploy.forms.inference_model): BatchNorm folded, dropout and
auxiliary heads gone, each factorized layer in an inference form — its two thin convs
("factorized"), the same with the rank zero-padded per group to a multiple of 16 channels
("padded", where that changes anything: CPU kernels work in channel blocks), or one conv of its
composed kernel computed once ("composed"). The composed form is a dense conv of the layer's own
shape, so it costs what the dense twin's layer costs: each layer is timed dense, factorized and
(where it applies) padded, and the dense time is the composed form's. The dense model is deployed
the same way (BatchNorm folded), so the two differ only in the factorized layers.

**The inference plan.** For each runtime and batch, each factorized layer takes the form measured
fastest there (forward only, at the input shape it has in the model); a layer with BatchNorm
between V and H has no composed form. `python -m lowrank_dist.export` writes its model under the
same rule (`plan_inference`). No layer of the plan is slower than its dense twin by more than the
measurement's noise: where factorizing does not pay, the layer runs composed.

Two batches: 1, the latency (p50 and p90 of the timed samples, ms), and a throughput batch
(images/s from the median). Per layer: dense, factorized, the plan's form and its speedup; whole
model: dense against low-rank under the plan. On onnxruntime the whole models are the ONNX files
the export writes (deploy.runtimes); a layer alone is a small ONNX graph of just its convs. Timing
is speed.timing's harness (warm-up, the compared functions alternated, medians); whole models are
timed one call per sample, layers at least `min_sample_s` per sample. On a GPU onnxruntime gets
its input on the device (I/O binding), as torch does. Layers are named as in the paper
(models.layer_names), with the module path beside the name in the CSV and JSON.

Writes inference.md, .csv, .json and .png into --out and prints the table. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..deploy.fold import fold_batchnorm
from ..deploy.forms import ALIGN, can_compose, can_pad, inference_form, inference_model, lowrank_layers
from ..deploy.runtimes import PROVIDERS, conv_graph, export_onnx, ort_session, runtime_status
from ..lowrank.layers import LowRankConv2d
from ..models import layer_names
from ..runtime import select_device
from .costs import conv_costs
from .timing import Timing, capture_inputs, device_description, measure

MODES = ("auto", "factorized", "padded", "composed")


def percentile(timing: Timing, q: float) -> float:
    """The q-th percentile (0..100) of a timing's samples, linearly interpolated."""
    return float(np.percentile(timing.samples, q))


# ----------------------------------------------------------------------------------------------
# Running one module on one runtime


def _ort_call(session, images: np.ndarray, runtime: str) -> Callable[[], object]:
    """One inference of `session` on `images`: from host memory on the CPU provider, from memory
    already on the device (I/O binding, output left there) on the GPU providers."""
    name = session.get_inputs()[0].name
    if runtime == "ort-cpu":
        return lambda: session.run(None, {name: images})
    import onnxruntime

    binding = session.io_binding()
    binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
    binding.bind_output(session.get_outputs()[0].name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def _torch_call(module: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return module(images)

    return run


def layer_call(module: nn.Module, shape: tuple[int, ...], runtime: str, device: torch.device) -> Callable[[], object]:
    """A forward of one layer's inference module on a random input of `shape`, on `runtime`."""
    images = torch.randn(shape)
    if runtime == "torch":
        return _torch_call(module.to(device).eval(), images.to(device))
    return _ort_call(ort_session(conv_graph(module, shape), runtime), images.numpy(), runtime)


def model_call(model: nn.Module, shape: tuple[int, ...], runtime: str, device: torch.device,
               folder: Path, tag: str) -> Callable[[], object]:
    """A forward of a whole inference model on a random batch: eager, or its ONNX file (written
    into `folder` as `tag`.onnx at this batch) in onnxruntime."""
    images = torch.randn(shape)
    if runtime == "torch":
        return _torch_call(model.to(device).eval(), images.to(device))
    path = folder / f"{tag}.onnx"
    if not path.exists():
        export_onnx(model.cpu(), path, images)
    return _ort_call(ort_session(path, runtime), images.numpy(), runtime)


# ----------------------------------------------------------------------------------------------
# Layers and the plan


def dense_twin(layer: LowRankConv2d) -> nn.Conv2d:
    """A dense conv of the layer's shape (fresh weights: time does not depend on their values)."""
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                     bias=layer.horizontal.bias is not None)


def factorized_module(layer: LowRankConv2d) -> nn.Module:
    """The factorized inference form as it runs deployed: eval mode, BatchNorm between V and H folded."""
    form = inference_form(layer, "factorized").eval()
    fold_batchnorm(form)
    return form


def layer_inputs(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """(C, H, W) of the input of every LowRankConv2d on the inference path (eval-mode forward)."""
    probe = copy.deepcopy(model).cpu()
    found = capture_inputs(probe, torch.randn(1, *image_shape), training=False)
    return {path: found[path].shape[1:] for path, _ in lowrank_layers(probe) if path in found}


@dataclass
class PlannedLayer:
    module: str  # module path (features.2): what the plan addresses
    layer: str  # the paper's name (conv1_2)
    form: str  # "factorized" | "padded" | "composed" (deploy.forms.FORMS)
    reason: str
    input_shape: tuple[int, ...] | None = None  # B × C × H × W it was timed at
    dense: Timing | None = None  # a dense conv of its shape: the composed form's time
    factorized: Timing | None = None
    padded: Timing | None = None  # None: not timed, the rank per group needs no padding

    @property
    def planned(self) -> Timing | None:
        return {"composed": self.dense, "padded": self.padded}.get(self.form, self.factorized)

    @property
    def speedup(self) -> float | None:
        """dense time / the plan's form's time."""
        if self.dense is None or self.planned is None:
            return None
        return self.dense.median / self.planned.median

    def as_dict(self) -> dict:
        row = {key: value for key, value in asdict(self).items() if key not in ("dense", "factorized", "padded")}
        for key in ("dense", "factorized", "padded"):
            timing = getattr(self, key)
            row[f"{key}_ms"] = None if timing is None else timing.median * 1e3
            row[f"{key}_p90_ms"] = None if timing is None else percentile(timing, 90) * 1e3
        return row | {"speedup": self.speedup}


@dataclass
class InferencePlan:
    """Each factorized layer's inference form for one runtime and batch, and why."""

    runtime: str
    batch: int
    mode: str  # what was asked: auto (timed), factorized or composed
    layers: list[PlannedLayer] = field(default_factory=list)
    note: str = ""

    @property
    def forms(self) -> dict[str, str]:
        return {layer.module: layer.form for layer in self.layers}

    def summary(self) -> str:
        composed = sum(layer.form == "composed" for layer in self.layers)
        how = "timed" if self.mode == "auto" else f"--execution {self.mode}"
        return (f"inference plan for {self.runtime} at batch {self.batch} ({how}): {composed} of {len(self.layers)}"
                f" factorized layers run composed{'; ' + self.note if self.note else ''}")

    def to_markdown(self) -> str:
        lines = [f"### {self.summary()}", "",
                 "Forward ms per batch, median of alternated samples; *dense*: a dense conv of the layer's shape,"
                 f" which is what the composed form costs; *padded*: factorized, the rank per group padded to a"
                 f" multiple of {ALIGN}.", "",
                 "| layer | module | input | dense ms | factorized ms | padded ms | runs | × dense | why |",
                 "|---|---|---|---:|---:|---:|---|---:|---|"]
        for layer in self.layers:
            times = [f"{t.median * 1e3:.3g}" if t is not None else "—"
                     for t in (layer.dense, layer.factorized, layer.padded)]
            shape = "×".join(map(str, layer.input_shape)) if layer.input_shape else "—"
            speedup = f"{layer.speedup:.2f}×" if layer.speedup is not None else "—"
            lines.append(f"| {layer.layer} | {layer.module} | {shape} | {' | '.join(times)} | {layer.form}"
                         f" | {speedup} | {layer.reason} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"runtime": self.runtime, "batch": self.batch, "mode": self.mode, "note": self.note,
                "forms": self.forms, "layers": [layer.as_dict() for layer in self.layers]}


def _choose(timings: dict[str, Timing], composable: bool) -> tuple[str, str]:
    """The fastest form of those timed ("dense" standing for composed), and why."""
    medians = {("composed" if key == "dense" else key): t.median for key, t in timings.items()}
    if not composable:
        medians.pop("composed")
    fastest = min(medians, key=medians.get)
    others = [f"{medians[form] / medians[fastest]:.2f}× {form}" for form in medians if form != fastest]
    note = "" if composable else "; BatchNorm between V and H: no composed form"
    return fastest, f"fastest{' (' + ', '.join(others) + ')' if others else ''}{note}"


def time_layers(model: nn.Module, image_shape: tuple[int, int, int], batch: int, runtime: str,
                device: torch.device, repeats: int = 10, warmup: int = 3, min_sample_s: float = 1e-3,
                inputs: dict[str, tuple[int, ...]] | None = None) -> list[PlannedLayer]:
    """Every factorized layer on the inference path timed dense, factorized and, where its rank
    needs padding, padded (alternated) on `runtime` at `batch`, with the plan's choice: the fastest
    form (the composed form's time being the dense one's). `inputs`: `layer_inputs(model,
    image_shape)`, if the caller has it."""
    names, inputs = layer_names(model), inputs or layer_inputs(model, image_shape)
    rows = []
    for path, layer in lowrank_layers(model):
        if path not in inputs:
            continue  # not on the inference path (an auxiliary head's)
        shape = (batch, *inputs[path])
        fns = {"dense": layer_call(dense_twin(layer), shape, runtime, device),
               "factorized": layer_call(factorized_module(layer), shape, runtime, device)}
        if can_pad(layer):
            fns["padded"] = layer_call(inference_form(layer, "padded"), shape, runtime, device)
        timings = measure(fns, device if runtime == "torch" else "cpu", repeats=repeats, warmup=warmup,
                          min_sample_s=min_sample_s)
        form, reason = _choose(timings, can_compose(layer))
        rows.append(PlannedLayer(path, names[path], form, reason, shape, timings["dense"], timings["factorized"],
                                 timings.get("padded")))
    return rows


def plan_inference(model: nn.Module, image_shape: tuple[int, int, int], batch: int, runtime: str,
                   mode: str = "auto", device: torch.device | str = "cpu", **timing) -> InferencePlan:
    """The inference plan of `model` for `runtime` at `batch`. "auto" times each layer there (the
    runtime must be able to run here: `runtime_status`); "factorized", "padded" or "composed" sets
    every layer so without timing (a layer with BatchNorm between V and H is never composed)."""
    if mode not in MODES:
        raise ValueError(f"execution must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        names = layer_names(model)
        layers = []
        for path, layer in lowrank_layers(model):
            form = mode if mode != "composed" or can_compose(layer) else "factorized"
            reason = f"--execution {mode}" if form == mode else "BatchNorm between V and H: no composed form"
            layers.append(PlannedLayer(path, names[path], form, reason))
        return InferencePlan(runtime, batch, mode, layers)
    reason = runtime_status(torch.device(device).type).get(runtime, f"unknown runtime {runtime!r}")
    if reason is not None:
        raise ValueError(f"cannot time {runtime} here ({reason}): give --execution factorized, padded or composed")
    try:
        layers = time_layers(model, image_shape, batch, runtime, torch.device(device), **timing)
    except RuntimeError as error:  # a provider that is listed but cannot start
        raise ValueError(f"cannot time {runtime} here ({str(error).splitlines()[0]}): give --execution"
                         " factorized, padded or composed") from None
    return InferencePlan(runtime, batch, mode, layers)


# ----------------------------------------------------------------------------------------------
# The report


@dataclass
class ModelTimes:
    dense: Timing
    lowrank: Timing  # under the plan

    @property
    def speedup(self) -> float:
        return self.dense.median / self.lowrank.median


@dataclass
class RuntimeResult:
    """One runtime at one batch: the plan (with its per-layer times) and the whole models."""

    runtime: str
    batch: int
    plan: InferencePlan
    model: ModelTimes | None


@dataclass
class InferenceReport:
    title: str
    meta: dict
    costs: dict  # module path → LayerCost of each factorized layer
    results: list[RuntimeResult]
    skipped: dict[str, str]  # runtime → why it was not timed
    files: dict[str, Path] = field(default_factory=dict)

    def result(self, runtime: str, batch: int) -> RuntimeResult | None:
        return next((r for r in self.results if r.runtime == runtime and r.batch == batch), None)

    def to_markdown(self) -> str:
        return markdown(self)

    def as_dict(self) -> dict:
        def timing(t: Timing) -> dict:
            return t.as_dict() | {"p50_s": percentile(t, 50), "p90_s": percentile(t, 90)}

        results = []
        for r in self.results:
            model = None if r.model is None else {
                "dense": timing(r.model.dense), "lowrank": timing(r.model.lowrank), "speedup": r.model.speedup,
                "dense_images_per_s": r.batch / r.model.dense.median,
                "lowrank_images_per_s": r.batch / r.model.lowrank.median}
            results.append({"runtime": r.runtime, "batch": r.batch, "plan": r.plan.as_dict(), "model": model})
        costs = {path: asdict(cost) | {"theoretical_speedup": cost.speedup} for path, cost in self.costs.items()}
        return {"title": self.title, "meta": self.meta, "costs": costs, "results": results, "skipped": self.skipped}

    def write(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.files = {kind: out_dir / f"inference.{kind}" for kind in ("md", "csv", "json", "png")}
        self.files["md"].write_text(self.to_markdown() + "\n")
        rows = csv_rows(self)
        with open(self.files["csv"], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
        self.files["json"].write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        chart(self, self.files["png"])
        return self.files


def inference_report(
    dense: nn.Module, lowrank: nn.Module, image_shape: tuple[int, int, int], batches: tuple[int, ...] = (1, 8),
    runtimes: tuple[str, ...] = ("torch", "ort-cpu"), device: torch.device | str = "cpu", repeats: int = 10,
    warmup: int = 3, title: str | None = None, whole_model: bool = True, workdir: Path | None = None,
) -> InferenceReport:
    """Time `lowrank` against `dense` (its dense twin, same architecture) for inference on each of
    `runtimes` that can run here (the others are listed with the reason), at each of `batches`:
    per factorized layer, and the whole models deployed — `dense` with BatchNorm folded, `lowrank`
    under the plan of that runtime and batch."""
    device = select_device(device, key="--device")
    status = runtime_status(device.type)
    unknown = sorted(set(runtimes) - set(status))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; known: {', '.join(status)}")
    skipped = {name: status[name] for name in runtimes if status[name] is not None}
    deployed_dense = inference_model(dense)
    inputs = layer_inputs(lowrank, image_shape)
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        for runtime in (name for name in runtimes if name not in skipped):
            try:
                for batch in batches:
                    results.append(_runtime_result(deployed_dense, lowrank, image_shape, batch, runtime, device,
                                                   inputs, Path(folder), repeats, warmup, whole_model))
            except RuntimeError as error:  # a GPU provider that is listed but cannot start (no TensorRT libraries)
                if runtime in ("torch", "ort-cpu"):
                    raise
                results = [r for r in results if r.runtime != runtime]
                skipped[runtime] = str(error).splitlines()[0]
    costs = {row.module: row for row in conv_costs(copy.deepcopy(lowrank).cpu(), image_shape) if row.rank is not None}
    meta = _meta(device, image_shape, batches, repeats, warmup)
    return InferenceReport(title or type(lowrank).__name__, meta, costs, results, skipped)


def _runtime_result(deployed_dense: nn.Module, lowrank: nn.Module, image_shape, batch: int, runtime: str,
                    device: torch.device, inputs, folder: Path, repeats: int, warmup: int, whole_model: bool
                    ) -> RuntimeResult:
    """One runtime at one batch: every layer timed and planned, then the whole models alternated."""
    layers = time_layers(lowrank, image_shape, batch, runtime, device, repeats, warmup, inputs=inputs)
    plan = InferencePlan(runtime, batch, "auto", layers)
    model = None
    if whole_model:
        shape = (batch, *image_shape)
        fns = {"dense": model_call(deployed_dense, shape, runtime, device, folder, f"dense-b{batch}"),
               "lowrank": model_call(inference_model(lowrank, plan.forms), shape, runtime, device, folder,
                                     f"{runtime}-b{batch}")}
        timings = measure(fns, device if runtime == "torch" else "cpu", repeats=repeats, warmup=warmup, min_sample_s=0.0)
        model = ModelTimes(timings["dense"], timings["lowrank"])
    return RuntimeResult(runtime, batch, plan, model)


def _meta(device: torch.device, image_shape, batches, repeats: int, warmup: int) -> dict:
    versions = {"torch": torch.__version__}
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return {"device": str(device), "device_name": device_description(device), "threads": torch.get_num_threads(),
            "input_shape": list(image_shape), "batches": list(batches), "repeats": repeats, "warmup": warmup,
            "dtype": "fp32", **versions, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------
# Rendering


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _latency(t: Timing) -> str:
    return f"{_ms(percentile(t, 50))} / {_ms(percentile(t, 90))}"


def markdown(report: InferenceReport) -> str:
    meta = report.meta
    size = "×".join(map(str, meta["input_shape"]))
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "onnxruntime") if k in meta)
    lines = [f"### {report.title}: inference on {meta['device_name']} ({meta['dtype']}, {size}, {versions})", "",
             f"Median of {meta['repeats']} samples after {meta['warmup']} warm-up calls, dense and low-rank alternated."
             " Latency: p50 / p90 ms at batch 1; throughput: images/s at the larger batch. *plan*: each factorized"
             " layer in its fastest form on that runtime and batch (padded: factorized with the rank padded per"
             f" group to a multiple of {ALIGN}; composed: one conv of the composed kernel, the dense layer's cost)."
             " BatchNorm folded in both models.", ""]
    lines += _model_table(report) + [""]
    for r in report.results:
        lines += [f"#### {r.runtime}, batch {r.batch}: per layer (ms per batch, p50 / p90)", "",
                  "| layer | rank | input | theory | dense | factorized | padded | plan | plan × |",
                  "|---|---:|---|---:|---:|---:|---:|---|---:|"]
        for layer in r.plan.layers:
            cost = report.costs.get(layer.module)
            theory = f"{cost.speedup:.2f}×" if cost else "—"
            rank = cost.rank if cost else "—"
            shape = "×".join(map(str, layer.input_shape[1:]))
            padded = _latency(layer.padded) if layer.padded is not None else "—"
            lines.append(f"| {layer.layer} | {rank} | {shape} | {theory} | {_latency(layer.dense)}"
                         f" | {_latency(layer.factorized)} | {padded} | {layer.form} | {layer.speedup:.2f}× |")
        lines.append("")
    for runtime, reason in report.skipped.items():
        lines.append(f"- {runtime} not timed: {reason}")
    return "\n".join(lines).rstrip()


def _model_table(report: InferenceReport) -> list[str]:
    """The whole-model table: one row per runtime, latency at batch 1, throughput at the others."""
    batches = report.meta["batches"]
    head = "| runtime |" + "".join(
        " batch 1 p50 / p90 ms dense | low-rank | × |" if b == 1 else f" batch {b} images/s dense | low-rank | × |"
        for b in batches)
    lines = [head, "|---|" + "---:|---:|---:|" * len(batches)]
    for runtime in dict.fromkeys(r.runtime for r in report.results):
        cells = []
        for batch in batches:
            r = report.result(runtime, batch)
            if r is None or r.model is None:
                cells.append(" — | — | — |")
            elif batch == 1:
                cells.append(f" {_latency(r.model.dense)} | {_latency(r.model.lowrank)} | {r.model.speedup:.2f}× |")
            else:
                rate = [batch / t.median for t in (r.model.dense, r.model.lowrank)]
                cells.append(f" {rate[0]:,.1f} | {rate[1]:,.1f} | {r.model.speedup:.2f}× |")
        lines.append(f"| {runtime} |" + "".join(cells))
    return lines


def csv_rows(report: InferenceReport) -> list[dict]:
    """One row per (runtime, batch, layer), and one per (runtime, batch) for the whole model."""
    rows = []
    for r in report.results:
        for layer in r.plan.layers:
            cost = report.costs.get(layer.module)
            rows.append({"runtime": r.runtime, "batch": r.batch, "layer": layer.layer, "module": layer.module,
                         "rank": cost.rank if cost else "", "theoretical_speedup": cost.speedup if cost else "",
                         "dense_p50_ms": percentile(layer.dense, 50) * 1e3, "dense_p90_ms": percentile(layer.dense, 90) * 1e3,
                         "lowrank_p50_ms": percentile(layer.planned, 50) * 1e3,
                         "lowrank_p90_ms": percentile(layer.planned, 90) * 1e3,
                         "factorized_p50_ms": percentile(layer.factorized, 50) * 1e3,
                         "padded_p50_ms": percentile(layer.padded, 50) * 1e3 if layer.padded is not None else "",
                         "form": layer.form,
                         "speedup": layer.speedup, "images_per_s_dense": r.batch / layer.dense.median,
                         "images_per_s_lowrank": r.batch / layer.planned.median})
        if r.model is not None:
            m = r.model
            rows.append({"runtime": r.runtime, "batch": r.batch, "layer": "whole model", "module": "",
                         "rank": "", "theoretical_speedup": "",
                         "dense_p50_ms": percentile(m.dense, 50) * 1e3, "dense_p90_ms": percentile(m.dense, 90) * 1e3,
                         "lowrank_p50_ms": percentile(m.lowrank, 50) * 1e3,
                         "lowrank_p90_ms": percentile(m.lowrank, 90) * 1e3, "factorized_p50_ms": "", "padded_p50_ms": "",
                         "form": "plan", "speedup": m.speedup, "images_per_s_dense": r.batch / m.dense.median,
                         "images_per_s_lowrank": r.batch / m.lowrank.median})
    return rows


def chart(report: InferenceReport, path: Path) -> None:
    """Per factorized layer, the plan's speedup over dense on each runtime and batch, beside the
    theoretical (MAC) one; the break-even line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(report.costs)
    names = {layer.module: layer.layer for r in report.results for layer in r.plan.layers}
    series = [("theoretical (MACs)", [report.costs[m].speedup for m in modules])]
    for r in report.results:
        speedups = {layer.module: layer.speedup for layer in r.plan.layers}
        series.append((f"{r.runtime}, batch {r.batch}", [speedups.get(m, float("nan")) for m in modules]))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(modules) * len(series) / 2 + 2.0), 4.5), layout="constrained")
    for index, (label, values) in enumerate(series):
        axes.bar([p + (index - (len(series) - 1) / 2) * width for p in range(len(modules))], values, width, label=label)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(range(len(modules))), [names.get(m, m) for m in modules], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("speedup (dense time / low-rank time)")
    axes.set_title(f"{report.title}: inference, plan's form per layer", fontsize=9)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from ..models import MODELS

    parser = _Parser(prog="python -m lowrank_dist.speed.inference", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="a model by name")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--preset", help="a named rank preset, e.g. tai2016")
    policy.add_argument("--speedup", type=float, help="per-layer theoretical speedup target")
    parser.add_argument("--batch-norm", action="store_true", help="the BN variant")
    parser.add_argument("--image-size", type=int, help="default: the model's (224, CaffeNet 227)")
    parser.add_argument("--batch", type=int, default=8, help="the throughput batch (latency is always batch 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: torch on the GPU and onnxruntime's CUDA and TensorRT providers")
    parser.add_argument("--runtimes", help=f"comma-separated, of {', '.join(PROVIDERS)} and torch;"
                                           " default: torch and every onnxruntime provider of the device")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring")
    parser.add_argument("--layers-only", action="store_true", help="skip the whole models")
    parser.add_argument("--out", type=Path, help="output folder (default runs/speed/<model>-inference-<device>)")
    return parser


def run(args) -> int:
    from ..models import build_model, model_spec
    from .costs import default_lowrank

    spec = model_spec(args.model)
    size = args.image_size or spec.input_size[1]
    for flag, value in (("--image-size", size), ("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    lowrank = {k: getattr(args, k) for k in ("preset", "speedup") if getattr(args, k) is not None}
    build = {"name": args.model, "lowrank": lowrank or default_lowrank(args.model)}
    if args.batch_norm:
        build["batch_norm"] = True
    runtimes = tuple(args.runtimes.split(",")) if args.runtimes else (
        ("torch", "ort-cpu") + (("ort-cuda", "ort-tensorrt") if args.device == "cuda" else ()))
    torch.manual_seed(0)
    model, dense = build_model(build), build_model(build, dense=True)
    policy = ", ".join(f"{k}={v}" for k, v in build["lowrank"].items())
    batches = (1, args.batch) if args.batch > 1 else (1,)
    report = inference_report(dense, model, (spec.input_size[0], size, size), batches, runtimes, args.device,
                              args.repeats, args.warmup, f"{spec.name}, low-rank ({policy})", not args.layers_only)
    out = args.out or Path("runs/speed") / f"{spec.name}-inference-{args.device}"
    report.write(out)
    print(report.to_markdown())
    print(f"\nwrote {', '.join(str(p) for p in report.files.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
