"""Turn a dense torchvision-style CNN into its low-rank form.

`convert` replaces each factorizable conv (kh·kw > 1, zero padding) by a freshly initialised
LowRankConv2d — training from scratch, the paper's main recipe. `decompose_model` replaces it by the
exact decomposition of its trained kernel — the decompose-and-fine-tune path — and reports each
layer's approximation error. Both leave 1×1 convs dense (nothing to factorize) and, unless the
policy names every layer explicitly, keep the first conv dense (it sees 3 input channels, so it is
cheap and its rank would be tiny).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Mapping

from torch import nn

from ..lowrank.ranks import ExplicitRanks, RankPolicy, policy_from_config
from ..lowrank.layers import LowRankConv2d
from ..lowrank.svd import check_rank, decompose_kernel
from .layer_names import layer_names


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


def convert(
    model: nn.Module,
    policy: RankPolicy | Mapping,
    factorize_first: bool | None = None,
    bn_between: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Low-rank twin of `model` for training from scratch: factorized layers are freshly initialised
    with the same gain as the dense layer they replace (see LowRankConv2d.from_scratch_like)."""
    model = model if inplace else copy.deepcopy(model)
    for name, rank in choose_ranks(model, policy, factorize_first).items():
        conv = model.get_submodule(name)
        _replace(model, name, LowRankConv2d.from_scratch_like(conv, rank, bn_between))
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
) -> tuple[nn.Module, list[LayerError]]:
    """Low-rank model from trained weights by the exact decomposition, with per-layer errors."""
    model = model if inplace else copy.deepcopy(model)
    errors = []
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
    return model, errors
