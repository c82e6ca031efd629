"""Models dense and low-rank: the authors' VGG-16 numbers, conversion, decomposition, bad configs."""

import pytest
import torch
from torch import nn

from lowrank_dist.lowrank.svd import max_rank, singular_values
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import (
    MODELS, build_model, conv_layers, convert, decompose_model, factorizable_convs, fc_layers, layer_names,
)
from lowrank_dist.speed.costs import conv_costs, fc_costs

# VGG-16 convs: (C, N) and the authors' ranks (Tai et al. 2016; chengtaipu/lowrankcnn, imagenet/models_vgg/config.json).
VGG16_CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                  (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
VGG16_SIZES = [224, 224, 112, 112, 56, 56, 56, 28, 28, 28, 14, 14, 14]
TAI2016_RANKS = [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]
NIN_NAMES = ["conv1", "cccp1", "cccp2", "conv2", "cccp3", "cccp4", "conv3", "cccp5", "cccp6"]


def test_vgg16_with_the_authors_ranks_costs_what_the_paper_says():
    rows = conv_costs(build_model({"name": "vgg16", "lowrank": {"preset": "tai2016"}}), (3, 224, 224))
    assert [r.rank for r in rows] == TAI2016_RANKS
    dense = sum(r.dense_macs for r in rows)
    lowrank = sum(r.lowrank_macs for r in rows)
    # by hand: dense N·C·9·H·W, factorized K·(3C + 3N)·H·W, summed over the 13 convs
    assert dense == sum(n * c * 9 * s * s for (c, n), s in zip(VGG16_CHANNELS, VGG16_SIZES)) == 15_346_630_656
    assert lowrank == sum(k * (3 * c + 3 * n) * s * s for (c, n), k, s in zip(VGG16_CHANNELS, TAI2016_RANKS, VGG16_SIZES))
    assert round(dense / 1e9, 2) == 15.35 and round(lowrank / 1e9, 2) == 4.94
    assert round(dense / lowrank, 2) == 3.10
    # parameters by hand: dense 9·C·N + N; factorized K·(3C + 3N) + N (the bias moves to conv_h)
    assert rows[0].lowrank_params == 5 * (3 * 3 + 3 * 64) + 64 == 1069
    assert rows[-1].lowrank_params == 320 * (3 * 512 + 3 * 512) + 512 == 983_552
    assert sum(r.dense_params for r in rows) == 14_714_688
    assert sum(r.lowrank_params for r in rows) == 5_362_797


def test_alexnet_strided_first_conv_counts_the_wide_intermediate():
    """conv1 (11×11, stride 4, pad 2, 224→55): the vertical conv keeps the input's width 224."""
    rows = conv_costs(build_model({"name": "alexnet", "lowrank": {"preset": "tai2016"}}), (3, 224, 224))
    first = rows[0]
    assert first.rank == 8 and first.output == (55, 55)
    assert first.dense_macs == 64 * 3 * 121 * 55 * 55
    assert first.lowrank_macs == 8 * 3 * 11 * 55 * 224 + 64 * 8 * 11 * 55 * 55


@pytest.mark.parametrize("name,size", [("alexnet", 224), ("vgg16", 224), ("googlenet", 224), ("nin", 32)])
def test_every_model_builds_dense_and_low_rank(name, size):
    torch.manual_seed(0)
    dense = build_model({"name": name})
    lowrank = build_model({"name": name, "lowrank": {"speedup": 2.0}})
    convs = list(factorizable_convs(dense))
    lowrank_layers = [m for m in lowrank.modules() if isinstance(m, LowRankConv2d)]
    assert len(lowrank_layers) == len(convs) - 1  # the first conv stays dense by default
    assert isinstance(lowrank.get_submodule(convs[0][0]), nn.Conv2d)
    x = torch.randn(2, 3, size, size)
    assert dense.eval()(x).shape == lowrank.eval()(x).shape
    rows = conv_costs(lowrank, (3, size, size))
    assert all(r.speedup >= 2.0 for r in rows if r.rank is not None and r.rank > 1)


def test_low_rank_vgg16_bn_runs_in_the_authors_order():
    model = build_model({"name": "vgg16", "batch_norm": True, "lowrank": {"preset": "tai2016"}})
    features = list(model.features)
    first = features[0]
    assert isinstance(first, LowRankConv2d) and first.between is None
    assert isinstance(features[1], nn.BatchNorm2d) and isinstance(features[2], nn.ReLU)
    names = [n for n, _ in first.named_children()]
    assert names == ["vertical", "horizontal"]


def test_googlenet_aux_heads_are_optional():
    with_aux = build_model({"name": "googlenet", "aux_logits": True, "num_classes": 10})
    assert with_aux.aux1 is not None
    assert build_model({"name": "googlenet"}).aux1 is None


def test_decompose_at_full_rank_reproduces_the_dense_model():
    torch.manual_seed(1)
    dense = build_model({"name": "nin"}).double().eval()
    full = [min(conv.in_channels * conv.kernel_size[0], conv.kernel_size[1] * conv.out_channels)
            for _, conv in factorizable_convs(dense)]
    lowrank, errors = decompose_model(dense, {"ranks": full})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(lowrank.eval()(x), dense(x), rtol=1e-10, atol=1e-10)
    assert [e.rank for e in errors] == full and all(e.relative_error < 1e-12 for e in errors)
    assert not any(isinstance(m, LowRankConv2d) for m in dense.modules())  # the input is untouched


def test_decompose_reports_each_layers_error():
    torch.manual_seed(2)
    dense = build_model({"name": "alexnet"})
    lowrank, errors = decompose_model(dense, {"ranks": [8, 40, 60, 100, 200]})
    assert [e.name for e in errors] == [n for n, _ in factorizable_convs(dense)]
    for e in errors:
        original = dense.get_submodule(e.name).weight
        recomposed = lowrank.get_submodule(e.name).dense_weight()
        assert float((original - recomposed).detach().norm()) == pytest.approx(e.error, rel=1e-4)
        assert 0 < e.relative_error < 1


def test_convert_by_layer_name_and_keep_dense():
    model = build_model({"name": "nin"})
    names = [n for n, _ in factorizable_convs(model)]
    converted = convert(model, {"ranks": {names[1]: 30}})
    assert isinstance(converted.get_submodule(names[1]), LowRankConv2d)
    assert converted.get_submodule(names[1]).rank == 30
    assert isinstance(converted.get_submodule(names[2]), nn.Conv2d)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"name": "resnet50"}, r"unknown model 'resnet50'; available: alexnet, caffenet, googlenet, nin, tiny_caffenet, tiny_vgg, vgg16"),
        ({}, r"'name' is required"),
        ({"name": "vgg16", "depth": 19}, r"unknown key\(s\) \['depth'\]"),
        ({"name": "vgg16", "lowrank": {"preset": "nope"}}, r"vgg16 has no preset 'nope'; available: \['tai2016', 'tai2016_2.4x', 'tai2016_4.0x', 'tai2016_fc256'\]"),
        ({"name": "tiny_vgg", "lowrank": {"preset": "tai2016"}}, r"tiny_vgg has no preset 'tai2016'; available: none"),
        ({"name": "vgg16", "lowrank": {"rank": 3}}, r"unknown key\(s\) \['rank'\]"),
        ({"name": "vgg16", "lowrank": {"ranks": [5, 6]}}, r"one entry per factorizable conv: the model has 13, the list has 2"),
        ({"name": "vgg16", "lowrank": {"ranks": {"features.1": 4}}}, r"does not have .*\['features.1'\]; factorizable layers: \['features.0', 'features.2'"),
        ({"name": "vgg16", "lowrank": {"ranks": [5000] + [8] * 12}}, r"rank 5000 is out of range .* allowed 1\.\.9"),
        ({"name": "alexnet", "lowrank": {"preset": "tai2016", "speedup": 2}}, r"give exactly one of preset, ranks, speedup, energy \(got \['preset', 'speedup'\]\)"),
        ({"name": "googlenet", "batch_norm": False}, "always has BatchNorm"),
    ],
)
def test_bad_model_configs(cfg, message):
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_cost_table_command_prints_a_row_per_conv_and_totals(capsys):
    from lowrank_dist.speed.costs import main

    assert main(["--model", "nin", "--speedup", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| conv", "| cccp"))]
    assert [row.split(" | ")[0][2:] for row in rows] == NIN_NAMES  # NIN: 3 k×k convs and 6 1×1 convs
    assert sum("| dense |" in row for row in rows) == 7  # 1×1s and the first conv stay dense
    assert "**all 9 convs (2 factorized)**" in out


def test_cost_table_command_rejects_a_bad_preset(capsys):
    from lowrank_dist.speed.costs import main

    assert main(["--model", "nin", "--preset", "tai2016_2.4x"]) == 2
    assert "nin has no preset 'tai2016_2.4x'" in capsys.readouterr().err


def test_caffenet_at_the_authors_ranks_counts_ranks_over_groups():
    """CaffeNet-BN as the authors trained it: conv2/4/5 in 2 groups, their ranks totals over groups."""
    model = build_model({"name": "caffenet", "lowrank": {"preset": "tai2016"}})
    layers = [m for m in model.modules() if isinstance(m, LowRankConv2d)]
    assert [(m.rank, m.groups) for m in layers] == [(8, 1), (40, 2), (60, 1), (100, 2), (200, 2)]
    assert layers[1].vertical.weight.shape == (40, 48, 5, 1)  # 20 vertical filters per group of 48 channels
    assert layers[1].horizontal.weight.shape == (256, 20, 1, 5)
    rows = conv_costs(model, (3, 227, 227))
    conv2 = rows[1]  # per output pixel per group: K_g·(C_g·kh + N_g·kw) = 20·(48·5 + 128·5)
    assert conv2.lowrank_macs == 2 * 20 * (48 * 5 + 128 * 5) * 27 * 27
    assert conv2.dense_macs == 256 * 48 * 25 * 27 * 27
    dense, lowrank = sum(r.dense_macs for r in rows), sum(r.lowrank_macs for r in rows)
    assert round(dense / 1e6, 1) == 665.8 and round(lowrank / 1e6, 1) == 125.9
    assert round(dense / lowrank, 2) == 5.29 and round(conv2.speedup, 2) == 8.73
    x = torch.randn(2, 3, 227, 227)
    assert model.eval()(x).shape == (2, 1000)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in bns] == [4096, 4096]  # BN on fc6 and fc7


def test_caffenet_decomposes_group_by_group():
    torch.manual_seed(0)
    dense = build_model({"name": "caffenet", "batch_norm": False, "num_classes": 10}).double().eval()
    lowrank, errors = decompose_model(dense, {"ranks": [8, 40, 60, 100, 200]})
    for e in errors:
        conv = dense.get_submodule(e.name)
        per_group = e.rank // conv.groups
        spectra = singular_values(conv.weight, conv.groups).reshape(conv.groups, -1)
        discarded = float(spectra[:, per_group:].square().sum().sqrt())  # Eckart–Young, group by group
        assert e.error == pytest.approx(discarded, rel=1e-9)
        recomposed = lowrank.get_submodule(e.name).dense_weight()
        assert float((recomposed - conv.weight).detach().norm()) == pytest.approx(e.error, rel=1e-9)
    full = [c.groups * max_rank(c.weight, c.groups) for _, c in factorizable_convs(dense)]
    exact, _ = decompose_model(dense, {"ranks": full})
    x = torch.randn(1, 3, 99, 99, dtype=torch.float64)
    torch.testing.assert_close(exact.eval()(x), dense(x), rtol=1e-9, atol=1e-9)


def test_a_grouped_rank_must_be_a_multiple_of_the_groups():
    with pytest.raises(ValueError, match=r"features.5: rank 41 .* allowed a multiple of the groups, 2\.\.480"):
        build_model({"name": "caffenet", "lowrank": {"ranks": [8, 41, 60, 100, 200]}})


def test_vgg16_fc_batch_norm_and_the_three_rank_settings():
    model = build_model({"name": "vgg16", "batch_norm": True, "fc_batch_norm": True, "num_classes": 10})
    assert [type(m).__name__ for m in model.classifier] == [
        "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    speedups = {}
    for preset in ("tai2016", "tai2016_2.4x", "tai2016_4.0x"):
        rows = conv_costs(build_model({"name": "vgg16", "lowrank": {"preset": preset}}), (3, 224, 224))
        speedups[preset] = round(sum(r.dense_macs for r in rows) / sum(r.lowrank_macs for r in rows), 2)
    assert speedups == {"tai2016": 3.10, "tai2016_2.4x": 2.42, "tai2016_4.0x": 3.97}


def test_nin_preset_is_the_authors_low_rank_nin():
    model = build_model({"name": "nin", "lowrank": {"preset": "tai2016"}})
    layers = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankConv2d)}
    assert layers == {"features.0": 10, "features.8": 51}  # conv1 K=10, conv2 K=51, conv3 (3×3) dense
    assert isinstance(model.get_submodule("features.16"), nn.Conv2d)


def test_energy_policy_is_refused_on_random_weights():
    with pytest.raises(ValueError, match="energy policy reads the singular values of trained weights; mode 'factorized'"):
        build_model({"name": "vgg16", "lowrank": {"energy": 0.9}})


# -- layer names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    {"name": "vgg16"}, {"name": "vgg16", "batch_norm": True}, {"name": "alexnet"}, {"name": "alexnet", "batch_norm": True},
    {"name": "caffenet"}, {"name": "caffenet", "batch_norm": False}, {"name": "googlenet"},
    {"name": "googlenet", "aux_logits": True}, {"name": "nin"}, {"name": "nin", "batch_norm": True}, {"name": "tiny_vgg"},
])
def test_every_conv_layer_has_one_paper_name_dense_and_low_rank(cfg):
    dense = build_model(cfg)
    lowrank = build_model(cfg | {"lowrank": {"speedup": 2.0}})
    names = layer_names(dense)
    assert list(names) == [path for path, _ in conv_layers(dense) + fc_layers(dense)]  # convs, then fc6/fc7 if any
    assert len(set(names.values())) == len(names) and not set(names.values()) & set(names)  # unique, not paths
    assert layer_names(lowrank) == names  # a factorized layer keeps its name
    assert any(isinstance(m, LowRankConv2d) for _, m in conv_layers(lowrank))
    costs = conv_costs(lowrank, (3, 64, 64)) + fc_costs(lowrank)
    assert layer_names(lowrank) == {row.module: row.layer for row in costs} | {
        path: name for path, name in names.items() if path.startswith("aux")}  # the costs rows: what eval reaches


def test_the_paper_names_of_each_model():
    names = {model: list(layer_names(build_model({"name": model})).values()) for model in MODELS}
    assert names["vgg16"] == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                              "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3", "fc6", "fc7"]
    assert names["alexnet"] == names["caffenet"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert names["nin"] == NIN_NAMES
    assert names["tiny_vgg"] == ["conv1", "conv2", "conv3", "conv4"]
    googlenet = layer_names(build_model({"name": "googlenet", "aux_logits": True}))
    assert list(googlenet.values())[:9] == [
        "conv1/7x7_s2", "conv2/3x3_reduce", "conv2/3x3", "inception_3a/1x1", "inception_3a/3x3_reduce",
        "inception_3a/3x3", "inception_3a/5x5_reduce", "inception_3a/5x5", "inception_3a/pool_proj"]
    assert googlenet["inception4e.branch3.1.conv"] == "inception_4e/5x5"  # torchvision's 3×3 in the 5×5 slot
    assert googlenet["inception5b.branch4.1.conv"] == "inception_5b/pool_proj"
    assert (googlenet["aux1.conv.conv"], googlenet["aux2.conv.conv"]) == ("loss1/conv", "loss2/conv")
    assert len(googlenet) == 3 + 9 * 6 + 2


def test_a_model_not_built_by_the_registry_is_named_by_its_module_paths():
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    assert list(layer_names(model).values()) == [path for path, _ in conv_layers(model)][:13] == [
        f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]


def test_a_changed_model_is_not_misnamed():
    model = build_model({"name": "alexnet"})
    model.features[0] = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 64, 11, stride=4, padding=2))
    with pytest.raises(ValueError, match="alexnet: 6 conv layers, but the naming has 5 names"):
        layer_names(model)


def test_ranks_may_name_layers_by_module_path_or_paper_name():
    model = build_model({"name": "vgg16", "lowrank": {"ranks": {"conv1_2": 24, "features.5": 48, "conv5_3": None}}})
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankConv2d)} == {
        "features.2": 24, "features.5": 48}
    googlenet = build_model({"name": "googlenet", "lowrank": {"ranks": {"inception_3a/3x3": 64}}})
    assert googlenet.get_submodule("inception3a.branch2.1.conv").rank == 64
    dense = build_model({"name": "nin"})
    _, errors = decompose_model(dense, {"ranks": {"conv2": 51}})
    assert [(e.name, e.rank) for e in errors] == [("features.8", 51)]
    with pytest.raises(ValueError, match=r"ranks name the layer features.2 twice: as 'conv1_2' and as 'features.2'"):
        build_model({"name": "vgg16", "lowrank": {"ranks": {"conv1_2": 24, "features.2": 24}}})
    with pytest.raises(ValueError, match=r"does not have .*\['conv6_1'\]"):
        build_model({"name": "vgg16", "lowrank": {"ranks": {"conv6_1": 24}}})
