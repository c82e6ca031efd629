"""LowRankConv2d against the dense conv with the recomposed kernel."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_dist.lowrank.svd import decompose_kernel, recompose
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model, factorizable_convs


def conv_geometries():
    """Every (kernel, stride, padding, dilation, groups) of a factorizable conv in the models."""
    seen = set()
    for name in ("alexnet", "vgg16", "googlenet", "nin"):
        for _, conv in factorizable_convs(build_model({"name": name})):
            seen.add((conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups))
    return sorted(seen)


MODEL_GEOMETRIES = conv_geometries()
EXTRA_GEOMETRIES = [  # what the models lack: kh != kw, dilation, groups, 'same'
    ((3, 5), (2, 1), (1, 2), (1, 1), 1),
    ((5, 3), (1, 2), (2, 0), (2, 1), 1),
    ((3, 3), (1, 1), (2, 2), (2, 2), 2),
    ((3, 3), (1, 1), "same", (1, 1), 1),
]


def test_the_models_cover_the_expected_geometries():
    kernels = {g[0] for g in MODEL_GEOMETRIES}
    assert {(11, 11), (5, 5), (3, 3)} <= kernels  # AlexNet, NIN, VGG/GoogLeNet
    assert any(g[1] == (4, 4) for g in MODEL_GEOMETRIES)  # AlexNet conv1 stride 4
    assert any(g[1] == (2, 2) for g in MODEL_GEOMETRIES)  # GoogLeNet conv1 stride 2


@pytest.mark.parametrize("geometry", MODEL_GEOMETRIES + EXTRA_GEOMETRIES, ids=str)
def test_from_conv_equals_dense_conv_with_recomposed_kernel(geometry):
    kernel, stride, padding, dilation, groups = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    per_group = max(1, min(6 // groups * kernel[0], kernel[1] * 8 // groups) // 2)
    rank = groups * per_group  # LowRankConv2d counts the vertical filters of all groups
    layer = LowRankConv2d.from_conv(conv, rank)
    assert layer.vertical.out_channels == layer.horizontal.in_channels == rank
    x = torch.randn(2, 6, 23, 19)
    expected = F.conv2d(x, layer.dense_weight(), conv.bias, conv.stride, conv.padding, conv.dilation, groups)
    actual = layer(x)
    assert actual.shape == conv(x).shape
    scale = expected.abs().max()
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=1e-5)
    # the recomposed kernel is the exact rank-K decomposition of the original
    d = decompose_kernel(conv.weight, per_group, groups)
    torch.testing.assert_close(layer.dense_weight(), recompose(d.vertical, d.horizontal, groups))
    assert float((conv.weight - layer.dense_weight()).detach().norm()) == pytest.approx(d.error, rel=1e-4, abs=1e-6)


def test_full_rank_layer_equals_the_dense_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    layer = LowRankConv2d.from_conv(conv.double(), rank=15)
    x = torch.randn(3, 5, 17, 17, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_dense()(x), conv(x), rtol=1e-12, atol=1e-12)


def test_reproject_at_same_rank_keeps_output_and_parameters():
    torch.manual_seed(2)
    layer = LowRankConv2d(8, 16, 3, rank=4, padding=1).double()
    vertical_param = layer.vertical.weight
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    before = layer(x)
    d = layer.reproject()
    assert d.error < 1e-10 and layer.vertical.weight is vertical_param
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)


def test_reproject_to_lower_rank_gives_a_rank_k_kernel():
    torch.manual_seed(3)
    layer = LowRankConv2d(8, 16, 3, rank=12, padding=1).double()
    layer.reproject(5)
    assert layer.rank == 5 and layer.vertical.weight.shape == (5, 8, 3, 1)
    m = layer.dense_weight().permute(1, 2, 3, 0).reshape(24, 48)
    s = torch.linalg.svdvals(m)
    assert s[5:].max() < 1e-10 * s[0]


def test_bn_between_is_optional_and_blocks_recomposition():
    layer = LowRankConv2d(4, 6, 3, rank=2, bn_between=True)
    assert isinstance(layer.between, nn.BatchNorm2d) and layer(torch.randn(2, 4, 5, 5)).shape == (2, 6, 3, 3)
    assert LowRankConv2d(4, 6, 3, rank=2).between is None
    with pytest.raises(ValueError, match="undefined with BatchNorm between"):
        layer.dense_weight()


def test_from_scratch_init_matches_the_dense_layers_gain():
    torch.manual_seed(4)
    conv = nn.Conv2d(64, 128, 3, padding=1)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    layer = LowRankConv2d.from_scratch_like(conv, rank=32)
    x = torch.randn(8, 64, 16, 16)
    with torch.no_grad():
        ratio = float(layer(x).std() / conv(x).std())
    assert 0.85 < ratio < 1.15


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(in_channels=4, out_channels=6, kernel_size=1, rank=1), "1×1 convolution cannot be factorized"),
        (dict(in_channels=4, out_channels=6, kernel_size=3, rank=0), r"rank 0 is out of range .* allowed 1\.\.12"),
        (dict(in_channels=4, out_channels=6, kernel_size=3, rank=13), r"allowed 1\.\.12"),
        (dict(in_channels=4, out_channels=6, kernel_size=4, rank=2, padding="same"), "pads asymmetrically"),
        (dict(in_channels=4, out_channels=6, kernel_size=3, rank=2, stride=2, padding="same"), "needs stride 1"),
    ],
)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankConv2d(**kwargs)


def test_non_zero_padding_mode_is_refused():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        LowRankConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 2)
