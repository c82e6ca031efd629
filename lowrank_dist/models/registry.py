"""Model registry: adding a model is one file with one `@register_model` (after timm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn


@dataclass(frozen=True)
class Preset:
    """A named rank setting: `convs`, one rank per factorizable (kh·kw > 1) conv in module order
    (None: that conv stays dense), and `fc`, FC layer name → rank (fc6, fc7; empty: FC dense)."""

    convs: tuple[int | None, ...]
    fc: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a dense model and what goes with it.

    build(num_classes, **options) — batch_norm and dropout among the options, with the model's defaults → nn.Module
    input_size: (C, H, W) the model is meant for (costs and the speed report use it)
    presets: named rank settings (Preset; registered as a plain list where only convs have ranks)
    options: extra keyword options `build` accepts (e.g. GoogLeNet's aux_logits), with defaults
    aux_loss_weight: weight of each auxiliary head's loss when the model returns (logits, aux...) in training
    layer_names: model → {module path: the paper's name} for every conv layer (models/layer_names.py);
        None: the module paths are the names
    fc_names: the names of the fully-connected layers that may be factorized (every classifier
        nn.Linear but the last, in module order: fc6, fc7); empty: the model has none (model.lowrank.fc refused)
    """

    name: str
    build: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    num_classes: int
    presets: dict[str, Preset] = field(default_factory=dict)
    options: dict[str, object] = field(default_factory=dict)
    aux_loss_weight: float = 0.0
    layer_names: Callable[[nn.Module], dict[str, str]] | None = None
    fc_names: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, *, input_size=(3, 224, 224), num_classes=1000, presets=None, options=None,
                   aux_loss_weight: float = 0.0, layer_names=None, fc_names=()):
    presets = {key: value if isinstance(value, Preset) else Preset(tuple(value)) for key, value in (presets or {}).items()}

    def wrap(build):
        MODELS[name] = ModelSpec(name, build, tuple(input_size), num_classes, presets, options or {},
                                 aux_loss_weight, layer_names, tuple(fc_names))
        return build

    return wrap


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]
