"""Deployment: BatchNorm folded exactly (float64 against the unfolded model), the inference forms
compute the layer, `python -m lowrank_dist.export` writes ONNX/.pt2 files that onnxruntime and torch
run to the PyTorch model's logits — for the debug run (configs/debug.yaml) and for a plain state
dict decomposed on the way, at a fixed and a dynamic batch — refuses to call a wrong export done,
and `python -m lowrank_dist.speed.inference` writes its report."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lowrank_dist.config import load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.deploy import fold
from lowrank_dist.deploy.forms import inference_form, inference_model, padded_rank
from lowrank_dist.deploy.runtimes import conv_graph, export_onnx, load_runner, ort_runner, ort_session
from lowrank_dist.export import main
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model, decompose_model
from lowrank_dist.speed.inference import plan_inference
from lowrank_dist.training.distributed import DistContext
from lowrank_dist.training.restore import open_checkpoint, restore_model
from lowrank_dist.training.trainer import fit, loaders_for

ROOT = Path(__file__).resolve().parents[1]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine parameters far from the identity, so that a fold that drops a term shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
    return model


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("cfg, size, plans", [
    ({"name": "tiny_vgg", "lowrank": {"ranks": {"conv2": 20, "conv3": 40, "conv4": 50}, "bn_between": True}}, 32,
     ["factorized", "padded"]),
    ({"name": "caffenet", "lowrank": {"preset": "tai2016"}}, 67, ["factorized", "padded", "composed"]),
    ({"name": "googlenet", "aux_logits": True, "lowrank": {"speedup": 2.0}}, 48, ["factorized", "padded", "composed"]),
], ids=["tiny-bn-between", "caffenet-bn", "googlenet-aux"])
def test_folded_batchnorm_is_the_unfolded_model_in_float64(cfg, size, plans):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(cfg)).double().eval()
    images = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = model(images)
    for plan in plans:
        deployed = inference_model(model, plan)
        assert count(deployed, nn.modules.batchnorm._BatchNorm) == 0 and deployed.unfolded_batchnorm == []
        assert count(deployed, nn.Dropout) == 0 and count(deployed, LowRankConv2d) == 0
        assert getattr(deployed, "aux1", None) is None  # GoogLeNet's auxiliary heads dropped
        with torch.no_grad():
            got = deployed(images)
        assert (got - want).abs().max() <= 1e-12 * want.abs().max(), plan
    assert count(model, nn.modules.batchnorm._BatchNorm) > 0  # the model passed in is untouched


def test_a_batchnorm_with_no_conv_before_it_is_kept_and_still_right():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1),
                                              nn.BatchNorm2d(2))).double().eval()
    deployed = inference_model(model)
    assert deployed.unfolded_batchnorm == ["2"] and deployed.folded_batchnorm == {"4": "3"}
    images = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(deployed(images), model(images), rtol=0, atol=1e-13)


def test_each_inference_form_and_its_onnx_graph_compute_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 40, (3, 5), stride=(2, 1), padding=(1, 2), groups=2)
    layer = LowRankConv2d.from_conv(conv, rank=36).eval()  # 18 per group: padded to 32 per group
    assert padded_rank(layer) == 64 and padded_rank(LowRankConv2d.from_conv(conv, rank=30)) == 30  # 15 < 16: kept
    assert inference_form(layer, "padded").vertical.out_channels == 64
    images = torch.randn(2, 32, 11, 13)
    with torch.no_grad():
        want = layer(images)
        for form in ("factorized", "padded", "composed"):
            module = inference_form(layer, form).eval()
            assert torch.allclose(module(images), want, atol=1e-5)
            run = ort_runner(ort_session(conv_graph(module, tuple(images.shape))))
            assert np.allclose(run(images.numpy()), want.numpy(), atol=1e-5), form


def test_caffenet_with_ceil_mode_pooling_and_lrn_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model({"name": "caffenet", "lowrank": {"preset": "tai2016"}})).eval()
    images = torch.randn(2, 3, 99, 99)
    path = tmp_path / "caffenet.onnx"
    export_onnx(inference_model(model), path, images)
    with torch.no_grad():
        want = model(images).numpy()
    got = load_runner(path, "onnx")(images.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_plans_without_timing_and_a_layer_that_cannot_compose():
    model = build_model({"name": "tiny_vgg", "lowrank": {"ranks": {"conv2": 16, "conv3": 32}, "bn_between": True}})
    plan = plan_inference(model, (3, 32, 32), 1, "ort-cpu", "composed")
    assert plan.forms == {"4": "factorized", "8": "factorized"}  # BatchNorm between: no composed form
    assert all("no composed form" in layer.reason for layer in plan.layers)
    model = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})
    assert set(plan_inference(model, (3, 32, 32), 1, "torch", "composed").forms.values()) == {"composed"}
    with pytest.raises(ValueError, match="cannot time ort-cuda here"):
        plan_inference(model, (3, 32, 32), 1, "ort-cuda", "auto")


# ----------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=16, val_per_class=6, seed=0)
    return root


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory, synthetic) -> Path:
    """The README's debug config (tiny_vgg, factorized) trained one epoch on the synthetic set."""
    folder = tmp_path_factory.mktemp("debug")
    cfg = load_config(ROOT / "configs/debug.yaml", [
        f"data.root={synthetic}", f"run.out_dir={folder}", "run.device=cpu", "run.speed_report=false",
        "data.backend=torchvision", "data.workers=0", "optim.epochs=1", "optim.warmup_epochs=0",
        "precision.execution=factorized"])
    return fit(cfg).folder


def export(*argv: str) -> subprocess.CompletedProcess:
    """`python -m lowrank_dist.export ARGV`, as the README types it."""
    return subprocess.run([sys.executable, "-m", "lowrank_dist.export", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_the_debug_run_exports_to_onnx_and_pt2_equal_to_pytorch(tmp_path, debug_run, synthetic):
    out = tmp_path / "deployed"
    done = export(str(debug_run), "--out", str(out), "--format", "onnx,pt2", "--check-images", "16")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "onnx: 16 images" in done.stdout and "pt2: 16 images" in done.stdout
    info = json.loads((out / "model.json").read_text())
    assert info["model"] == "tiny_vgg" and set(info["ranks"]) == {"conv2", "conv3", "conv4"}
    assert info["classes"] == {"count": 4, "names": sorted(p.name for p in (synthetic / "train").iterdir())}
    assert info["input"]["shape"] == [1, 3, 32, 32] and info["output"]["shape"] == [1, 4]
    logged = [json.loads(line) for line in (debug_run / "metrics.jsonl").read_text().splitlines()]
    val = [entry for entry in logged if entry.get("step") == info["source"]["step"] and "val/top1" in entry][-1]
    assert info["source"]["val_top1"] == val["val/top1"] and info["source"]["val_top5"] == val["val/top5"]
    assert info["preprocessing"]["crop"] == {"center": 32} and info["preprocessing"]["resize"]["shorter_side"] == 37
    assert info["preprocessing"]["normalize"]["mean"] == [123.675, 116.28, 103.53]
    for name, entry in info["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    assert {"model.onnx", "model.pt2", "plan.md", "plan.json", "model.json"} == {p.name for p in out.iterdir()}
    assert info["formats"]["onnx"]["check"]["passed"] and info["formats"]["onnx"]["folded_batchnorm"]

    # independently of the command's own check: the files against the checkpoint's model on the run's images
    saved = open_checkpoint(debug_run)
    loaders = loaders_for(saved.cfg, DistContext(), torch.device("cpu"), train=False)
    model = restore_model(saved, len(loaders.classes)).eval()
    images = next(iter(loaders.val))[0][:1].clone()
    with torch.no_grad():
        want = model(images).numpy()
    for fmt, name in (("onnx", "model.onnx"), ("pt2", "model.pt2")):
        got = load_runner(out / name, fmt)(images.numpy())
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), fmt
    assert sum(node.op_type == "BatchNormalization" for node in onnx.load(out / "model.onnx").graph.node) == 0


def test_a_plain_state_dict_is_decomposed_and_exported_with_a_dynamic_batch(tmp_path, synthetic):
    torch.manual_seed(0)
    dense = randomize_batchnorm(build_model({"name": "tiny_vgg"})).eval()
    state = tmp_path / "tiny.pth"
    torch.save(dense.state_dict(), state)
    out = tmp_path / "deployed"
    done = export("--from-state-dict", str(state), "--model", "tiny_vgg", "--speedup", "2", "--data", str(synthetic),
                  "--out", str(out), "--batch", "dynamic", "--check-images", "12", "--execution", "composed")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    decomposed, errors = decompose_model(dense, {"speedup": 2.0})
    for error in errors:  # each layer's relative error printed beside its form
        assert any(line.startswith(f"| conv") and f"{error.relative_error:.4f}" in line for line in done.stdout.splitlines())
    graph = onnx.load(out / "model.onnx").graph
    assert sum(node.op_type == "Conv" for node in graph.node) == 4  # every layer composed: one conv each
    run = load_runner(out / "model.onnx", "onnx")
    for batch in (1, 3):  # the batch is dynamic
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = decomposed.eval()(images).numpy()
        assert np.abs(run(images.numpy()) - want).max() <= 1e-5 * np.abs(want).max()
    info = json.loads((out / "model.json").read_text())
    assert info["input"]["shape"] == ["batch", 3, 32, 32]
    assert {layer["layer"]: layer["forms"]["onnx"] for layer in info["layers"]} == {
        "conv2": "composed", "conv3": "composed", "conv4": "composed"}


def test_an_export_that_computes_something_else_exits_1_and_leaves_nothing(tmp_path, debug_run, monkeypatch, capsys):
    real = fold.fold_into

    def forgets_the_shift(layer, bn):  # a plausible bug: β left out of the folded bias
        bn.bias.data.zero_()
        real(layer, bn)

    monkeypatch.setattr(fold, "fold_into", forgets_the_shift)
    out = tmp_path / "deployed"
    assert main([str(debug_run), "--out", str(out), "--check-images", "8", "--execution", "factorized"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "max relative difference" in captured.out
    assert "nothing written" in captured.err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


class RunsCode:
    """Unpickling this runs `command` in a shell (what a malicious state dict would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    evil, witness = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"weight": RunsCode(f"touch {witness}")}, evil)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.onnx").write_text("mine")
    state = tmp_path / "tiny.pth"
    torch.save(build_model({"name": "tiny_vgg", "batch_norm": False}).state_dict(), state)
    cases = [
        (["--out", str(tmp_path / "x")], "give a run folder or checkpoint, or --from-state-dict"),
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "does not exist"),
        ([str(tmp_path), "--out", str(taken)], f"--out '{taken}' exists"),
        ([str(tmp_path), "--out", str(tmp_path / "x"), "--format", "tflite"], "--format: unknown tflite"),
        ([str(tmp_path), "--out", str(tmp_path / "x"), "--batch", "0"], "--batch must be a positive number or 'dynamic'"),
        (["--from-state-dict", str(state), "--out", str(tmp_path / "x")], "--from-state-dict needs --model"),
        (["--from-state-dict", str(state), "--model", "tiny_vgg", "--out", str(tmp_path / "x")], "needs a rank policy"),
        (["--from-state-dict", str(state), "--model", "tiny_vgg", "--speedup", "2", "--out", str(tmp_path / "x")],
         "does not fit tiny_vgg"),
        (["--from-state-dict", str(evil), "--model", "tiny_vgg", "--speedup", "2", "--out", str(tmp_path / "x")],
         "which could run code"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, (argv, err)
    assert (taken / "model.onnx").read_text() == "mine" and not witness.exists()


def test_the_inference_speed_report_writes_its_files(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "lowrank_dist.speed.inference", "--model", "tiny_vgg", "--speedup", "2", "--image-size", "32",
         "--batch", "4", "--repeats", "3", "--warmup", "1", "--runtimes", "torch,ort-cpu,ort-cuda", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"inference.md", "inference.csv", "inference.json", "inference.png"}
    table = (out / "inference.md").read_text()
    assert "| conv2 |" in table and "| ort-cpu |" in table and "ort-cuda not timed" in table
    rows = list(csv.DictReader(open(out / "inference.csv")))
    assert {(row["runtime"], row["batch"]) for row in rows} == {("torch", "1"), ("torch", "4"), ("ort-cpu", "1"),
                                                               ("ort-cpu", "4")}
    assert {row["layer"] for row in rows} == {"conv2", "conv3", "conv4", "whole model"}
    data = json.loads((out / "inference.json").read_text())
    assert set(data["skipped"]) == {"ort-cuda"}
    for result in data["results"]:
        for layer in result["plan"]["layers"]:  # the plan's form is the fastest one measured
            times = {"composed": layer["dense_ms"], "factorized": layer["factorized_ms"], "padded": layer["padded_ms"]}
            assert layer["form"] == min((t, form) for form, t in times.items() if t is not None)[1]
