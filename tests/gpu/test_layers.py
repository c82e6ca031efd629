"""LowRankConv2d on the device against float64 on the CPU, and whole models' two execution forms.

Bounds: max |device − float64 reference| / max |reference|, over the output and every gradient.
fp32 with TF32 off: a few float32 roundings per output, but cuDNN may choose Winograd or FFT
algorithms, whose transforms lose up to ~1e-4 of the largest value; TF32 keeps 10 mantissa bits
(2^-11 ≈ 5e-4 per product); bf16 autocast rounds inputs and weights to 8 bits (2^-9 ≈ 2e-3), and
sums of many such terms reach about 1e-2. Whole models in fp32: the composed kernel sums the same
products in another order, and the difference grows through the depth (VGG-16: 13 such layers).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model
from lowrank_dist.speed.costs import DEFAULT_LOWRANK
from lowrank_dist.speed.execution import set_execution
from lowrank_dist.runtime import logits_of

LAYER_TOLERANCE = {"fp32": 2e-4, "tf32": 1e-2, "bf16": 3e-2}
EXECUTION_TOLERANCE = 1e-3
MODES = {"fp32": (False, None), "tf32": (True, None), "bf16": (False, torch.bfloat16)}  # (TF32 on, autocast dtype)

LAYER_CASES = (
    {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "rank": 8, "padding": 1},
    {"in_channels": 12, "out_channels": 20, "kernel_size": (5, 3), "rank": 6, "stride": 2, "padding": (2, 1),
     "groups": 2},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "rank": 4, "padding": 2, "dilation": 2},
)


@contextmanager
def tf32(enabled: bool):
    """TF32 in cuDNN convolutions and in matrix products (the composed kernel is one) on or off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest of max |got − want| / max |want| over the tensors."""
    return max(float((g.double().cpu() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def layer_pass(layer: LowRankConv2d, x: torch.Tensor, grad: torch.Tensor, autocast_dtype=None) -> list[torch.Tensor]:
    """Output, then the gradients of input, V, H and bias, for the output gradient `grad`."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.enable_grad():
        y = layer(x)
    y.backward(grad.to(y.dtype))
    return [y.detach(), x.grad, layer.vertical.weight.grad, layer.horizontal.weight.grad, layer.horizontal.bias.grad]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("execution", LowRankConv2d.EXECUTIONS)
@pytest.mark.parametrize("case", range(len(LAYER_CASES)))
def test_lowrank_conv_matches_float64(case, execution, mode, device, record_property):
    if mode == "tf32" and device.type != "cuda":
        pytest.skip("TF32 is a GPU format")
    spec = LAYER_CASES[case]
    torch.manual_seed(case)
    layer = LowRankConv2d(**spec)
    x = torch.randn(4, spec["in_channels"], 17, 19)
    reference = copy.deepcopy(layer).double()
    with torch.no_grad():
        grad = torch.randn(reference(x.double()).shape, dtype=torch.float64)  # one output gradient for all
    want = layer_pass(reference, x.double(), grad)
    # the float64 reference is the definition: a dense conv with the composed kernel Ŵ
    with torch.no_grad():
        dense = F.conv2d(x.double(), reference.dense_weight(), reference.horizontal.bias, reference.stride,
                         reference.padding, reference.dilation, reference.groups)
    assert relative([want[0]], [dense]) < 1e-12, "the float64 layer is not the dense conv of its composed kernel"
    on_device = copy.deepcopy(layer).to(device)
    on_device.execution = execution
    allow_tf32, autocast_dtype = MODES[mode]
    with tf32(allow_tf32):
        got = layer_pass(on_device, x.to(device), grad.float().to(device), autocast_dtype)
    error = relative(got, want)
    record_property("relative_error", error)
    assert error <= LAYER_TOLERANCE[mode], f"relative error {error:.2e} > {LAYER_TOLERANCE[mode]:g}"


@pytest.mark.parametrize("name", ["tiny_vgg", "alexnet", "vgg16", "googlenet"])
def test_execution_forms_of_a_whole_model_agree(name, device, sizes, record_property):
    """Run `factorized` and `composed` (eval: no dropout, the same BN statistics for both): the
    same logits and gradients."""
    if device.type == "cpu" and name in ("vgg16", "googlenet"):
        pytest.skip("at toy sizes on the CPU, tiny_vgg and AlexNet cover the code path")
    torch.manual_seed(0)
    model = build_model({"name": name, "lowrank": DEFAULT_LOWRANK.get(name, {"speedup": 2.0})}).to(device).eval()
    size = 32 if name == "tiny_vgg" else sizes["model_size"]
    x = torch.randn(2, 3, size, size, device=device)
    runs = {}
    for execution in LowRankConv2d.EXECUTIONS:
        set_execution(model, execution)
        model.zero_grad(set_to_none=True)
        with tf32(False):
            logits = logits_of(model(x))
            (logits * torch.linspace(-1, 1, logits.shape[1], device=device)).sum().backward()
        runs[execution] = [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
    error = relative(runs["composed"], [t.double().cpu() for t in runs["factorized"]])
    record_property("relative_error", error)
    assert error <= EXECUTION_TOLERANCE, f"composed vs factorized relative error {error:.2e} > {EXECUTION_TOLERANCE:g}"
