"""Each conv layer's name as the paper and the authors' prototxts give it (conv1_2, conv4_2,
inception_3a/3x3), beside its module path (features.2, features.19, inception3a.branch2.1.conv);
and, for the models whose fully-connected layers may be factorized (AlexNet, CaffeNet, VGG-16:
ModelSpec.fc_names), those layers' names (fc6, fc7 — every classifier nn.Linear but the last).

The names are the model registry's: each ModelSpec may carry a `layer_names` rule, written beside
the model (vgg.py, googlenet.py, ...), and `layer_names(model)` applies the rule of the spec the
model was built from (`build_model` marks the model with its registry name, as timm marks its
models with their config). A model built otherwise, or from a spec without a rule, is named by its
module paths. Reports, plots and TensorBoard tags show these names; CSV and JSON keep the module
path beside them, because the path is what addresses the layer in PyTorch (state dicts, execution
plans). A config's `ranks` mapping takes either (models.convert.choose_ranks).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..lowrank.layers import LowRankConv2d, LowRankLinear
from .registry import MODELS

# The attribute build_model sets on a model it builds: the registry name, which finds its naming.
REGISTERED_AS = "registered_as"

LayerNaming = Callable[[nn.Module], "dict[str, str]"]  # model → {module path: paper name}


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv layer of `model` in module order, with its module path: a LowRankConv2d as one
    layer (the two convs inside it are not layers of their own), a plain Conv2d elsewhere."""
    return _layers_of(model, LowRankConv2d, nn.Conv2d)


def _layers_of(model: nn.Module, factorized: type, dense: type) -> list[tuple[str, nn.Module]]:
    """(module path, module) of every `factorized` or `dense` layer in module order, a factorized
    one counted once (the dense layers inside it are its parts, not layers of their own)."""
    layers, inner = [], set()
    for path, module in model.named_modules():
        if isinstance(module, factorized):
            inner.update(module.modules())
            layers.append((path, module))
        elif isinstance(module, dense) and module not in inner:
            layers.append((path, module))
    return layers


def fc_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every fully-connected layer of `model` that may be factorized, in module order, with its
    module path: each nn.Linear (or LowRankLinear, as one layer) but the last, the class layer,
    which stays dense. Empty for a model whose registry entry names no FC layers."""
    spec = MODELS.get(getattr(model, REGISTERED_AS, None))
    if spec is None or not spec.fc_names:
        return []
    return _layers_of(model, LowRankLinear, nn.Linear)[:-1]


def fc_layer_names(model: nn.Module) -> dict[str, str]:
    """Module path → name (fc6, fc7) of every factorizable FC layer of `model` (see `fc_layers`)."""
    paths = [path for path, _ in fc_layers(model)]
    if not paths:
        return {}
    names = MODELS[getattr(model, REGISTERED_AS)].fc_names
    if len(paths) != len(names):
        raise ValueError(f"{getattr(model, REGISTERED_AS)}: {len(paths)} fully-connected layers before the class layer,"
                         f" but the naming has {len(names)} names ({', '.join(names)})")
    return dict(zip(paths, names))


def in_order(*names: str) -> LayerNaming:
    """A naming that gives the conv layers these names in module order (the model must have
    exactly as many conv layers: a model changed under its naming fails loudly, not misnamed)."""

    def naming(model: nn.Module) -> dict[str, str]:
        paths = [path for path, _ in conv_layers(model)]
        if len(paths) != len(names):
            raise ValueError(
                f"{getattr(model, REGISTERED_AS, type(model).__name__)}: {len(paths)} conv layers, but the"
                f" naming has {len(names)} names ({', '.join(names)})"
            )
        return dict(zip(paths, names))

    return naming


def layer_names(model: nn.Module) -> dict[str, str]:
    """Module path → paper name for every conv layer of `model` (see `conv_layers`), in module
    order, the module path itself where the model has no paper names; then its factorizable FC
    layers (fc6, fc7; `fc_layers`), if it has any."""
    spec = MODELS.get(getattr(model, REGISTERED_AS, None))
    if spec is None or spec.layer_names is None:
        convs = {path: path for path, _ in conv_layers(model)}
    else:
        convs = spec.layer_names(model)
    return convs | fc_layer_names(model)
