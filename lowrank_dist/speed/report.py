"""Measured speed of a low-rank model beside its dense twin: per conv (and FC) layer and for the whole model.

The theoretical speedup of a layer is its MAC ratio (speed.costs.conv_costs); the measured one is
dense time / low-rank time for the same layer on the same input. They differ because FLOPs are not
time: a layer whose kernels wait on memory gains nothing from fewer MACs, and the factorized layer
writes and reads back its K-channel intermediate (docs/design.md#speed). The report puts the two side by side.

    report = speed_report(dense, lowrank, (64, 3, 224, 224), "cuda", torch.bfloat16, "runs/x/speed")
    print(report.to_markdown())

This module measures and holds the data (SpeedReport, LayerSpeed, ModelSpeed); render.py turns
that data into markdown, CSV, JSON, a chart and TensorBoard entries. The dependency runs one way:
report.py calls render.py (SpeedReport.to_markdown, write and log_tensorboard are its functions
offered as methods); render.py reads a report's fields and calls nothing here.

Layers are named as the paper names them (conv1_2, inception_3a/3x3: models/layer_names.py), with
the module path (features.2) kept beside the name in the CSV and JSON.

Each factorized layer is also timed composed (one dense conv of its composed kernel, the same
function and parameters; report/execution.py), and the report says which form the execution plan
runs: a run's plan, or by default the faster forward+backward measured here. The whole model is
timed dense, all-factorized and under that plan.

Where fc6 or fc7 is factorized (LowRankLinear, U·V), fc6 and fc7 have rows too, after the convs:
dense against factorized, with no composed form (the composed U·V is the dense layer).

Layers that the low-rank model keeps dense (1×1 convs, usually the first conv) are the same module
in both models, so they are timed once and their measured ratio is 1 by construction; they are in
the table so that the layer times add up to the whole network's conv time.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..lowrank.layers import LowRankConv2d, LowRankLinear
from ..models import conv_layers, fc_layers
from ..runtime import check_dtype, dtype_name, select_device
from . import render
from .costs import LayerCost, conv_costs, fc_costs
from .execution import set_execution
from .timing import (
    Timing, capture_inputs, device_description, layer_functions, measure, model_functions,
)


class DenseVsLowRank:
    """Timings of the same work, dense and low-rank, forward and train; speedup = dense / low-rank.
    "lowrank" is the factorized form; "planned" the execution plan's (report/execution.py): per
    layer factorized or composed, whichever the plan chose."""

    dense_forward: Timing
    lowrank_forward: Timing
    dense_train: Timing
    lowrank_train: Timing
    planned_forward: Timing
    planned_train: Timing

    @property
    def forward_speedup(self) -> float:
        return self.dense_forward.median / self.lowrank_forward.median

    @property
    def train_speedup(self) -> float:
        return self.dense_train.median / self.lowrank_train.median

    @property
    def planned_forward_speedup(self) -> float:
        return self.dense_forward.median / self.planned_forward.median

    @property
    def planned_train_speedup(self) -> float:
        return self.dense_train.median / self.planned_train.median

    def timings_dict(self) -> dict:
        return {
            "forward_speedup": self.forward_speedup,
            "train_speedup": self.train_speedup,
            "planned_forward_speedup": self.planned_forward_speedup,
            "planned_train_speedup": self.planned_train_speedup,
            "dense_forward": self.dense_forward.as_dict(),
            "lowrank_forward": self.lowrank_forward.as_dict(),
            "dense_train": self.dense_train.as_dict(),
            "lowrank_train": self.lowrank_train.as_dict(),
        }


@dataclass
class LayerSpeed(DenseVsLowRank):
    """One conv layer: its theoretical cost and its measured times (seconds per call, per batch):
    dense, factorized ("lowrank") and composed, and which of the low-rank forms the plan runs."""

    cost: LayerCost
    input_shape: tuple[int, ...]
    dense_forward: Timing
    lowrank_forward: Timing
    dense_train: Timing  # forward + backward
    lowrank_train: Timing
    composed_forward: Timing | None = None  # None: a layer kept dense, or BatchNorm between V and H
    composed_train: Timing | None = None
    execution: str = "dense"  # the plan's: "factorized" | "composed"; "dense" for a layer kept dense

    @property
    def module(self) -> str:
        return self.cost.module

    @property
    def layer(self) -> str:
        return self.cost.layer

    @property
    def theoretical(self) -> float:
        return self.cost.speedup

    @property
    def planned_forward(self) -> Timing:
        return self.composed_forward if self.execution == "composed" else self.lowrank_forward

    @property
    def planned_train(self) -> Timing:
        return self.composed_train if self.execution == "composed" else self.lowrank_train

    def as_dict(self) -> dict:
        composed = {key: getattr(self, key).as_dict() if getattr(self, key) is not None else None
                    for key in ("composed_forward", "composed_train")}
        return {"layer": self.layer} | asdict(self.cost) | {
            "input_shape": list(self.input_shape),
            "theoretical_speedup": self.theoretical,
            "execution": self.execution,
        } | self.timings_dict() | composed


@dataclass
class ModelSpeed(DenseVsLowRank):
    """Whole-model seconds per batch, inference forward and one training step: dense, every layer
    factorized ("lowrank"), and the execution plan ("planned")."""

    batch: int
    dense_forward: Timing
    lowrank_forward: Timing
    dense_train: Timing
    lowrank_train: Timing
    planned_forward: Timing
    planned_train: Timing

    def images_per_s(self, timing: Timing) -> float:
        return self.batch / timing.median

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "dense_forward_images_per_s": self.images_per_s(self.dense_forward),
            "lowrank_forward_images_per_s": self.images_per_s(self.lowrank_forward),
            "planned_forward_images_per_s": self.images_per_s(self.planned_forward),
            "dense_train_images_per_s": self.images_per_s(self.dense_train),
            "lowrank_train_images_per_s": self.images_per_s(self.lowrank_train),
            "planned_train_images_per_s": self.images_per_s(self.planned_train),
        } | self.timings_dict() | {"planned_forward": self.planned_forward.as_dict(),
                                   "planned_train": self.planned_train.as_dict()}


@dataclass
class SpeedReport:
    title: str
    meta: dict  # device, dtype, batch, input shape, repeats, versions, date
    rows: list[LayerSpeed]
    model: ModelSpeed | None
    files: dict[str, Path] = field(default_factory=dict)  # what `write` produced

    def to_markdown(self) -> str:
        return render.markdown(self)

    def as_dict(self) -> dict:
        return {
            "title": self.title,
            "meta": self.meta,
            "layers": [row.as_dict() for row in self.rows],
            "model": self.model.as_dict() if self.model else None,
        }

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """speed.md, speed.csv, speed.json and speed.png in `out_dir`."""
        self.files = render.write_files(self, Path(out_dir))
        return self.files

    def log_tensorboard(self, writer, step: int = 0, prefix: str = "speed") -> None:
        render.log_tensorboard(self, writer, step, prefix)


def _switched(model: nn.Module, executions, fn):
    def run():
        set_execution(model, executions)
        return fn()

    return run


def _layer_rows(dense: nn.Module, lowrank: nn.Module, example: torch.Tensor, device: torch.device,
                dtype: torch.dtype, channels_last: bool, plan: Mapping[str, str] | None, timing_options: dict) -> list[LayerSpeed]:
    """One LayerSpeed per conv of `lowrank` on the inference path: dense against its factorized
    and composed forms, alternated; the form the plan (or the faster forward+backward) picks."""
    costs = {row.module: row for row in conv_costs(lowrank, tuple(example.shape[1:])) + fc_costs(lowrank)}
    inputs = capture_inputs(lowrank, example)
    dense_layers = dict(dense.named_modules())
    rows = []
    fcs = fc_layers(lowrank)  # fc6/fc7 have rows where one of them is factorized (conv-only reports stay as they were)
    fcs = fcs if any(isinstance(layer, LowRankLinear) for _, layer in fcs) else []
    for name, layer in conv_layers(lowrank) + fcs:
        if name not in inputs or name not in costs:
            continue  # not on the inference path (GoogLeNet's auxiliary heads run in training only)
        reference = dense_layers.get(name)
        if not isinstance(reference, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"the dense model has no conv or FC layer named {name!r} to compare the low-rank layer with")
        dense_forward, dense_train = layer_functions(reference, inputs[name], device, dtype, channels_last)
        if costs[name].rank is None:  # the same dense layer in both models
            timings = measure({"forward": dense_forward, "train": dense_train}, device, **timing_options)
            rows.append(LayerSpeed(costs[name], inputs[name].shape, timings["forward"], timings["forward"],
                                   timings["train"], timings["train"]))
            continue
        forward = {"dense": dense_forward}
        train = {"dense": dense_train}
        forward["factorized"], train["factorized"] = layer_functions(layer, inputs[name], device, dtype, channels_last)
        if isinstance(layer, LowRankConv2d) and layer.between is None:  # an FC layer, or BN between V and H: no composed form
            composed = copy.deepcopy(layer)
            composed.execution = "composed"
            forward["composed"], train["composed"] = layer_functions(composed, inputs[name], device, dtype, channels_last)
        forward, train = measure(forward, device, **timing_options), measure(train, device, **timing_options)
        if plan is not None:
            execution = plan.get(name, "factorized")
            if execution == "composed" and "composed" not in train:
                raise ValueError(f"the plan composes {name}, which has BatchNorm between V and H (no composed form)")
        elif "composed" in train and train["composed"].median < train["factorized"].median:
            execution = "composed"
        else:
            execution = "factorized"
        rows.append(LayerSpeed(costs[name], inputs[name].shape, forward["dense"], forward["factorized"],
                               train["dense"], train["factorized"], forward.get("composed"), train.get("composed"),
                               execution))
    return rows


def _model_speed(dense: nn.Module, lowrank: nn.Module, example: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 planned: Mapping[str, str], timing_options: dict) -> ModelSpeed:
    """The whole model dense, all factorized and under `planned`, alternated."""
    fns = {"dense": model_functions(dense, example, dtype), "factorized": model_functions(lowrank, example, dtype)}
    if "composed" in planned.values():
        # the plan is the same model with some layers switched: one copy, switched before each call
        fns["planned"] = tuple(_switched(lowrank, planned, fn) for fn in fns["factorized"])
        fns["factorized"] = tuple(_switched(lowrank, "factorized", fn) for fn in fns["factorized"])
    forward = measure({key: pair[0] for key, pair in fns.items()}, device, **timing_options)
    train = measure({key: pair[1] for key, pair in fns.items()}, device, **timing_options)
    for timings in (forward, train):  # a plan that composes nothing is the all-factorized model
        timings.setdefault("planned", timings["factorized"])
    return ModelSpeed(int(example.shape[0]), forward["dense"], forward["factorized"], train["dense"], train["factorized"],
                      forward["planned"], train["planned"])


def speed_report(
    dense_model: nn.Module,
    lowrank_model: nn.Module,
    input_shape: tuple[int, int, int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    out_dir: str | Path | None = None,
    writer=None,
    repeats: int = 10,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
    channels_last: bool = False,
    whole_model: bool = True,
    title: str | None = None,
    step: int = 0,
    plan: Mapping[str, str] | None = None,
    plan_source: str | None = None,
) -> SpeedReport:
    """Time every conv layer of `lowrank_model` against the same-named layer of `dense_model`, and
    both whole models, at `input_shape` = (B, C, H, W) on `device` in `dtype`.

    Each factorized layer is timed three ways, alternated: dense, factorized and composed (one
    dense conv of its composed kernel, speed/execution.py). `plan` (layer name → "factorized" or
    "composed", e.g. a run's ExecutionPlan.executions; `plan_source` says where it came from)
    picks one per layer; by default each layer takes the form with the faster forward+backward
    measured here, the rule of `precision.execution: auto`. The whole model is timed dense,
    with every layer factorized, and under the plan.

    The models are not touched: each is copied to the device. Layers run in `dtype` itself; the
    whole models run with fp32 weights under autocast to `dtype`, as the trainer does. Files go to
    `out_dir` (if given) and TensorBoard to `writer` (a SummaryWriter; if None and `out_dir` is
    given, one is opened in out_dir/tensorboard). `whole_model=False` skips the whole-model timing.
    """
    if len(input_shape) != 4 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (B, C, H, W) with positive sizes, got {tuple(input_shape)}")
    check_dtype(dtype)
    if plan is not None and set(plan.values()) - {"factorized", "composed"}:
        raise ValueError(f"a plan maps layers to 'factorized' or 'composed', got {sorted(set(plan.values()))}")
    device = select_device(device, key="device")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    dense = copy.deepcopy(dense_model).to(device).to(memory_format=memory_format)
    lowrank = copy.deepcopy(lowrank_model).to(device).to(memory_format=memory_format)
    set_execution(lowrank, "factorized")  # the "low-rank" columns are the factorized form, whatever the model ran
    example = torch.randn(tuple(input_shape), device=device).contiguous(memory_format=memory_format)
    timing_options = {"repeats": repeats, "warmup": warmup, "min_sample_s": min_sample_s}

    rows = _layer_rows(dense, lowrank, example, device, dtype, channels_last, plan, timing_options)
    executions = {row.module: row.execution for row in rows if row.execution != "dense"}
    model_speed = None
    if whole_model:
        model_speed = _model_speed(dense, lowrank, example, device, dtype, plan if plan is not None else executions,
                                   timing_options)

    meta = {
        "device": str(device),
        "device_name": device_description(device),
        "dtype": dtype_name(dtype),
        "channels_last": channels_last,
        "input_shape": [int(s) for s in input_shape],
        "repeats": repeats,
        "warmup": warmup,
        "min_sample_s": min_sample_s,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "plan": plan_source or ("given" if plan is not None else "per layer, the faster forward+backward measured here"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    report = SpeedReport(title or type(lowrank_model).__name__, meta, rows, model_speed)
    if out_dir is not None:
        report.write(out_dir)
    if writer is None and out_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(Path(out_dir) / "tensorboard")) as own_writer:
            report.log_tensorboard(own_writer, step)
    elif writer is not None:
        report.log_tensorboard(writer, step)
    return report
