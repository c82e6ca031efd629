"""Projected mode: dense kernels trained freely, periodically put back onto rank K exactly.

Every `project_every` optimizer steps (and at the end) each chosen kernel W is replaced by its
best rank-K approximation Ŵ = Σ_k V_k ⊗ H_k (the exact decomposition of Tai et al.). The residual
‖W − Ŵ‖_F / ‖W‖_F measured just before projecting tells how far training drifted from rank K.
At the end the model is exported in factorized form: exact, since every kernel has rank ≤ K.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lowrank.svd import decompose_kernel, recompose
from ..models import decompose_model


class Projector:
    def __init__(self, model: nn.Module, ranks: dict[str, int]):
        self.ranks = dict(ranks)
        self.convs = {name: model.get_submodule(name) for name in self.ranks}

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Project every chosen kernel onto its rank in place; returns the relative residual of each."""
        residuals = {}
        for name, conv in self.convs.items():
            d = decompose_kernel(conv.weight, self.ranks[name] // conv.groups, conv.groups)  # ranks are totals
            factors64 = (d.vertical.double(), d.horizontal.double())
            conv.weight.copy_(recompose(*factors64, conv.groups))
            residuals[name] = d.relative_error
        return residuals

    def export(self, model: nn.Module) -> nn.Module:
        """The factorized twin of the (projected) dense model: LowRankConv2d layers holding the exact
        factors, so its outputs equal the projected dense model's."""
        lowrank, _ = decompose_model(model, {"ranks": self.ranks}, factorize_first=True)
        return lowrank
