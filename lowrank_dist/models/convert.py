"""Turn a dense torchvision-style CNN into its low-rank form.

`convert` replaces each factorizable conv (kh·kw > 1, zero padding) by a freshly initialised
LowRankConv2d — training from scratch, the paper's main recipe. `decompose_model` replaces it by the
exact decomposition of its trained kernel — the decompose-and-fine-tune path — and reports each
layer's approximation error. Both leave 1×1 convs dense (nothing to factorize) and, unless the
policy names every layer explicitly, keep the first conv dense (it sees 3 input channels, so it is
cheap and its rank would be tiny).

Fully-connected layers (fc6, fc7 of AlexNet, CaffeNet and VGG-16: `fc_layers`) follow their own
policy, the `fc` argument: W (out×in) becomes a LowRankLinear U·V, freshly initialised (`convert`)
or the truncated SVD of the trained W (`decompose_model`, Eckart–Young for matrices). Ranks of
both kinds travel together as one map module path → K (a checkpoint's `ranks`); `split_ranks`
tells them apart by the module each path names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Mapping

from torch import nn

from ..lowrank.ranks import ExplicitRanks, RankPolicy, policy_from_config
from ..lowrank.layers import LowRankConv2d, LowRankLinear
from ..lowrank.svd import check_rank, decompose_kernel, decompose_linear
from .layer_names import REGISTERED_AS, fc_layer_names, fc_layers, layer_names
from .registry import MODELS


def factorizable_convs(model: nn.Module) -> Iterator[tuple[str, nn.Conv2d]]:
    """(name, conv) for every dense conv that can be factorized, in module order. The convs inside
    an existing LowRankConv2d are not visited."""
    inside_lowrank: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LowRankConv2d):
            inside_lowrank.append(name + ".")
            continue
        if any(name.startswith(prefix) for prefix in inside_lowrank):
            continue
        if (
            isinstance(module, nn.Conv2d)
            and module.kernel_size[0] * module.kernel_size[1] > 1
            and module.padding_mode == "zeros"
        ):
            yield name, module


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _by_module_path(model: nn.Module, ranks: Mapping) -> dict:
    """`ranks` keyed by module path: a key that is a layer's paper name (conv1_2) is replaced by
    its module path (features.2); other keys are kept as they are."""
    names = layer_names(model)
    paths = {name: path for path, name in names.items()}
    given: dict[str, str] = {}  # module path → the key that named it
    for key in ranks:
        path = key if key in names else paths.get(key, key)
        if path in given:
            raise ValueError(f"ranks name the layer {path} twice: as {given[path]!r} and as {key!r}")
        given[path] = key
    return {path: ranks[key] for path, key in given.items()}


def choose_ranks(model: nn.Module, policy: RankPolicy | Mapping, factorize_first: bool | None = None) -> dict[str, int]:
    """Module path → rank for every layer the policy factorizes (the others stay dense). A grouped
    conv's rank is the total over its groups, as LowRankConv2d takes it. Explicit ranks may name a
    layer by its module path or its paper name (models/layer_names.py)."""
    policy = policy_from_config(policy)
    if factorize_first is None:  # explicit per-layer ranks name the first conv deliberately
        factorize_first = isinstance(policy, ExplicitRanks)
    convs = list(factorizable_convs(model))
    if isinstance(policy, ExplicitRanks):
        if isinstance(policy.ranks, Mapping):
            policy = ExplicitRanks(_by_module_path(model, policy.ranks))
            known = [name for name, _ in convs]
            unknown = sorted(set(policy.ranks) - set(known))
            if unknown:
                raise ValueError(
                    f"ranks name layers the model does not have (or that are 1×1): {unknown};"
                    f" factorizable layers: {known}"
                )
        elif len(policy.ranks) != len(convs):
            raise ValueError(
                f"a rank list needs one entry per factorizable conv: the model has {len(convs)},"
                f" the list has {len(policy.ranks)}"
            )
    chosen = {}
    for ordinal, (name, conv) in enumerate(convs):
        if ordinal == 0 and not factorize_first:
            continue
        rank = policy.rank_for(name, conv.weight, conv.groups, ordinal=ordinal)
        if rank is None:
            continue
        try:
            check_rank(rank, conv.in_channels, conv.out_channels, conv.kernel_size, conv.groups)
        except ValueError as error:
            raise ValueError(f"layer {name}: {error}") from None
        chosen[name] = int(rank)
    return chosen


def _no_fc_layers(model_name: str) -> str:
    """Why a model takes no FC policy: one line naming the models that do."""
    which = sorted(name for name, spec in MODELS.items() if spec.fc_names)
    return (f"model.lowrank.fc: {model_name} has no fully-connected layers to factorize; fc applies to"
            f" {', '.join(which)} (every classifier layer but the last)")


def check_fc_names(model_name: str, ranks: Mapping) -> None:
    """ValueError, naming the key and the layers there are, unless every key of `ranks` is an FC
    layer name of the registered model `model_name` (the config's check, before any model is built)."""
    names = MODELS[model_name].fc_names
    if not names:
        raise ValueError(_no_fc_layers(model_name))
    unknown = sorted(set(ranks) - set(names))
    if unknown:
        raise ValueError(f"model.lowrank.fc.ranks: {model_name} has no FC layer {', '.join(map(repr, unknown))};"
                         f" its factorizable FC layers: {', '.join(names)}")


def choose_fc_ranks(model: nn.Module, policy: RankPolicy | Mapping) -> dict[str, int]:
    """Module path → rank for every FC layer (fc6, fc7; `fc_layers`) the policy factorizes; explicit
    ranks name a layer by its name or its module path. Cost and spectrum are W's own (out·in MACs
    dense, K·(in + out) factorized: lowrank.ranks)."""
    policy = policy_from_config(policy)
    layers = fc_layers(model)
    if not layers:
        raise ValueError(_no_fc_layers(getattr(model, REGISTERED_AS, type(model).__name__)))
    if isinstance(policy, ExplicitRanks):
        if not isinstance(policy.ranks, Mapping):
            raise ValueError("model.lowrank.fc.ranks: a mapping of FC layer → rank, e.g. {fc6: 256, fc7: 256}")
        names = fc_layer_names(model)
        paths = {name: path for path, name in names.items()}
        unknown = sorted(key for key in policy.ranks if key not in names and key not in paths)
        if unknown:
            raise ValueError(f"model.lowrank.fc.ranks: no FC layer {', '.join(map(repr, unknown))};"
                             f" factorizable FC layers: {', '.join(f'{n} ({p})' for p, n in names.items())}")
        policy = ExplicitRanks({paths.get(key, key): rank for key, rank in policy.ranks.items()})
    chosen = {}
    for path, linear in layers:
        rank = policy.rank_for(path, linear.weight)
        if rank is None:
            continue
        if not 1 <= rank <= min(linear.weight.shape):
            raise ValueError(f"model.lowrank.fc: rank {rank} of {path} ({linear.out_features}×{linear.in_features}) must"
                             f" be in 1..{min(linear.weight.shape)}")
        chosen[path] = int(rank)
    return chosen


def split_ranks(model: nn.Module, ranks: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """A map module path → rank of both kinds (a checkpoint's `ranks`) as (conv ranks, FC ranks),
    by the module each path names in `model` (dense or low-rank)."""
    linear = {path for path, _ in fc_layers(model)}
    convs = {path: rank for path, rank in ranks.items() if path not in linear}
    return convs, {path: rank for path, rank in ranks.items() if path in linear}


def convert(
    model: nn.Module,
    policy: RankPolicy | Mapping,
    factorize_first: bool | None = None,
    bn_between: bool = False,
    inplace: bool = False,
    fc: RankPolicy | Mapping | None = None,
) -> nn.Module:
    """Low-rank twin of `model` for training from scratch: factorized layers are freshly initialised
    with the same gain as the dense layer they replace (see LowRankConv2d.from_scratch_like and
    LowRankLinear.from_scratch_like); `fc`, if given, the policy of the FC layers."""
    model = model if inplace else copy.deepcopy(model)
    fc_ranks = choose_fc_ranks(model, fc) if fc is not None else {}
    for name, rank in choose_ranks(model, policy, factorize_first).items():
        conv = model.get_submodule(name)
        _replace(model, name, LowRankConv2d.from_scratch_like(conv, rank, bn_between))
    for name, rank in fc_ranks.items():
        _replace(model, name, LowRankLinear.from_scratch_like(model.get_submodule(name), rank))
    return model


@dataclass
class LayerError:
    name: str
    rank: int  # the total over the groups
    max_rank: int  # likewise
    error: float  # ‖W − Ŵ‖_F
    relative_error: float  # ‖W − Ŵ‖_F / ‖W‖_F


def decompose_model(
    model: nn.Module,
    policy: RankPolicy | Mapping,
    factorize_first: bool | None = None,
    bn_between: bool = False,
    inplace: bool = False,
    fc: RankPolicy | Mapping | None = None,
) -> tuple[nn.Module, list[LayerError]]:
    """Low-rank model from trained weights by the exact decomposition, with per-layer errors; `fc`,
    if given, the policy of the FC layers, each replaced by the truncated SVD of its weight."""
    model = model if inplace else copy.deepcopy(model)
    errors = []
    fc_ranks = choose_fc_ranks(model, fc) if fc is not None else {}
    for name, rank in choose_ranks(model, policy, factorize_first).items():
        conv = model.get_submodule(name)
        decomposition = decompose_kernel(conv.weight, rank // conv.groups, conv.groups)
        _replace(model, name, LowRankConv2d.from_conv(conv, rank, bn_between, decomposition))
        errors.append(
            LayerError(
                name, rank, conv.groups * decomposition.singular_values.shape[-1], decomposition.error,
                decomposition.relative_error,
            )
        )
    for name, rank in fc_ranks.items():
        linear = model.get_submodule(name)
        decomposition = decompose_linear(linear.weight, rank)[2]
        _replace(model, name, LowRankLinear.from_linear(linear, rank, decomposition))
        errors.append(LayerError(name, rank, min(linear.weight.shape), decomposition.error, decomposition.relative_error))
    return model, errors
