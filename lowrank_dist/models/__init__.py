"""Models: AlexNet, VGG-16, GoogLeNet (torchvision's architectures) and NIN for CIFAR-10, each
built dense or low-rank from a plain dict.

    build_model({"name": "vgg16", "batch_norm": True, "lowrank": {"preset": "tai2016"}})
    build_model({"name": "googlenet", "lowrank": {"speedup": 2.0}})

`lowrank` takes exactly one of preset (a named rank list of the model), ranks (a list, one per
factorizable conv in module order, or a mapping layer → rank, by module path or the paper's name
(features.2 or conv1_2 in VGG-16; models/layer_names.py); null keeps a layer dense),
or speedup (per-layer theoretical target), plus factorize_first (default: only when ranks are
explicit) and bn_between (default false). The energy policy (a fraction of singular-value energy)
needs trained weights, so it goes to `decompose_model`, not here.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from ..lowrank.ranks import ENERGY_NEEDS_TRAINED_WEIGHTS, POLICIES, one_policy
from . import alexnet, caffenet, googlenet, nin, tiny, vgg  # noqa: F401  (registration)
from .convert import LayerError, choose_ranks, convert, decompose_model, factorizable_convs
from .layer_names import REGISTERED_AS, conv_layers, layer_names
from .registry import MODELS, ModelSpec, model_spec, register_model

MODEL_KEYS = {"name", "num_classes", "batch_norm", "dropout", "lowrank"}
LOWRANK_KEYS = {"preset", *POLICIES, "factorize_first", "bn_between"}


def lowrank_policy(spec: ModelSpec, lowrank: Mapping) -> dict:
    """The rank-policy dict for `convert`/`decompose_model`: a preset name resolved to its ranks."""
    unknown = sorted(set(lowrank) - LOWRANK_KEYS)
    if unknown:
        raise ValueError(f"model.lowrank: unknown key(s) {unknown}; allowed: {sorted(LOWRANK_KEYS)}")
    key = one_policy(lowrank, ("preset", *POLICIES))
    if key != "preset":
        return {key: lowrank[key]}
    preset = lowrank["preset"]
    if preset not in spec.presets:
        raise ValueError(
            f"model.lowrank.preset: {spec.name} has no preset {preset!r};"
            f" available: {sorted(spec.presets) or 'none'}"
        )
    return {"ranks": list(spec.presets[preset])}


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
    if lowrank and lowrank.get("energy") is not None:
        raise ValueError(ENERGY_NEEDS_TRAINED_WEIGHTS.format(mode="factorized"))
    if lowrank:
        model = convert(
            model,
            lowrank_policy(spec, lowrank),
            factorize_first=lowrank.get("factorize_first"),
            bn_between=bool(lowrank.get("bn_between", False)),
            inplace=True,
        )
    return model


__all__ = [
    "MODELS", "ModelSpec", "LayerError", "build_model", "choose_ranks", "conv_layers", "convert", "decompose_model",
    "factorizable_convs", "layer_names", "lowrank_policy", "model_spec", "register_model",
]
