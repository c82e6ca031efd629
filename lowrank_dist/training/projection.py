"""Projected mode: dense kernels trained freely, periodically put back onto rank K exactly.

Every `project_every` optimizer steps (and at the end) each chosen kernel W is replaced by its
best rank-K approximation Ŵ = Σ_k V_k ⊗ H_k (the exact decomposition of Tai et al.), and each
chosen fully-connected weight (fc6, fc7) by its truncated SVD U·V (Eckart–Young). The residual
‖W − Ŵ‖_F / ‖W‖_F measured just before projecting tells how far training drifted from rank K.
At the end the model is exported in factorized form: exact, since every kernel has rank ≤ K.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lowrank.svd import decompose_kernel, decompose_linear, recompose
from ..models import decompose_model, split_ranks


class Projector:
    def __init__(self, model: nn.Module, ranks: dict[str, int]):
        self.ranks = dict(ranks)
        self.layers = {name: model.get_submodule(name) for name in self.ranks}  # convs and FC layers (fc6, fc7)

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Project every chosen kernel onto its rank in place; returns the relative residual of each."""
        residuals = {}
        for name, layer in self.layers.items():
            if isinstance(layer, nn.Linear):
                u, v, d = decompose_linear(layer.weight, self.ranks[name])
                layer.weight.copy_(u.double() @ v.double())
            else:
                d = decompose_kernel(layer.weight, self.ranks[name] // layer.groups, layer.groups)  # ranks are totals
                layer.weight.copy_(recompose(d.vertical.double(), d.horizontal.double(), layer.groups))
            residuals[name] = d.relative_error
        return residuals

    def export(self, model: nn.Module) -> nn.Module:
        """The factorized twin of the (projected) dense model: LowRankConv2d layers holding the exact
        factors, so its outputs equal the projected dense model's."""
        convs, fcs = split_ranks(model, self.ranks)
        lowrank, _ = decompose_model(model, {"ranks": convs}, factorize_first=True, fc={"ranks": fcs} if fcs else None)
        return lowrank
