"""The inference model: what a trained low-rank model becomes before it is exported or timed.

`inference_model(model, plan)` returns an eval-mode copy in which
- each LowRankConv2d is replaced by its inference form, the one the plan names:
  "factorized" — its vertical and horizontal convs as two plain nn.Conv2d in an nn.Sequential
  (K·(C·kh + N·kw) MACs per output pixel);
  "padded" — the same two convs with the rank zero-padded, per group, to a multiple of
  `ALIGN` channels (zero vertical filters, and zero horizontal weights reading them: exactly the
  same function). CPU runtimes run convolutions in channel blocks of 8 or 16 (onnxruntime's NCHWc
  kernels, oneDNN's blocked layouts) and fall back to a slower path, with layout conversions
  around it, for a conv whose input channels (per group) are not a multiple of the block — as
  CaffeNet's 20 and 50 per group, or VGG-16's 24, are;
  "composed" — one nn.Conv2d holding the composed kernel Ŵ = Σ_k V_k ⊗ H_k, computed once here
  (the dense layer's N·C·kh·kw MACs, but one pass and no K-channel intermediate, which is faster
  where the factorized pair is bound by memory or by a runtime's poor 1×k kernels).
  All compute the layer's function; which is fastest depends on the layer, the runtime and the
  batch (speed.inference times them);
- each LowRankLinear (fc6, fc7 as U·V) becomes its two plain nn.Linear in an nn.Sequential,
  in→K then K→out: K·(in + out) MACs per image against the dense out·in, fewer at every rank
  it can have, so it has no other form;
- every BatchNorm is folded into the conv or linear layer before it (deploy.fold), including the
  one after a factorized layer's horizontal conv and one between its vertical and horizontal
  convs (which only the factorized form can carry: it folds into the vertical conv as a bias,
  and a vertical bias has no composed form because the horizontal conv pads the intermediate
  with zeros, not with that bias);
- dropout is gone (nn.Identity: it is the identity in eval mode anyway) and auxiliary heads are
  dropped (GoogLeNet's aux1/aux2, which only run in training).

Parameters are copied; the model passed in is not changed.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from ..lowrank.layers import LowRankConv2d, LowRankLinear
from .fold import fold_batchnorm, replace_module

FORMS = ("factorized", "padded", "composed")
ALIGN = 16  # channels: the block of AVX-512 kernels (onnxruntime's NCHWc, oneDNN); a multiple of AVX2's 8


def lowrank_layers(model: nn.Module) -> list[tuple[str, LowRankConv2d]]:
    return [(path, module) for path, module in model.named_modules() if isinstance(module, LowRankConv2d)]


def lowrank_linears(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    return [(path, module) for path, module in model.named_modules() if isinstance(module, LowRankLinear)]


def can_compose(layer: LowRankConv2d) -> bool:
    """Whether the layer has a composed form (not with BatchNorm between V and H)."""
    return layer.between is None


def padded_rank(layer: LowRankConv2d) -> int:
    """The rank (total over the groups) of the padded form: per group, the next multiple of ALIGN;
    a rank per group below ALIGN is left as it is (a conv with fewer input channels than a block
    reads them unblocked, and its output channels are padded to a block by the runtime itself)."""
    per_group = layer.rank // layer.groups
    if per_group < ALIGN:
        return layer.rank
    return -(-per_group // ALIGN) * ALIGN * layer.groups


def can_pad(layer: LowRankConv2d) -> bool:
    """Whether the padded form differs from the factorized one."""
    return padded_rank(layer) != layer.rank


def inference_form(layer: LowRankConv2d, form: str) -> nn.Module:
    """A standalone copy of `layer` in `form` (FORMS), in eval mode where the form needs it
    (the padded form folds a BatchNorm between V and H first)."""
    if form == "composed":
        if not can_compose(layer):
            raise ValueError("BatchNorm between the vertical and horizontal convs: only the factorized forms exist")
        return layer.to_dense().train(layer.training)
    if form not in FORMS:
        raise ValueError(f"an inference form is one of {', '.join(FORMS)}, got {form!r}")
    parts = [("vertical", layer.vertical)] + ([("between", layer.between)] if layer.between is not None else [])
    factorized = copy.deepcopy(nn.Sequential(OrderedDict(parts + [("horizontal", layer.horizontal)])))
    return factorized if form == "factorized" else _padded(factorized.eval(), layer.groups, padded_rank(layer))


def _padded(pair: nn.Sequential, groups: int, rank: int) -> nn.Sequential:
    """`pair` (vertical, [between,] horizontal) with its rank zero-padded to `rank`, group by group:
    group j's vertical filters, then zero filters (zero bias), and the horizontal conv's weights
    for group j's intermediate channels, then zeros. BatchNorm between is folded in first."""
    fold_batchnorm(pair)
    vertical, horizontal = pair.vertical, pair.horizontal
    old, new = vertical.out_channels // groups, rank // groups
    factory = {"device": vertical.weight.device, "dtype": vertical.weight.dtype}
    padded_v = nn.Conv2d(vertical.in_channels, rank, vertical.kernel_size, vertical.stride, vertical.padding,
                         vertical.dilation, groups, bias=vertical.bias is not None, **factory)
    padded_h = nn.Conv2d(rank, horizontal.out_channels, horizontal.kernel_size, horizontal.stride, horizontal.padding,
                         horizontal.dilation, groups, bias=horizontal.bias is not None, **factory)
    out_per_group = horizontal.out_channels // groups
    with torch.no_grad():
        for conv in (padded_v, padded_h):
            conv.weight.zero_()
        if padded_v.bias is not None:
            padded_v.bias.zero_()
        for j in range(groups):
            padded_v.weight[j * new:j * new + old] = vertical.weight[j * old:(j + 1) * old]
            if vertical.bias is not None:
                padded_v.bias[j * new:j * new + old] = vertical.bias[j * old:(j + 1) * old]
            rows = slice(j * out_per_group, (j + 1) * out_per_group)
            padded_h.weight[rows, :old] = horizontal.weight[rows]
        if horizontal.bias is not None:
            padded_h.bias.copy_(horizontal.bias)
    return nn.Sequential(OrderedDict([("vertical", padded_v), ("horizontal", padded_h)])).eval()


def drop_training_only(model: nn.Module) -> None:
    """Dropout → identity; auxiliary classifiers removed (in place). torchvision's GoogLeNet and
    Inception keep theirs in `aux1`/`aux2` (`AuxLogits`) behind `aux_logits`, which their forward
    checks before calling them; with it off they are None, as when built without them."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.modules.dropout._DropoutNd):
            replace_module(model, path, nn.Identity())
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)


def inference_model(model: nn.Module, plan: str | Mapping[str, str] = "factorized") -> nn.Module:
    """The eval-mode inference copy of `model` (module docstring). `plan`: one form for every
    low-rank layer, or module path → form (a layer not named runs factorized). Returns the copy;
    `folded_batchnorm` and `unfolded_batchnorm` on it say what was folded where."""
    result = copy.deepcopy(model).eval()
    drop_training_only(result)
    unknown = sorted(set(plan) - {path for path, _ in lowrank_layers(result)}) if not isinstance(plan, str) else []
    if unknown:
        raise ValueError(f"the plan names layers the model does not factorize: {', '.join(unknown)}")
    for path, layer in lowrank_layers(result):
        form = plan if isinstance(plan, str) else plan.get(path, "factorized")
        try:
            replace_module(result, path, inference_form(layer, form))
        except ValueError as error:
            raise ValueError(f"layer {path}: {error}") from None
    for path, layer in lowrank_linears(result):  # U·V as two plain linear layers (a BatchNorm after folds into U)
        replace_module(result, path, copy.deepcopy(nn.Sequential(OrderedDict([("first", layer.first),
                                                                                ("second", layer.second)]))))
    folded, kept = fold_batchnorm(result)
    result.folded_batchnorm, result.unfolded_batchnorm = folded, kept
    for parameter in result.parameters():
        parameter.requires_grad_(False)
    return result
