"""Theoretical per-layer costs of a (low-rank) CNN: multiply-accumulates and parameters per conv.

MACs are counted from the shapes a real forward pass produces, so strides and padding are exact:
a dense conv costs (C/groups)·kh·kw MACs per output element; a LowRankConv2d costs its vertical
conv ((C/groups)·kh per element of the K-channel intermediate, which has the output's height but the
input's width) plus its horizontal conv ((K/groups)·kw per output element, K the layer's rank: the
vertical filters of all groups). For stride 1 this is the paper's
K·(C·kh + N·kw) per output pixel; the "dense" column is what the original kh×kw conv would cost.
A fully-connected layer (fc6, fc7: `fc_costs`) costs out·in MACs and parameters dense, K·(in + out)
as a LowRankLinear U·V; its rows come in a table of their own, after the convs'.

    python -m lowrank_dist.speed.costs                      # every model, its default policy
    python -m lowrank_dist.speed.costs --model vgg16 --speedup 3
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..lowrank.layers import LowRankConv2d, LowRankLinear
from ..models import conv_layers, fc_layers, layer_names


@dataclass
class LayerCost:
    module: str  # the module path (features.2)
    layer: str  # the paper's name (conv1_2; models/layer_names.py), else the module path
    kernel: tuple[int, ...]  # N × C/groups × kh × kw of the (equivalent) dense kernel; out × in for an FC layer
    groups: int
    rank: int | None  # None: dense
    output: tuple[int, int]  # H × W of the layer's output
    dense_macs: int  # per image
    lowrank_macs: int  # per image (equal to dense_macs for a dense layer)
    dense_params: int
    lowrank_params: int

    @property
    def speedup(self) -> float:
        return self.dense_macs / self.lowrank_macs


def _params(*modules: nn.Module | None) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def conv_costs(model: nn.Module, input_size: tuple[int, int, int]) -> list[LayerCost]:
    """One row per conv layer (dense or factorized), in module order, for one image of
    `input_size` = (C, H, W)."""
    shapes: dict[nn.Module, torch.Size] = {}
    hooks = [
        m.register_forward_hook(lambda module, _inp, out: shapes.__setitem__(module, out.shape))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            param = next(model.parameters())
            model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    names = layer_names(model)
    rows = []
    for path, module in conv_layers(model):
        if isinstance(module, LowRankConv2d):
            v, h = module.vertical, module.horizontal
            n, c, (kh, kw), g = module.out_channels, module.in_channels // module.groups, module.kernel_size, module.groups
            out_h, out_w = shapes[h][2:]
            dense_macs = n * c * kh * kw * out_h * out_w
            lowrank_macs = shapes[v][1:].numel() * c * kh + shapes[h][1:].numel() * (module.rank // g) * kw
            dense_params = n * c * kh * kw + (n if h.bias is not None else 0)
            rows.append(
                LayerCost(path, names[path], (n, c, kh, kw), g, module.rank, (out_h, out_w), dense_macs, lowrank_macs,
                          dense_params, _params(v, module.between, h))
            )
        elif module in shapes:  # a dense conv the forward reached
            n, c, kh, kw = module.weight.shape
            out_h, out_w = shapes[module][2:]
            macs = shapes[module][1:].numel() * c * kh * kw
            params = _params(module)
            rows.append(LayerCost(path, names[path], (n, c, kh, kw), module.groups, None, (out_h, out_w), macs, macs,
                                  params, params))
    return rows


def fc_costs(model: nn.Module) -> list[LayerCost]:
    """One row per factorizable FC layer (fc6, fc7; models.fc_layers), dense or LowRankLinear, per
    image: out·in MACs and weights dense, K·(in + out) factorized (biases alike in both)."""
    names = layer_names(model)
    rows = []
    for path, layer in fc_layers(model):
        out, inp = layer.out_features, layer.in_features
        rank = layer.rank if isinstance(layer, LowRankLinear) else None
        macs = out * inp if rank is None else rank * (inp + out)
        bias = out if (layer.second.bias if rank is not None else layer.bias) is not None else 0
        rows.append(LayerCost(path, names[path], (out, inp), 1, rank, (1, 1), out * inp, macs, out * inp + bias, macs + bias))
    return rows


def format_table(rows: list[LayerCost], title: str = "", what: str = "convs") -> str:
    """Markdown table with a totals line (`what`: what the rows are, for that line)."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| layer | kernel N×C×kh×kw | rank | output | dense MMACs | low-rank MMACs | speedup | dense params | low-rank params |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kernel = "×".join(map(str, r.kernel)) + (f" /{r.groups}g" if r.groups > 1 else "")
        lines.append(
            f"| {r.layer} | {kernel} | {r.rank if r.rank is not None else 'dense'} | {r.output[0]}×{r.output[1]}"
            f" | {r.dense_macs / 1e6:,.1f} | {r.lowrank_macs / 1e6:,.1f} | {r.speedup:.2f}×"
            f" | {r.dense_params:,} | {r.lowrank_params:,} |"
        )
    dense, lowrank = sum(r.dense_macs for r in rows), sum(r.lowrank_macs for r in rows)
    dense_p, lowrank_p = sum(r.dense_params for r in rows), sum(r.lowrank_params for r in rows)
    factorized = sum(r.rank is not None for r in rows)
    lines.append(
        f"| **all {len(rows)} {what} ({factorized} factorized)** | | | | **{dense / 1e6:,.1f}** | **{lowrank / 1e6:,.1f}**"
        f" | **{dense / lowrank:.2f}×** | **{dense_p:,}** | **{lowrank_p:,}** |"
    )
    return "\n".join(lines)


# The policies the demo shows: the authors' ranks where they published them, else a target speedup.
DEFAULT_LOWRANK = {
    "caffenet": {"preset": "tai2016"},
    "alexnet": {"preset": "tai2016"},
    "vgg16": {"preset": "tai2016"},
    "googlenet": {"speedup": 2.0},
    "nin": {"preset": "tai2016"},
}


def default_lowrank(name: str) -> dict:
    """The demo policy of a model: DEFAULT_LOWRANK's, else a 2× per-layer target (e.g. tiny_vgg)."""
    return DEFAULT_LOWRANK.get(name, {"speedup": 2.0})


def main(argv: list[str] | None = None) -> int:
    from ..models import MODELS, build_model, model_spec

    parser = argparse.ArgumentParser(
        prog="python -m lowrank_dist.speed.costs",
        description="Per-layer theoretical cost of each low-rank model (MACs and parameters, dense vs factorized).",
    )
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="model (repeatable; default: all)")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--preset", help="a named rank preset of the model, e.g. tai2016")
    policy.add_argument("--speedup", type=float, help="per-layer theoretical speedup target")
    parser.add_argument("--batch-norm", action="store_true", help="build the BN variant")
    args = parser.parse_args(argv)

    override = {key: getattr(args, key) for key in ("preset", "speedup") if getattr(args, key) is not None}
    for name in args.model or ["caffenet", "alexnet", "vgg16", "googlenet", "nin"]:
        lowrank = override or default_lowrank(name)
        cfg = {"name": name, "lowrank": lowrank}
        if args.batch_norm:
            cfg["batch_norm"] = True
        try:
            model = build_model(cfg)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        spec = model_spec(name)
        rows = conv_costs(model, spec.input_size)
        policy_text = ", ".join(f"{k}={v}" for k, v in lowrank.items())
        size = "×".join(map(str, spec.input_size[1:]))
        print(format_table(rows, f"{name} — low-rank ({policy_text}) at {size}, per image"))
        print()
        fc = fc_costs(model)
        if fc:
            print(format_table(fc, f"{name} — fully-connected layers but the class layer, per image", "FC layers"))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
