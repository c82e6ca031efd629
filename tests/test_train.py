"""The training engine end to end on CPU: learning on real data, exact resume, atomic checkpoints,
projected and decomposed modes, schedules, TensorBoard."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_dist.config import load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.lowrank.svd import unfold
from lowrank_dist.training import checkpoint as checkpoint_module
from lowrank_dist.training.checkpoint import CheckpointManager, load_checkpoint
from lowrank_dist.training.optim import build_optimizer, lr_factor
from lowrank_dist.training.projection import Projector
from lowrank_dist.training.trainer import fit
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model, choose_ranks, layer_names
from lowrank_dist.train import main

from .helpers import write_config, write_digits

HAS_DALI = True
try:
    import nvidia.dali  # noqa: F401
except ImportError:  # pragma: no cover - the dev install has it
    HAS_DALI = False


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=24, val_per_class=6, seed=0)
    return root


def config(tmp_path, root, **sections):
    tree = {
        "run": {"out_dir": str(tmp_path / "runs"), "name": "t", "seed": 0, "device": "cpu", "log_every": 2},
        "model": {"name": "tiny_vgg", "dropout": 0.2, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 2, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.5},
    }
    return write_config(tmp_path / "cfg.yaml", tree, sections)


# -- learning on real data ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits(root)
    return root


BACKENDS = ["torchvision"] + (["dali"] if HAS_DALI else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_rank_cnn_learns_real_handwritten_digits(tmp_path, digits, backend, capsys):
    """scikit-learn's 1,797 real 8×8 digits as JPEGs, through the real data path: the factorized
    CNN must reach >= 90% val top-1; its dense twin, trained the same way, is reported beside it."""
    results = {}
    for variant, lowrank in (("low-rank", {"speedup": 2.0}), ("dense", None)):
        if variant == "dense" and backend != "torchvision":
            continue
        model = {"name": "tiny_vgg", "dropout": 0.0, "lowrank": lowrank}
        path = config(tmp_path / variant, digits, model=model,
                      data={"backend": backend, "dali_device": "cpu", "batch_size": 32, "min_crop_scale": 0.6,
                            "hflip": False, "workers": 2},
                      optim={"epochs": 5, "lr": 0.05, "warmup_epochs": 1})
        results[variant] = fit(load_config(path))
    with capsys.disabled():
        print("\n  digits, " + backend + ": " + ", ".join(f"{k} top-1 {r.top1:.1f}%" for k, r in results.items()))
    assert results["low-rank"].top1 >= 90.0


# -- resume and checkpoints -----------------------------------------------------------------------


def final_weights(folder: Path) -> dict:
    manager = CheckpointManager(folder / "checkpoints", 10)
    return load_checkpoint(manager.latest())["model"]


def test_resume_after_a_stop_is_bitwise_exact(tmp_path, synthetic):
    runs = {"run": {"checkpoint_every": 3, "keep_last": 10}}
    straight = fit(load_config(config(tmp_path / "a", synthetic, **runs)))
    path = config(tmp_path / "b", synthetic, **runs)
    stopped = fit(load_config(path, ["run.max_steps=5"]))  # stops mid-epoch 0 (6 steps per epoch)
    assert stopped.step == 5
    assert main(["--config", str(path)]) == 0  # resumes from the run folder's latest checkpoint
    a, b = final_weights(straight.folder), final_weights(tmp_path / "b" / "runs" / "t")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save({"weights": torch.ones(3)}, step=1)

    def dies_midway(payload, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_midway)
    with pytest.raises(OSError, match="No space left"):
        manager.save({"weights": torch.zeros(3)}, step=2)
    assert manager.latest().name == "step_000000001.pt"
    assert torch.equal(load_checkpoint(manager.latest())["weights"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001.pt"]  # no temp file left


def test_only_the_last_k_step_checkpoints_and_the_best_are_kept(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 6):
        manager.save({"step": step}, step, is_best=step == 2)
    assert [p.name for p in manager.step_files()] == ["step_000000004.pt", "step_000000005.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2


def test_resume_from_another_models_checkpoint_is_refused(tmp_path, synthetic, capsys):
    path = config(tmp_path, synthetic, optim={"epochs": 1}, run={"max_steps": 1})
    fit(load_config(path))
    other = config(tmp_path, synthetic, model={"lowrank": {"speedup": 3.0}})
    assert main(["--config", str(other)]) == 2
    assert "was written for model" in capsys.readouterr().err


# -- the low-rank modes ---------------------------------------------------------------------------


def rank_of(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(unfold(weight.detach().double()))


def test_projection_leaves_every_projected_kernel_at_rank_k():
    torch.manual_seed(0)
    model = build_model({"name": "nin"})
    ranks = choose_ranks(model, {"speedup": 3.0})
    projector = Projector(model, ranks)
    residuals = projector.project()
    assert set(residuals) == set(ranks) and all(0 < r < 1 for r in residuals.values())
    for name, k in ranks.items():
        s = rank_of(model.get_submodule(name).weight)
        assert s[k:].max() <= 1e-5 * s[0], name  # float32 kernels: rank <= K up to rounding
    assert all(r < 1e-5 for r in projector.project().values())  # projecting again changes nothing


def test_projected_training_exports_an_equivalent_factorized_model(tmp_path, synthetic):
    path = config(tmp_path, synthetic, model={"lowrank": {"mode": "projected", "speedup": 2.0, "project_every": 2}})
    result = fit(load_config(path))
    state = load_checkpoint(CheckpointManager(result.folder / "checkpoints", 3).latest())
    dense = build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.2})
    dense.load_state_dict(state["model"])
    for name, k in state["ranks"].items():
        s = rank_of(dense.get_submodule(name).weight)
        assert s[k:].max() <= 1e-5 * s[0], name
    exported = torch.load(result.exported, weights_only=True)  # exports are plain tensors and types
    lowrank = build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.2,
                           "lowrank": {"ranks": exported["ranks"], "factorize_first": True}})
    lowrank.load_state_dict(exported["model"])
    assert sum(isinstance(m, LowRankConv2d) for m in lowrank.modules()) == len(state["ranks"]) == 3
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(lowrank.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-4)


def test_decomposed_mode_fine_tunes_a_trained_dense_model(tmp_path, synthetic, capsys):
    dense_path = config(tmp_path / "dense", synthetic, model={"lowrank": None}, optim={"epochs": 1})
    dense = fit(load_config(dense_path))
    checkpoint = CheckpointManager(dense.folder / "checkpoints", 3).latest()
    path = config(tmp_path / "lr", synthetic, optim={"epochs": 1},
                  model={"lowrank": {"mode": "decomposed", "speedup": 2.0, "dense_checkpoint": str(checkpoint)}})
    result = fit(load_config(path))
    state = load_checkpoint(CheckpointManager(result.folder / "checkpoints", 3).latest())
    assert state["ranks"] and any(".horizontal." in key for key in state["model"])
    # a checkpoint of another model is refused with a clear message
    wrong = config(tmp_path / "nin", synthetic, optim={"epochs": 1},
                   model={"name": "nin", "lowrank": {"mode": "decomposed", "speedup": 2.0, "dense_checkpoint": str(checkpoint)}})
    assert main(["--config", str(wrong)]) == 2
    assert "holds a 'tiny_vgg' model; this config builds 'nin'" in capsys.readouterr().err


# -- optimisation details -------------------------------------------------------------------------


def test_lr_schedules():
    cfg = load_config_like(epochs=10, lr=0.1, warmup_epochs=1, schedule="cosine", min_lr=0.001)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.1)  # 1/10 of warm-up
    assert lr_factor(9, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 10, cfg) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, 10, cfg) == pytest.approx(0.01)
    step = load_config_like(epochs=10, schedule="step", milestones=[3, 6], gamma=0.1)
    assert [lr_factor(e * 10, 10, step) for e in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # fractional milestones: Caffe's iteration counts in epochs (CaffeNet's 100,000 × 256 images ≈ 19.98 epochs)
    caffe = load_config_like(epochs=10, schedule="step", milestones=[2.5], gamma=0.1)
    assert (lr_factor(24, 10, caffe), lr_factor(25, 10, caffe)) == pytest.approx((1, 0.1))
    # Caffe's "step" policy: ×gamma every step_every epochs, here floored at min_lr
    every = load_config_like(epochs=40, lr=0.1, schedule="step", step_every=1.5, gamma=0.5, min_lr=0.01)
    assert [lr_factor(round(e * 10), 10, every) for e in (0, 1.4, 1.5, 3.0, 4.4, 4.5, 30)] == pytest.approx(
        [1, 1, 0.5, 0.25, 0.25, 0.125, 0.1])
    decr = load_config_like(epochs=44, lr=0.1, schedule="linear_step", step_every=1.6, gamma=0.04, min_lr=0.001)
    assert [lr_factor(round(e * 10), 10, decr) for e in (0, 1.5, 1.6, 16, 38.4, 40, 43)] == pytest.approx(
        [1, 1, 0.96, 0.6, 0.04, 0.01, 0.01])


def test_linear_lr_scaling_follows_the_global_batch():
    model = nn.Linear(2, 2)
    linear = load_config_like(lr=0.1, lr_scaling="linear", lr_batch=256)
    assert build_optimizer(model, linear, global_batch=8192).param_groups[0]["lr"] == pytest.approx(3.2)
    assert build_optimizer(model, linear, global_batch=128).param_groups[0]["lr"] == pytest.approx(0.05)
    fixed = load_config_like(lr=0.1)  # lr_scaling "none" by default: the lr as given
    assert build_optimizer(model, fixed, global_batch=8192).param_groups[0]["lr"] == pytest.approx(0.1)


def load_config_like(**optim):
    from lowrank_dist.config import OptimConfig

    return OptimConfig(**optim)


def test_no_weight_decay_on_batch_norm_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, load_config_like(weight_decay=1e-4))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_gradient_accumulation_equals_the_big_batch(tmp_path, synthetic):
    """Without BN (whose statistics depend on the micro-batch), 2 × 8 accumulated = 1 × 16."""
    results = []
    for batch, accumulate in ((16, 1), (8, 2)):
        folder = tmp_path / f"b{batch}"
        path = config(folder, synthetic, model={"batch_norm": False, "dropout": 0.0},
                      data={"batch_size": batch}, optim={"epochs": 1, "accumulate": accumulate})
        results.append(final_weights(fit(load_config(path)).folder))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-5)


# -- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_has_the_expected_tags(tmp_path, synthetic):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = config(tmp_path, synthetic, model={"lowrank": {"mode": "projected", "speedup": 2.0, "project_every": 3}},
                  optim={"epochs": 1})
    result = fit(load_config(path))
    events = EventAccumulator(str(result.folder / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction", "data/skipped_images",
                "val/top1", "val/top5",
                "val/loss"):
        assert tag in scalars, tag
    # per-layer tags by the paper's layer names (tiny_vgg: conv1 … conv4; the first stays dense)
    assert {t for t in scalars if t.startswith(("projection/residual/", "ranks/"))} == {
        f"{kind}/conv{i}" for kind in ("projection/residual", "ranks") for i in (2, 3, 4)}
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "execution/plan/text_summary" not in events.Tags()["tensors"]  # projected mode: dense kernels, no plan
    # the end-of-run speed report: one row per factorized layer, measured beside the dense twin
    assert "speed/table/text_summary" in events.Tags()["tensors"]
    names = layer_names(build_model({"name": "tiny_vgg"}))
    for name in result_ranks(result):
        assert f"speed/layer/{names[name]}/forward" in scalars, name


def result_ranks(result) -> dict:
    return load_checkpoint(CheckpointManager(result.folder / "checkpoints", 3).latest())["ranks"]


def test_a_finished_low_rank_run_writes_its_speed_report_and_a_cut_short_one_does_not(tmp_path, synthetic):
    import json

    finished = fit(load_config(config(tmp_path / "a", synthetic, optim={"epochs": 1})))
    report = json.loads((finished.folder / "speed" / "speed.json").read_text())
    timed = {row["module"]: row for row in report["layers"]}
    assert set(result_ranks(finished)) <= set(timed) and len(timed) == 4  # tiny_vgg's four convs
    assert report["meta"]["input_shape"] == [16, 3, 32, 32]  # the training batch and crop
    # the run's execution plan (on the CPU by default every layer factorized) is the report's plan
    assert report["meta"]["plan"] == "the run's plan, precision.execution factorized"
    assert {row["execution"] for row in timed.values() if row["rank"] is not None} == {"factorized"}
    assert all(row["composed_train"]["median_s"] > 0 for row in timed.values() if row["rank"] is not None)
    assert (finished.folder / "execution_plan.md").read_text().startswith("### execution plan (factorized;")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finished.folder / "tensorboard"))
    events.Reload()
    assert "execution/plan/text_summary" in events.Tags()["tensors"]
    assert all((finished.folder / "speed" / f"speed.{kind}").is_file() for kind in ("md", "csv", "png"))
    cut = fit(load_config(config(tmp_path / "b", synthetic, optim={"epochs": 1}, run={"max_steps": 2})))
    assert not (cut.folder / "speed").exists()
    no_report = fit(load_config(config(tmp_path / "c", synthetic, optim={"epochs": 1}, run={"speed_report": False})))
    assert not (no_report.folder / "speed").exists()


def test_skipping_sgd_is_torch_sgd_and_skips_a_non_finite_update_on_the_device():
    """SkippingSGD (fused) follows torch's default SGD to within rounding, and a NaN gradient leaves
    weights and momentum bitwise as they were, with its found_inf flag set on the device."""
    from lowrank_dist.training.optim import SkippingSGD

    torch.manual_seed(0)
    reference = [torch.nn.Parameter(torch.randn(16, 8, dtype=torch.float64)) for _ in range(3)]
    ours = [torch.nn.Parameter(p.detach().float().clone()) for p in reference]
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sgd64, skipping = torch.optim.SGD(reference, **options), SkippingSGD(ours, **options)
    for _ in range(5):
        for p, q in zip(reference, ours):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.float()
        sgd64.step()
        skipping.step()
        assert skipping.skipped.item() == 0.0
    for p, q in zip(reference, ours):
        torch.testing.assert_close(q.double(), p.detach(), rtol=1e-6, atol=1e-6)
    before = [q.detach().clone() for q in ours]
    momentum = [skipping.state[q]["momentum_buffer"].clone() for q in ours]
    ours[1].grad[3, 4] = float("nan")
    skipping.step()
    assert skipping.skipped.item() == 1.0
    assert all(torch.equal(a, q) for a, q in zip(before, ours))
    assert all(torch.equal(m, skipping.state[q]["momentum_buffer"]) for m, q in zip(momentum, ours))
