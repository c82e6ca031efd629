"""Measuring time on the device: per conv layer in isolation, and whole-model steps.

Why each rule is there:
- **Device clock.** On a GPU the host returns long before the kernels finish, so a sample waits
  for the device before reading `time.perf_counter` at both ends (torch.utils.benchmark.Timer's
  clock): it spans exactly the sample's kernels, and the wait's own few microseconds are amortised
  over a sample of at least `min_sample_s`. On the CPU the work is synchronous: perf_counter alone.
- **Warm-up.** The first calls pay for cuDNN's algorithm search, allocator growth, lazy kernel
  loading and cold caches; they are run and thrown away.
- **Calls per sample.** A single call of a small layer lasts microseconds, near the clock's and the
  OS's jitter, so a sample runs the function `number` times (chosen after warm-up so that a sample
  lasts at least `min_sample_s`) and reports the mean per call.
- **Median of repeats.** Outliers (a page fault, another process taking a core) only ever make a
  sample slower; the median ignores them where a mean would not.
- **Alternation.** The functions being compared run in turn within each round, in reversed order
  on every other round (A B, B A, A B, ...), so a drift in clock speed or temperature during the
  run weighs on all of them alike instead of on whichever ran last.

Why this is not `torch.utils.benchmark.Timer`: Timer measures one statement at a time
(`blocked_autorange`, `adaptive_autorange`), so it cannot alternate the forms being compared; its
`timeit(number)`, the one call that times a single block, first runs max(2, number/100) untimed
calls, which would triple the cost of a whole-model sample (one call each); its block size is a
power of ten past `min_run_time`, so samples up to 10× longer than needed, multiplying the time an
execution plan takes to time every layer at the start of a run; and importing it loads the C++
extension builder, which logs a warning on every CUDA build of torch without a GPU (CPU test
machines), in every process that imports this module (the trainer does). Its clock is two lines,
written out here; tests/test_report.py uses Timer as the independent reference for this harness.

A layer is timed with its true input: `capture_inputs` runs the real model once with forward hooks
and records each conv's input shape and whether the model needs that input's gradient (the first
conv's input is the image, which needs none, so its backward computes only the weight gradient).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models import conv_layers, fc_layers
from ..runtime import autocast_for, logits_of


def device_description(device: torch.device) -> str:
    """The card's name, or the CPU with its cores and torch's threads (CPU times depend on both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


@dataclass
class Timing:
    """Seconds per call, one value per sample (each the mean over `number` calls)."""

    samples: list[float]
    number: int = 1  # calls per sample

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(q1, q3): the run's own spread, what a second measurement is expected to fall within."""
        if len(self.samples) < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    def as_dict(self) -> dict:
        q1, q3 = self.quartiles
        return {"median_s": self.median, "q1_s": q1, "q3_s": q3, "number": self.number, "samples_s": self.samples}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def _sample(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds for `number` back-to-back calls of `fn`, the device waited for at both ends."""
    start = _clock(device)
    for _ in range(number):
        fn()
    return _clock(device) - start


def measure(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device | str,
    repeats: int = 10,
    warmup: int = 3,
    min_sample_s: float = 1e-3,
    max_number: int = 100,
) -> dict[str, Timing]:
    """Time several functions against each other: warm-up, calibrate calls per sample, then
    `repeats` rounds with every function once per round, order reversed on odd rounds."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    number = {}
    for name in names:
        once = max(_sample(fns[name], 1, device), 1e-9)
        number[name] = max(1, min(max_number, math.ceil(min_sample_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(_sample(fns[name], number[name], device) / number[name])
    return {name: Timing(samples[name], number[name]) for name in names}


# ----------------------------------------------------------------------------------------------
# What a layer sees in the real model


@dataclass(frozen=True)
class LayerInput:
    shape: tuple[int, ...]  # B × C × H × W, as the layer receives it in the model
    requires_grad: bool  # whether training back-propagates into this input


def capture_inputs(model: nn.Module, example: torch.Tensor, training: bool = True) -> dict[str, LayerInput]:
    """Input shape of every conv layer (models.conv_layers) and factorizable FC layer
    (models.fc_layers: fc6, fc7) in one training-mode forward of
    `example`. Layers the forward does not reach are left out. The forward runs on `model` itself,
    in train mode (BatchNorm running statistics move): pass a copy if that matters.
    `training=False`: an eval-mode forward without autograd instead, the layers inference runs
    (GoogLeNet's auxiliary heads are not among them), none of them needing an input gradient."""
    found: dict[str, LayerInput] = {}
    hooks = []
    for name, layer in conv_layers(model) + fc_layers(model):
        def hook(_module, args, _output, name=name):
            found[name] = LayerInput(tuple(args[0].shape), bool(args[0].requires_grad))
        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        model.train(training)
        with torch.set_grad_enabled(training):
            model(example)
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return found


# ----------------------------------------------------------------------------------------------
# Per-layer timing


def _prepare(layer: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A private copy of the layer on the device, in `dtype` (what autocast hands the conv kernels:
    weights and activations both in that dtype)."""
    layer = copy.deepcopy(layer).to(device=device, dtype=dtype)
    return layer.to(memory_format=torch.channels_last) if channels_last else layer


def layer_functions(
    layer: nn.Module, given: LayerInput, device: torch.device, dtype: torch.dtype, channels_last: bool = False
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, forward+backward) of one layer on a random input of its true shape.

    forward: eval mode, no autograd graph (inference). forward+backward: train mode; the backward
    computes the gradients of the layer's parameters and, where the model needs it, of its input,
    via torch.autograd.grad (nothing accumulates into .grad between calls)."""
    layer = _prepare(layer, device, dtype, channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(given.shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    x_grad = x.detach().clone().requires_grad_(given.requires_grad)
    wrt = [p for p in layer.parameters() if p.requires_grad] + ([x_grad] if given.requires_grad else [])
    eval_layer = copy.deepcopy(layer).eval()
    layer.train()
    with torch.no_grad():
        grad_out = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            return eval_layer(x)

    def forward_backward():
        return torch.autograd.grad(layer(x_grad), wrt, grad_out)

    return forward, forward_backward


# ----------------------------------------------------------------------------------------------
# Whole-model timing


def model_functions(
    model: nn.Module, example: torch.Tensor, dtype: torch.dtype, compile_model: bool = False, **compile_options
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward, train step) of a whole model on `example` (already on the model's device, in the
    model's memory format). The train step is what one training iteration costs: forward, cross-
    entropy on random labels, backward, an SGD-with-momentum update and zeroing the gradients.
    The model's weights change (lr is tiny but not zero): pass a copy."""
    device = example.device
    network = torch.compile(model, **compile_options) if compile_model else model
    with torch.no_grad():
        classes = logits_of(model.eval()(example)).shape[-1]
    labels = torch.randint(0, classes, (example.shape[0],), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def forward():
        model.eval()
        with torch.no_grad(), autocast_for(device, dtype):
            return network(example)

    def train_step():
        model.train()
        with autocast_for(device, dtype):
            loss = F.cross_entropy(logits_of(network(example)).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return forward, train_step
