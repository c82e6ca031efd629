"""Low-rank fully-connected layers: W (out×in) ≈ U·V by the truncated SVD, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowrank_dist.lowrank.layers import LowRankLinear
from lowrank_dist.lowrank.svd import decompose_linear


def test_a_low_rank_linear_layer_is_its_dense_composition_to_fp64_rounding():
    torch.manual_seed(0)
    layer = LowRankLinear.from_scratch_like(nn.Linear(96, 40).double(), rank=12)
    x = torch.randn(7, 96, dtype=torch.float64)
    dense = layer.to_dense()
    expected = x @ (layer.second.weight @ layer.first.weight).T + layer.second.bias
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12)
    assert torch.allclose(dense(x), layer(x), rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(dense.weight).item() == 12
    assert sum(p.numel() for p in layer.parameters()) == 12 * (96 + 40) + 40


@pytest.mark.parametrize("rank", [1, 5, 30])
def test_a_decomposed_linear_layer_meets_the_eckart_young_bound(rank):
    """‖W − U·V‖_F equals sqrt(Σ_{k>K} s_k²) from a full SVD of W; the layer keeps W's bias."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 48).double()
    s = torch.linalg.svdvals(linear.weight.detach())
    bound = math.sqrt(float((s[rank:] ** 2).sum()))
    u, v, decomposition = decompose_linear(linear.weight.detach(), rank)
    error = float(torch.linalg.matrix_norm(linear.weight.detach() - u @ v))
    assert error == pytest.approx(bound, rel=1e-9)
    assert decomposition.error == pytest.approx(bound, rel=1e-9)
    assert torch.allclose(decomposition.singular_values, s[:rank], rtol=1e-10)
    layer = LowRankLinear.from_linear(linear, rank)
    assert torch.equal(layer.second.bias, linear.bias)
    assert float(torch.linalg.matrix_norm(linear.weight.detach() - layer.dense_weight().detach())) == pytest.approx(bound, rel=1e-9)
    before = layer.dense_weight().clone()
    layer.reproject()  # at the same rank: the same function
    assert torch.allclose(layer.dense_weight(), before, rtol=0, atol=1e-12)


def test_a_rank_beyond_the_matrix_is_refused():
    with pytest.raises(ValueError, match="rank 50 must be in 1..48"):
        LowRankLinear(64, 48, 50)
