"""Execution plans: each factorized layer runs as two thin convs or as one dense conv of its
composed kernel, whichever is measured faster here — same parameters, same function.

A LowRankConv2d computes y = conv(x, Ŵ) + b with Ŵ[n,c,i,j] = Σ_k H[n,k,0,j]·V[k,c,i,0] (per group).
Run "factorized" it costs K·(C·kh + N·kw) MACs per output pixel but writes and reads back a
K-channel intermediate; run "composed" it costs the dense N·C·kh·kw per pixel plus N·C·kh·kw·K
once per call to build Ŵ, which at training batch sizes is a few percent of the conv. Where memory,
not arithmetic, bounds a layer (large maps, few channels), or where a 1×k kernel has no fast
implementation, composed can win although it does more MACs. Which one wins depends on the
device, dtype, memory format, batch and image size, so `plan_execution` times both, per layer,
forward+backward (the plan is for training), with the project's harness (speed.timing: warm-up,
alternation, median of repeats), and picks the faster.

    plan = plan_execution(model, (256, 3, 224, 224), "auto", "cuda", torch.bfloat16, channels_last=True,
                          cache=Path("runs/execution_cache.json"))
    plan.apply(model)          # sets LowRankConv2d.execution layer by layer
    print(plan.to_markdown())

The cache holds one decision per layer, keyed by everything its timing depends on: the device's
name (on the CPU with its core and thread counts), torch and cuDNN versions, cudnn.benchmark,
dtype, memory format, the layer's geometry and rank, and its input shape (batch and image size).
A later plan with the same key reuses the decision without timing; change any of them and that
layer is timed again. The plan never touches parameters: a state dict loads under any plan.

A layer with BatchNorm between V and H has no composed form (in training BN normalises the
intermediate by its batch statistics): "auto" keeps it factorized, "composed" refuses the model.
"""

from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..files import write_text_atomic
from ..lowrank.layers import LowRankConv2d
from ..models import layer_names
from ..runtime import check_dtype, dtype_name, select_device
from .timing import LayerInput, capture_inputs, device_description, layer_functions, measure

EXECUTIONS = ("auto", "factorized", "composed")
# precision.execution when the config leaves it out. On a GPU: auto. On the CPU: factorized —
# measured (bench/execution_cpu.py, VGG-16 at the authors' ranks, fp32, batch 8, 112×112, 2 shared
# cores): CPUs are bound by arithmetic, and composed forward+backward was 1.4–5.5× slower than
# factorized on 12 of the 13 layers; only conv1_1 (3 input channels, rank 5) was faster composed.
# Timing all 13 layers took 46 s there, to gain one small layer.
CPU_DEFAULT = "factorized"
CACHE_VERSION = 1


def default_execution(device: torch.device) -> str:
    return "auto" if torch.device(device).type == "cuda" else CPU_DEFAULT


def lowrank_layers(model: nn.Module) -> list[tuple[str, LowRankConv2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LowRankConv2d)]


def set_execution(model: nn.Module, executions: str | Mapping[str, str]) -> None:
    """Every LowRankConv2d of `model` to `executions` ("factorized" | "composed"), or layer by layer
    from a mapping name → execution (layers not named keep theirs). ValueError for a layer that
    cannot take it (composed with BatchNorm between), naming the layer."""
    for name, layer in lowrank_layers(model):
        wanted = executions if isinstance(executions, str) else executions.get(name)
        if wanted is None:
            continue
        try:
            layer.execution = wanted
        except ValueError as error:
            raise ValueError(f"layer {name}: {error}") from None


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass
class LayerPlan:
    module: str  # the module path (features.2): what set_execution addresses
    layer: str  # the paper's name (conv1_2; models/layer_names.py): what the printed plan shows
    execution: str  # "factorized" | "composed"
    reason: str
    input_shape: tuple[int, ...] | None = None
    factorized_s: float | None = None  # forward+backward seconds per batch, when timed (or cached)
    composed_s: float | None = None
    cached: bool = False  # the times come from the plan cache, not from this run

    @property
    def speedup(self) -> float | None:
        """factorized time / chosen time (≥ 1 by construction when timed)."""
        if self.factorized_s is None or self.composed_s is None:
            return None
        return self.factorized_s / (self.composed_s if self.execution == "composed" else self.factorized_s)


@dataclass
class ExecutionPlan:
    mode: str  # what was asked: auto, factorized or composed
    meta: dict  # device, dtype, memory format, input shape, versions, cache, date
    layers: list[LayerPlan] = field(default_factory=list)

    @property
    def executions(self) -> dict[str, str]:
        return {layer.module: layer.execution for layer in self.layers}

    def apply(self, model: nn.Module) -> None:
        missing = sorted(set(self.executions) - {name for name, _ in lowrank_layers(model)})
        if missing:
            raise ValueError(f"the plan names layers the model does not factorize: {', '.join(missing)}")
        set_execution(model, self.executions)

    def counts(self) -> dict[str, int]:
        return {kind: sum(layer.execution == kind for layer in self.layers) for kind in ("factorized", "composed")}

    def summary(self) -> str:
        meta, counts = self.meta, self.counts()
        timed = sum(layer.factorized_s is not None and not layer.cached for layer in self.layers)
        cached = sum(layer.cached for layer in self.layers)
        how = "" if self.mode != "auto" else (
            f": {timed} layers timed ({meta.get('timing_s', 0.0):.1f} s), "
            + (f"{cached} from the cache {meta['cache']}" if meta.get("cache") else "no cache")
        )
        how += f"; {meta['note']}" if meta.get("note") else ""
        return (f"execution plan ({self.mode}{how}): {counts['composed']} of {len(self.layers)} factorized layers"
                f" run composed, {counts['factorized']} factorized")

    def to_markdown(self) -> str:
        meta = self.meta
        shape = "×".join(map(str, meta["input_shape"]))
        lines = [
            f"### {self.summary()}",
            "",
            f"On {meta['device_name']} ({meta['dtype']}{', channels_last' if meta['channels_last'] else ''}, input {shape},"
            f" torch {meta['torch']}{', cuDNN ' + str(meta['cudnn']) if meta['cudnn'] else ''}); forward+backward"
            " ms per batch, median of alternated samples.",
            "",
            "| layer | input | factorized ms | composed ms | runs | why |",
            "|---|---|---:|---:|---|---|",
        ]
        for layer in self.layers:
            times = [f"{s * 1e3:.3g}" if s is not None else "—" for s in (layer.factorized_s, layer.composed_s)]
            given = "×".join(map(str, layer.input_shape)) if layer.input_shape else "—"
            lines.append(f"| {layer.layer} | {given} | {times[0]} | {times[1]} | {layer.execution} | {layer.reason} |")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "meta": self.meta,
                "layers": [asdict(layer) | {"speedup": layer.speedup} for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ExecutionPlan":
        fields = LayerPlan.__dataclass_fields__
        layers = [LayerPlan(**{k: v for k, v in layer.items() if k in fields}) for layer in data["layers"]]
        for layer in layers:
            layer.input_shape = tuple(layer.input_shape) if layer.input_shape is not None else None
        return cls(data["mode"], dict(data["meta"]), layers)

    def write(self, folder: Path) -> dict[str, Path]:
        """execution_plan.md and execution_plan.json in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {"md": folder / "execution_plan.md", "json": folder / "execution_plan.json"}
        files["md"].write_text(self.to_markdown() + "\n")
        files["json"].write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return files


# ----------------------------------------------------------------------------------------------
# The cache: one decision per layer and setting


def environment(device: torch.device, dtype: torch.dtype, channels_last: bool) -> dict:
    """Everything besides the layer and its input that a layer's timing depends on."""
    cuda = device.type == "cuda"
    return {
        "device": device_description(device),  # the card's name; on the CPU also cores and threads
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,
        "dtype": dtype_name(dtype),
        "channels_last": bool(channels_last),
    }


def layer_key(layer: LowRankConv2d, given: LayerInput, env: Mapping) -> str:
    geometry = {
        "in": layer.in_channels, "out": layer.out_channels, "kernel": list(layer.kernel_size), "rank": layer.rank,
        "stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation),
        "groups": layer.groups, "bias": layer.horizontal.bias is not None,
    }
    return json.dumps({**env, "layer": geometry, "input": list(given.shape), "input_grad": given.requires_grad},
                      sort_keys=True)


def read_cache(path: Path | None, warn: bool = True) -> dict[str, dict]:
    """The cached decisions, or none (with a warning) if the file is unreadable, damaged or of another
    version; entries that are not two positive times are timed again (`_usable`)."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("layers"), dict):
            raise ValueError(f"not a version-{CACHE_VERSION} plan cache")
        return data["layers"]
    except RecursionError:  # brackets nested deeper than the parser goes: no cache of ours
        error = ValueError("nested too deeply to be a plan cache")
    except (OSError, ValueError) as caught:  # UnicodeDecodeError and json's errors are ValueErrors
        error = caught
    if warn:
        print(f"warning: ignoring the execution plan cache {path} ({error}); timing every layer", file=sys.stderr)
    return {}


def write_cache(path: Path, entries: Mapping[str, dict]) -> None:
    """Merge `entries` into the cache file, atomically (a reader never sees half a file; a run
    writing at the same time loses at most its own new entries, which are timed again next time)."""
    merged = {**read_cache(path, warn=False), **entries}  # read_cache warned once already
    write_text_atomic(path, json.dumps({"version": CACHE_VERSION, "layers": merged}, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# Planning


def _usable(entry) -> bool:
    """A cache entry with two positive times and a date, if any, that is text (anything else, e.g.
    edited by hand, is timed again)."""
    return isinstance(entry, dict) and isinstance(entry.get("date", ""), str) and all(
        isinstance(entry.get(key), (int, float)) and not isinstance(entry[key], bool) and entry[key] > 0
        for key in ("factorized_s", "composed_s")
    )


def _time_layer(layer: LowRankConv2d, given: LayerInput, device, dtype, channels_last, **timing) -> dict[str, float]:
    """Forward+backward seconds of the layer as factorized and as composed, alternated."""
    fns = {}
    for execution in ("factorized", "composed"):
        twin = copy.deepcopy(layer)
        twin.execution = execution
        fns[execution] = layer_functions(twin, given, device, dtype, channels_last)[1]
    timings = measure(fns, device, **timing)
    return {f"{execution}_s": timings[execution].median for execution in fns}


def plan_execution(
    model: nn.Module,
    input_shape: tuple[int, int, int, int],
    execution: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    cache: Path | None = None,
    repeats: int = 10,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
) -> ExecutionPlan:
    """The plan for every LowRankConv2d of `model` at `input_shape` = (B, C, H, W).

    "factorized" / "composed": every layer so (composed refused, naming the layer, where BatchNorm
    sits between V and H). "auto": each layer timed both ways at its true input shape (captured
    from one forward of a copy of the model), forward+backward in `dtype` and the memory format,
    on `device`; the faster runs. Decisions found in `cache` are reused; new ones are written to it.
    The model is not changed (call `plan.apply(model)`)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    check_dtype(dtype)
    device = select_device(device, key="device")
    env = environment(device, dtype, channels_last)
    meta = {
        "device": str(device), "device_name": env["device"], "dtype": env["dtype"], "channels_last": channels_last,
        "input_shape": [int(s) for s in input_shape], "torch": env["torch"], "cudnn": env["cudnn"],
        "cache": str(cache) if cache is not None and execution == "auto" else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    layers = lowrank_layers(model)
    names = layer_names(model)
    if execution != "auto":
        if execution == "composed":
            refused = [name for name, layer in layers if layer.between is not None]
            if refused:
                raise ValueError(f"'composed' is impossible for {', '.join(refused)}: BatchNorm sits between V and H"
                                 " (its batch statistics make the pair non-linear in training); use 'auto' or 'factorized'")
        reason = f"precision.execution: {execution}"
        return ExecutionPlan(execution, meta, [LayerPlan(name, names[name], execution, reason) for name, _ in layers])

    started = time.perf_counter()
    # shapes from a batch of 2 (BatchNorm in training needs more than one value per channel), on a
    # copy (the forward moves BatchNorm statistics); the batch dimension is the run's
    probe = copy.deepcopy(model).to(device)
    inputs = capture_inputs(probe, torch.randn((2, *input_shape[1:]), device=device))
    del probe
    known = read_cache(cache)
    new: dict[str, dict] = {}
    timing = {"repeats": repeats, "warmup": warmup, "min_sample_s": min_sample_s}
    plans = []
    for name, layer in layers:
        if layer.between is not None:
            plans.append(LayerPlan(name, names[name], "factorized", "BatchNorm between V and H: no composed form"))
            continue
        if name not in inputs:
            plans.append(LayerPlan(name, names[name], "factorized", "not on the forward path: not timed"))
            continue
        given = LayerInput((int(input_shape[0]), *inputs[name].shape[1:]), inputs[name].requires_grad)
        key = layer_key(layer, given, env)
        entry, cached = known.get(key), True
        if not _usable(entry):
            entry = _time_layer(layer, given, device, dtype, channels_last, **timing)
            new[key] = entry | {"date": meta["date"]}
            cached = False
        faster = "composed" if entry["composed_s"] < entry["factorized_s"] else "factorized"
        slower = "factorized" if faster == "composed" else "composed"
        reason = (f"{faster} faster ({entry[f'{slower}_s'] / entry[f'{faster}_s']:.2f}×)"
                  + (f", cached {entry.get('date', '')[:10]}" if cached else ""))
        plans.append(LayerPlan(name, names[name], faster, reason, given.shape, entry["factorized_s"], entry["composed_s"],
                               cached))
    meta["timing_s"] = time.perf_counter() - started
    if new and cache is not None:
        try:
            write_cache(cache, new)
        except OSError as error:
            print(f"warning: could not write the execution plan cache {cache} ({error})", file=sys.stderr)
    return ExecutionPlan(execution, meta, plans)
