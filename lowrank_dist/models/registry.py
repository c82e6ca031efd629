"""Model registry: adding a model is one file with one `@register_model` (after timm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """How to build a dense model and what goes with it.

    build(num_classes, **options) — batch_norm and dropout among the options, with the model's defaults → nn.Module
    input_size: (C, H, W) the model is meant for (costs and the speed report use it)
    presets: named rank lists, one rank per factorizable (kh·kw > 1) conv in module order
    options: extra keyword options `build` accepts (e.g. GoogLeNet's aux_logits), with defaults
    aux_loss_weight: weight of each auxiliary head's loss when the model returns (logits, aux...) in training
    layer_names: model → {module path: the paper's name} for every conv layer (models/layer_names.py);
        None: the module paths are the names
    """

    name: str
    build: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    presets: dict[str, list[int | None]] = field(default_factory=dict)  # None: that conv stays dense
    options: dict[str, object] = field(default_factory=dict)
    aux_loss_weight: float = 0.0
    layer_names: Callable[[nn.Module], dict[str, str]] | None = None


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, input_size=(3, 224, 224), num_classes=1000, presets=None, options=None,
                   aux_loss_weight: float = 0.0, layer_names=None):
    def wrap(build):
        MODELS[name] = ModelSpec(name, build, tuple(input_size), num_classes, presets or {}, options or {},
                                 aux_loss_weight, layer_names)
        return build

    return wrap


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]
