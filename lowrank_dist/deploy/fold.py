"""BatchNorm folded into the layer before it, for inference.

In eval mode BatchNorm is a fixed affine map per channel, y = s·(x − μ) + β with s = γ/√(σ² + ε),
so after a conv (or a linear layer) it can be merged into that layer's weights and bias:
W' = s·W (per output channel), b' = s·(b − μ) + β. The merged layer computes the same function with
one pass over the activations instead of two. The arithmetic is done in float64 and rounded once to
the layer's dtype, so the folded model differs from the unfolded one only by that rounding.

Which BatchNorm follows which layer is read from the model's dataflow graph (torch.fx), not from
module order: a BN is folded only where its input is the output of a Conv2d (or of a Linear, for a
BatchNorm1d) used by nothing else. That covers a factorized layer's BN after the horizontal conv
(the authors' conv_v → conv_h → BN) and a BN between the vertical and horizontal convs, once the
layer is in its inference form (deploy.forms): that BN folds into the vertical conv, which gains a
bias.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn


def fold_into(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Merge eval-mode `bn` into `layer` (in place): the layer alone then computes bn(layer(x))."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics normalises by the batch: it cannot be folded")
    if layer.weight.shape[0] != bn.num_features:
        raise ValueError(f"{type(layer).__name__} has {layer.weight.shape[0]} outputs, its BatchNorm {bn.num_features}")
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(scale)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        scale = scale * gamma
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        weight = layer.weight.double() * scale.view(shape)
        layer.weight.copy_(weight.to(layer.weight.dtype))
        folded_bias = ((bias - bn.running_mean.double()) * scale + beta).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(folded_bias, requires_grad=False)
        else:
            layer.bias.copy_(folded_bias)


def _foldable(modules: dict[str, nn.Module], calls: Counter, bn_node: fx.Node) -> str | None:
    """The module path of the layer `bn_node` can fold into, or None. A module the forward calls
    more than once (shared weights) is never folded: the fold would change its other uses too."""
    bn = modules[bn_node.target]
    source = bn_node.args[0] if bn_node.args else None
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    if calls[bn_node.target] != 1 or calls[source.target] != 1:
        return None
    layer = modules[source.target]
    if isinstance(bn, nn.BatchNorm2d) and isinstance(layer, nn.Conv2d):
        return source.target
    if isinstance(bn, nn.BatchNorm1d) and isinstance(layer, nn.Linear):
        return source.target
    return None


def fold_batchnorm(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """Fold every BatchNorm of eval-mode `model` that directly follows a Conv2d/Linear into it,
    in place, and put an nn.Identity where the BatchNorm was. Returns ({BN path: the layer it went
    into}, [BN paths left as they are: no conv or linear layer of their own before them])."""
    if model.training:
        raise ValueError("BatchNorm folds into the eval-mode model: call model.eval() first")
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded, kept = {}, []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        target = _foldable(modules, calls, node)
        if target is None:
            kept.append(node.target)
            continue
        fold_into(modules[target], modules[node.target])
        folded[node.target] = target
    for path in folded:
        replace_module(model, path, nn.Identity())
    return folded, kept


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
