"""Models: AlexNet, VGG-16, GoogLeNet (torchvision's architectures) and NIN for CIFAR-10, each
built dense or low-rank from a plain dict.

    build_model({"name": "vgg16", "batch_norm": True, "lowrank": {"preset": "tai2016"}})
    build_model({"name": "googlenet", "lowrank": {"speedup": 2.0}})

`lowrank` takes exactly one of preset (a named rank setting of the model), ranks (a list, one per
factorizable conv in module order, or a mapping layer → rank, by module path or the paper's name
(features.2 or conv1_2 in VGG-16; models/layer_names.py); null keeps a layer dense),
or speedup (per-layer theoretical target), plus factorize_first (default: only when ranks are
explicit) and bn_between (default false). `fc` (AlexNet, CaffeNet, VGG-16) factorizes fc6/fc7 by
its own policy, one of ranks ({fc6: 256, fc7: 256}), speedup or energy; with `fc` the conv policy
may be left out, and the convs stay dense. A preset may carry FC ranks too (tai2016_fc256). The
energy policy (a fraction of singular-value energy) needs trained weights, so it goes to
`decompose_model`, not here.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from ..lowrank.ranks import ENERGY_NEEDS_TRAINED_WEIGHTS, POLICIES, one_policy
from . import alexnet, caffenet, googlenet, nin, tiny, vgg  # noqa: F401  (registration)
from .convert import (
    LayerError, check_fc_names, choose_fc_ranks, choose_ranks, convert, decompose_model, factorizable_convs, split_ranks,
)
from .layer_names import REGISTERED_AS, conv_layers, fc_layers, layer_names
from .registry import MODELS, ModelSpec, Preset, model_spec, register_model

MODEL_KEYS = {"name", "num_classes", "batch_norm", "dropout", "lowrank"}
LOWRANK_KEYS = {"preset", *POLICIES, "factorize_first", "bn_between", "fc"}
CONV_POLICY_KEYS = ("preset", *POLICIES)


def _preset(spec: ModelSpec, name: str) -> Preset:
    if name not in spec.presets:
        raise ValueError(f"model.lowrank.preset: {spec.name} has no preset {name!r}; available: {sorted(spec.presets) or 'none'}")
    return spec.presets[name]


def lowrank_policy(spec: ModelSpec, lowrank: Mapping) -> dict:
    """The conv rank-policy dict for `convert`/`decompose_model`: a preset name resolved to its
    ranks; with `fc` and no conv policy, no conv ranks (convs dense)."""
    unknown = sorted(set(lowrank) - LOWRANK_KEYS)
    if unknown:
        raise ValueError(f"model.lowrank: unknown key(s) {unknown}; allowed: {sorted(LOWRANK_KEYS)}")
    if lowrank.get("fc") is not None and not any(lowrank.get(key) is not None for key in CONV_POLICY_KEYS):
        return {"ranks": {}}  # FC only: every conv stays dense
    key = one_policy(lowrank, CONV_POLICY_KEYS)
    if key != "preset":
        return {key: lowrank[key]}
    return {"ranks": list(_preset(spec, lowrank["preset"]).convs)}


def fc_policy(spec: ModelSpec, lowrank: Mapping) -> dict | None:
    """The FC rank-policy dict for `convert`/`decompose_model` (`fc`, or the preset's FC ranks), or
    None where fc6/fc7 stay dense."""
    preset = _preset(spec, lowrank["preset"]).fc if lowrank.get("preset") is not None else {}
    fc = lowrank.get("fc")
    if fc is not None and preset:
        raise ValueError(f"model.lowrank.fc: preset {lowrank['preset']!r} sets the FC ranks already"
                         f" ({', '.join(f'{k}: {v}' for k, v in preset.items())}); remove fc, or take a conv-only preset")
    if fc is not None:
        key = one_policy(fc)
        return {key: fc[key]}
    return {"ranks": dict(preset)} if preset else None


def build_model(cfg: Mapping, dense: bool = False) -> nn.Module:
    """Dense model, or its low-rank twin freshly initialised for training from scratch; with
    `dense=True` the dense twin of a low-rank `cfg` (its `lowrank` section set aside)."""
    if "name" not in cfg:
        raise ValueError(f"model: 'name' is required; available: {', '.join(sorted(MODELS))}")
    spec = model_spec(cfg["name"])
    allowed = MODEL_KEYS | set(spec.options)
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"model: unknown key(s) {unknown} for {spec.name}; allowed: {sorted(allowed)}")
    options = {key: cfg.get(key, default) for key, default in spec.options.items()}
    for key in ("dropout", "batch_norm"):  # absent → the model's own default
        if cfg.get(key) is not None:
            options[key] = cfg[key]
    model = spec.build(num_classes=cfg.get("num_classes", spec.num_classes), **options)
    setattr(model, REGISTERED_AS, spec.name)  # before convert: ranks may name layers as the paper does
    lowrank = None if dense else cfg.get("lowrank")
    for key, section in (("energy", lowrank or {}), ("fc.energy", (lowrank or {}).get("fc") or {})):
        if section.get("energy") is not None:
            raise ValueError(ENERGY_NEEDS_TRAINED_WEIGHTS.format(key=key, mode="factorized"))
    if lowrank:
        model = convert(
            model,
            lowrank_policy(spec, lowrank),
            factorize_first=lowrank.get("factorize_first"),
            bn_between=bool(lowrank.get("bn_between", False)),
            inplace=True,
            fc=fc_policy(spec, lowrank),
        )
    return model


__all__ = [
    "MODELS", "ModelSpec", "LayerError", "Preset", "build_model", "check_fc_names", "choose_fc_ranks", "choose_ranks",
    "conv_layers", "convert", "decompose_model", "factorizable_convs", "fc_layers", "fc_policy", "layer_names",
    "lowrank_policy", "model_spec", "register_model", "split_ranks",
]
