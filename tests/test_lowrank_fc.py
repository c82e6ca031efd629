"""Low-rank fully-connected layers: W (out×in) ≈ U·V by the truncated SVD, in float64; and
`model.lowrank.fc` (fc6/fc7 of AlexNet, CaffeNet, VGG-16 and tiny_caffenet) in its three modes,
through checkpoints, export and a short training run on real digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_dist.config import Config, ConfigError, config_from_dict, load_config
from lowrank_dist.evaluate import main as evaluate_main
from lowrank_dist.lowrank.layers import LowRankConv2d, LowRankLinear
from lowrank_dist.lowrank.svd import decompose_linear
from lowrank_dist.models import build_model, fc_layers, layer_names
from lowrank_dist.training.checkpoint import load_checkpoint
from lowrank_dist.training.model_setup import build_model_for
from lowrank_dist.training.trainer import fit

from .helpers import write_config, write_digits


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


# -- model.lowrank.fc: the config key, the three modes, checkpoints, export ----------------------------


def fc_config(model: dict, **lowrank) -> Config:
    tree = {"model": {"name": "tiny_caffenet"} | model, "data": {"root": "."}}
    tree["model"]["lowrank"] = lowrank
    return config_from_dict(tree, "fc.yaml", check_paths=False)


@pytest.mark.parametrize("model, lowrank, message", [
    ({"name": "vgg16"}, {"fc": {"ranks": {"fc8": 64}}},
     "fc.yaml: model: model.lowrank.fc.ranks: vgg16 has no FC layer 'fc8'; its factorizable FC layers: fc6, fc7"),
    ({"name": "googlenet"}, {"fc": {"ranks": {"fc6": 64}}},
     "fc.yaml: model: model.lowrank.fc: googlenet has no fully-connected layers to factorize; fc applies to alexnet,"
     " caffenet, tiny_caffenet, vgg16 (every classifier layer but the last)"),
    ({"name": "tiny_vgg"}, {"fc": {"speedup": 2.0}}, "model.lowrank.fc: tiny_vgg has no fully-connected layers"),
    ({}, {"fc": {"energy": 0.9}}, "model.lowrank.fc.energy: the energy policy reads the singular values"),
    ({}, {"fc": {"ranks": {"fc6": 8}, "speedup": 2.0}}, "model.lowrank.fc: give exactly one of ranks, speedup, energy"),
    ({}, {"preset": "fc32", "fc": {"speedup": 2.0}}, "model.lowrank.fc: preset 'fc32' sets the FC ranks already"),
    ({}, {}, "give exactly one of preset, ranks, speedup, energy (or only fc"),
])
def test_a_bad_fc_section_is_one_clear_error(model, lowrank, message):
    with pytest.raises(ConfigError) as error:
        fc_config(model, **lowrank)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_fc_alone_keeps_the_convs_dense_and_a_preset_may_carry_fc_ranks():
    only_fc = build_model_for(fc_config({}, fc={"ranks": {"fc6": 16, "fc7": None}}), 10)
    assert only_fc.ranks == {"14": 16}  # fc7 null: dense; no conv factorized
    assert not any(isinstance(m, LowRankConv2d) for m in only_fc.model.modules())
    preset = build_model_for(fc_config({}, preset="fc32"), 10)
    assert preset.ranks == {"4": 16, "8": 16, "14": 32, "18": 32}
    assert layer_names(preset.model) == {"0": "conv1", "4": "conv2", "8": "conv3", "14": "fc6", "18": "fc7"}


@pytest.mark.parametrize("name", ["caffenet", "alexnet", "vgg16"])
def test_factorized_fc_layers_have_k_times_in_plus_out_parameters(name):
    """The paper models' fc6/fc7 at rank 256 (the tai2016_fc256 preset): the parameters fall by exactly
    out·in − 256·(in + out) per layer, and the class layer stays dense."""
    dense = build_model({"name": name})
    lowrank = build_model_for(fc_config({"name": name}, preset="tai2016_fc256"), 1000).model
    convs = build_model({"name": name, "lowrank": {"preset": "tai2016"}})
    paths = [path for path, _ in fc_layers(dense)]
    assert [layer_names(dense)[p] for p in paths] == ["fc6", "fc7"]
    saved = 0
    for path in paths:
        linear, factorized = dense.get_submodule(path), lowrank.get_submodule(path)
        assert isinstance(factorized, LowRankLinear) and factorized.rank == 256
        out, inp = linear.weight.shape
        assert sum(p.numel() for p in factorized.parameters()) == 256 * (inp + out) + out
        saved += out * inp - 256 * (inp + out)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(lowrank) == count(convs) - saved
    assert isinstance(lowrank.classifier[-1], nn.Linear)


def test_the_fc_speedup_policy_is_the_largest_rank_reaching_it():
    setup = build_model_for(fc_config({}, fc={"speedup": 4.0}), 10)
    for path, (inp, out) in {"14": (512, 256), "18": (256, 256)}.items():
        k = setup.ranks[path]
        assert out * inp / (k * (inp + out)) >= 4.0 > out * inp / ((k + 1) * (inp + out))


def dense_checkpoint(tmp_path) -> tuple[Path, nn.Module]:
    torch.manual_seed(3)
    dense = build_model({"name": "tiny_caffenet"})
    path = tmp_path / "dense.pth"
    torch.save(dense.state_dict(), path)
    return path, dense


def test_decomposed_fc_layers_meet_the_eckart_young_bound(tmp_path):
    """Mode decomposed: each FC weight of the dense checkpoint replaced by its truncated SVD; the error
    equals sqrt(Σ_{k>K} s_k²) of a full fp64 SVD; the energy policy keeps the smallest K with the energy."""
    path, dense = dense_checkpoint(tmp_path)
    setup = build_model_for(fc_config({}, mode="decomposed", dense_checkpoint=str(path), fc={"ranks": {"fc6": 20, "fc7": 7}}), 10)
    assert setup.ranks == {"14": 20, "18": 7}
    for layer, rank in setup.ranks.items():
        weight = dense.get_submodule(layer).weight.detach().double()
        s = torch.linalg.svdvals(weight)
        bound = math.sqrt(float((s[rank:] ** 2).sum()))
        assert setup.decomposition_errors[layer] == pytest.approx(bound / float(s.norm()), rel=1e-9)
        factorized = setup.model.get_submodule(layer)
        error = float(torch.linalg.matrix_norm(weight - factorized.dense_weight().detach().double()))
        assert error == pytest.approx(bound, rel=1e-5)  # the factors are stored in fp32
        assert torch.equal(factorized.second.bias, dense.get_submodule(layer).bias)
    energy = build_model_for(fc_config({}, mode="decomposed", dense_checkpoint=str(path), fc={"energy": 0.5}), 10)
    s = torch.linalg.svdvals(dense.get_submodule("14").weight.detach().double()) ** 2
    kept = s.cumsum(0) / s.sum()
    assert energy.ranks["14"] == int((kept < 0.5).sum()) + 1


def test_projected_fc_weights_have_rank_k_after_projection(tmp_path):
    setup = build_model_for(fc_config({}, mode="projected", fc={"ranks": {"fc6": 12, "fc7": 5}}), 10)
    model = setup.model.double()
    assert isinstance(model.get_submodule("14"), nn.Linear) and setup.ranks == {"14": 12, "18": 5}
    residuals = setup.projector.project()
    assert set(residuals) == {"14", "18"} and all(r > 0.5 for r in residuals.values())  # random: far from rank K
    for layer, rank in setup.ranks.items():
        s = torch.linalg.svdvals(model.get_submodule(layer).weight.detach())
        assert float(s[rank]) <= 1e-12 * float(s[0])  # rank ≤ K to fp64 rounding
    exported = setup.projector.export(model.eval())
    assert {p: m.rank for p, m in exported.named_modules() if isinstance(m, LowRankLinear)} == setup.ranks
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(exported.eval()(images), model(images), rtol=0, atol=1e-10)


def test_a_checkpoint_with_factorized_fc_layers_loads_weights_only(tmp_path):
    """The state dict of a factorized FC layer has first/second weights, not weight: restoring builds
    the LowRankLinear from the checkpoint's ranks and loads strictly."""
    cfg = fc_config({}, preset="fc32")
    setup = build_model_for(cfg, 10)
    payload = {"model": setup.model.state_dict(), "ranks": setup.ranks, "config": cfg.resolved()}
    assert "14.first.weight" in payload["model"] and "14.weight" not in payload["model"]
    torch.save(payload, tmp_path / "saved.pt")
    saved = load_checkpoint(tmp_path / "saved.pt")
    restored = build_model_for(cfg, 10, saved=saved).model
    restored.load_state_dict(saved["model"])  # strict
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored.eval()(images), setup.model.eval()(images))


def test_a_model_with_low_rank_fc_layers_exports_to_onnx_equal_to_pytorch(tmp_path):
    """The inference model (BatchNorm1d folded into U, the layer as two linear layers) in float64, then
    its ONNX file on onnxruntime against the PyTorch model."""
    from lowrank_dist.deploy.forms import inference_model
    from lowrank_dist.deploy.runtimes import export_onnx, load_runner

    torch.manual_seed(0)
    model = build_model({"name": "tiny_caffenet", "lowrank": {"preset": "fc32"}}).eval()
    for module in model.modules():  # statistics far from the identity, so that a wrong fold shows
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    images = torch.randn(3, 3, 32, 32)
    deployed = inference_model(model.double())
    assert not any(isinstance(m, (LowRankLinear, nn.BatchNorm1d)) for m in deployed.modules())
    with torch.no_grad():
        want = model(images.double())
        assert (deployed(images.double()) - want).abs().max() <= 1e-12 * want.abs().max()
    path = tmp_path / "model.onnx"
    model = model.float()
    export_onnx(inference_model(model), path, images)
    with torch.no_grad():
        want = model(images).numpy()
    got = load_runner(path, "onnx")(images.numpy())
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_low_rank_fc_layers_learn_real_digits_about_as_well_as_dense(tmp_path_factory, capsys):
    """scikit-learn's digits, 4 epochs, one CPU process: tiny_caffenet with only fc6/fc7 low rank (rank
    32, convs dense: `fc` alone) within 3 points of its dense twin's val top-1; the low-rank run's best
    checkpoint then evaluates to its recorded top-1 through `python -m lowrank_dist.evaluate`."""
    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits(root)
    out = tmp_path_factory.mktemp("runs")
    results = {}
    for name, lowrank in (("dense", None), ("fc32", {"fc": {"ranks": {"fc6": 32, "fc7": 32}}})):
        tree = {"run": {"out_dir": str(out), "name": name, "seed": 0, "device": "cpu", "log_every": 10,
                        "speed_report": False},
                "model": {"name": "tiny_caffenet", "lowrank": lowrank},
                "data": {"root": str(root), "backend": "torchvision", "batch_size": 32, "image_size": 32, "workers": 0,
                         "min_crop_scale": 0.6, "hflip": False},
                "optim": {"epochs": 4, "lr": 0.05, "warmup_epochs": 0.5}}
        results[name] = fit(load_config(write_config(out / f"{name}.yaml", tree, {})))
    with capsys.disabled():
        print("\n  digits, tiny_caffenet, 4 epochs: " + ", ".join(f"{k} top-1 {r.top1:.1f}%" for k, r in results.items()))
    assert results["dense"].top1 >= 90.0
    assert results["fc32"].top1 >= results["dense"].top1 - 3.0
    report = out / "eval.json"
    assert evaluate_main([str(results["fc32"].folder), "--json", str(report)]) == 0  # its best.pt, weights only
    best = load_checkpoint(results["fc32"].folder / "checkpoints" / "best.pt")
    assert "14.first.weight" in best["model"] and best["ranks"] == {"14": 32, "18": 32}
    assert json.loads(report.read_text())["top1"] == pytest.approx(best["best_top1"])


def test_the_cost_table_counts_fc_layers_as_out_in_against_k_in_plus_out(capsys):
    from lowrank_dist.speed.costs import fc_costs, main as costs_main

    rows = fc_costs(build_model({"name": "caffenet", "lowrank": {"preset": "tai2016_fc256"}}))
    assert [(r.layer, r.kernel, r.rank) for r in rows] == [("fc6", (4096, 9216), 256), ("fc7", (4096, 4096), 256)]
    assert [(r.dense_macs, r.lowrank_macs) for r in rows] == [(4096 * 9216, 256 * (9216 + 4096)),
                                                             (4096 * 4096, 256 * (4096 + 4096))]
    assert [r.dense_params - r.lowrank_params for r in rows] == [4096 * 9216 - 256 * 13312, 4096 * 4096 - 256 * 8192]
    assert costs_main(["--model", "caffenet", "--preset", "tai2016_fc256"]) == 0
    out = capsys.readouterr().out
    assert "| fc6 | 4096×9216 | 256 |" in out and "**all 2 FC layers (2 factorized)**" in out
    assert "**all 5 convs (5 factorized)** | | | | **665.8** | **125.9**" in out  # the conv table is the paper's


def test_the_speed_report_times_fc_layers_and_estimates_the_all_reduce(tmp_path):
    """`python -m lowrank_dist.speed` as the README types it: fc6/fc7 rows beside the convs, and the ring
    all-reduce estimate from the counted bytes at the given link rate and GPU count."""
    import subprocess
    import sys

    from lowrank_dist.speed.network import expected_bytes_per_step, ring_allreduce_s

    done = subprocess.run([sys.executable, "-m", "lowrank_dist.speed", "--model", "tiny_caffenet", "--preset", "fc32",
                           "--device", "cpu", "--batch", "2", "--repeats", "1", "--warmup", "0", "--layers-only",
                           "--out", str(tmp_path / "speed"), "--link-gbps", "100", "--nodes", "2", "--gpus-per-node", "4"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    layers = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert {"conv2", "conv3", "fc6", "fc7"} <= set(layers)
    assert "| fc6 | 256×512 | 32 |" in done.stdout
    lowrank = build_model({"name": "tiny_caffenet", "lowrank": {"preset": "fc32"}})
    size = expected_bytes_per_step(lowrank, "none")
    assert size == 4 * sum(p.numel() for p in lowrank.parameters())
    assert (f"| low-rank | fp32 | {size / 4e6:.2f}M | {size / 1e6:.2f} MB | {ring_allreduce_s(size, 8, 100) * 1e3:.2f} ms |"
            in done.stdout)
    assert "2 nodes × 4 GPUs at 100 Gb/s (estimate from counted bytes)" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "lowrank_dist.speed", "--model", "tiny_caffenet", "--nodes", "0"],
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --nodes must be >= 1, got 0"
