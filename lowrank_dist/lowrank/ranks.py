"""Rank policies: for a layer (name, kernel, optional trained weights), its rank K or None (keep it
dense); and the multiply-accumulates per output pixel that the speedup policy trades. The same
policies serve fully-connected layers: given a linear layer's out×in weight, a policy counts
out·in MACs dense against K·(in + out) factorized and reads the spectrum of W itself.

K is the layer's rank as LowRankConv2d takes it: the number of vertical filters, the total over the
groups of a grouped conv (groups × the per-group rank). The cost per output pixel of a dense kernel
N×C×kh×kw is N·C·kh·kw; of its rank-K factorization K·(C·kh + N·kw) (svd.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from .svd import max_rank, singular_values

POLICIES = ("ranks", "speedup", "energy")  # a rank policy is exactly one of these
# The ranges the config and the policies below both hold their values to:
SPEEDUP_ABOVE = 1.0  # a target speedup is greater than this (at 1 a factorization saves nothing)
ENERGY_RANGE = (0.0, 1.0)  # a kept energy fraction is in (low, high]
ENERGY_NEEDS_TRAINED_WEIGHTS = (
    "model.lowrank.{key}: the energy policy reads the singular values of trained weights; mode {mode!r}"
    " chooses ranks from randomly initialised ones, where they mean nothing: use mode 'decomposed'"
    " (a trained dense_checkpoint) or give preset, ranks or speedup"
)


def one_policy(section: Mapping, keys: Sequence[str] = POLICIES) -> str:
    """The one key of `keys` that `section` sets (to something other than None); a ValueError
    unless exactly one is set."""
    given = [key for key in keys if section.get(key) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(keys)} (got {given or 'none'})")
    return given[0]


def dense_macs_per_pixel(shape: Sequence[int]) -> int:
    """N·(C/groups)·kh·kw for a kernel stored as N×(C/groups)×kh×kw; out·in for a linear layer's
    out×in weight (its MACs per input vector)."""
    if len(shape) == 2:
        return shape[0] * shape[1]
    n, c, kh, kw = shape
    return n * c * kh * kw


def factorized_macs_per_pixel(shape: Sequence[int], rank: int, groups: int = 1) -> int:
    """K·(C·kh + N·kw), summed over groups (C and N per group); K·(in + out) for a linear layer's
    out×in weight factorized as U·V (lowrank.layers.LowRankLinear)."""
    if len(shape) == 2:
        return rank * (shape[0] + shape[1])
    n, c, kh, kw = shape
    return groups * rank * (c * kh + (n // groups) * kw)


class RankPolicy(Protocol):
    def rank_for(
        self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None
    ) -> int | None: ...


@dataclass
class ExplicitRanks:
    """Ranks given per layer: a mapping layer name → K, or a list of K in the order the model's
    factorizable convs are visited (None in either keeps that layer dense). Layers not named stay
    dense. `ordinal` is filled in by the caller for list-style ranks."""

    ranks: Mapping[str, int | None] | Sequence[int | None]

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int | None:
        if isinstance(self.ranks, Mapping):
            return self.ranks.get(name)
        if ordinal is None or ordinal >= len(self.ranks):
            return None
        return self.ranks[ordinal]


@dataclass
class TargetSpeedup:
    """Per layer, the largest K whose theoretical speedup N·C·kh·kw / (K·(C·kh + N·kw)) is at least
    `speedup` (at least 1, at most the max rank; per group, times the groups)."""

    speedup: float

    def __post_init__(self):
        if not self.speedup > SPEEDUP_ABOVE:
            raise ValueError(f"target speedup must be > {SPEEDUP_ABOVE:g}, got {self.speedup}")

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int:
        per_rank = factorized_macs_per_pixel(weight.shape, 1, groups)
        k = math.floor(dense_macs_per_pixel(weight.shape) / (self.speedup * per_rank))
        return groups * max(1, min(k, max_rank(weight, groups)))


@dataclass
class EnergyFraction:
    """Per layer, the smallest K keeping `fraction` of the singular-value energy Σ s_k² (of each
    group, times the groups); None (dense) where that K would cost at least as much as the dense
    kernel. Meaningful only for trained weights: the decompose-and-fine-tune path, or a projected
    run's later projections (the spectrum of a random kernel says nothing about the data)."""

    fraction: float

    def __post_init__(self):
        low, high = ENERGY_RANGE
        if not low < self.fraction <= high:
            raise ValueError(f"energy fraction must be in ({low:g}, {high:g}], got {self.fraction}")

    def rank_for(self, name: str, weight: torch.Tensor, groups: int = 1, ordinal: int | None = None) -> int | None:
        limit = max_rank(weight, groups)
        energy = singular_values(weight, groups).reshape(groups, -1).square()
        kept = energy.cumsum(dim=1) / energy.sum(dim=1, keepdim=True).clamp_min(torch.finfo(energy.dtype).tiny)
        # per group, the first index whose cumulative share reaches the fraction (tolerance for rounding)
        k = int(((kept < self.fraction - 1e-12).sum(dim=1) + 1).max())
        k = min(k, limit)
        if factorized_macs_per_pixel(weight.shape, k, groups) >= dense_macs_per_pixel(weight.shape):
            return None
        return groups * k


def policy_from_config(spec: Mapping | RankPolicy) -> RankPolicy:
    """Build a policy from a plain dict: {"ranks": {name: K} | [K, ...]}, {"speedup": s} or
    {"energy": f}. Exactly one of these keys."""
    if hasattr(spec, "rank_for"):
        return spec  # already a policy
    if not isinstance(spec, Mapping):
        raise ValueError(f"a rank policy must be a mapping, got {type(spec).__name__}")
    key = one_policy(spec)
    if key == "ranks":
        return ExplicitRanks(spec["ranks"])
    if key == "speedup":
        return TargetSpeedup(float(spec["speedup"]))
    return EnergyFraction(float(spec["energy"]))
