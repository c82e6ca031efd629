"""`python -m lowrank_dist.evaluate`: a checkpoint of every mode, re-evaluated, gives the numbers the
run itself measured; split over processes, every val image still counts once; bad input, one line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_dist.config import load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training.checkpoint import CheckpointManager
from lowrank_dist.training.trainer import fit
from lowrank_dist.evaluate import main

from .helpers import write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=24, val_per_class=7, seed=0)  # 28 val images: not a batch multiple
    return root


def config(folder: Path, root: Path, name: str, **sections) -> Path:
    tree = {
        "run": {"out_dir": str(folder / "runs"), "name": name, "seed": 0, "device": "cpu", "log_every": 2,
                "speed_report": False},
        "model": {"name": "tiny_vgg", "dropout": 0.0, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 2, "lr": 0.05},
    }
    return write_config(folder / f"{name}.yaml", tree, sections)


def evaluated(capsys, target: Path, *argv: str) -> dict:
    """`python -m lowrank_dist.evaluate TARGET ARGV --json FILE`, in this process: the JSON it wrote."""
    json_path = target.parent / f"{target.name}.eval.json"
    assert main([str(target), *argv, "--json", str(json_path)]) == 0, capsys.readouterr().err
    assert "val top-1" in capsys.readouterr().out
    return json.loads(json_path.read_text())


def assert_same_metrics(got: dict, want) -> None:
    assert got["top1"] == pytest.approx(want.top1, abs=1e-9) and got["top5"] == pytest.approx(want.top5, abs=1e-9)
    assert math.isclose(got["loss"], want.loss, rel_tol=1e-5)


@pytest.mark.parametrize("lowrank", [
    None,
    {"speedup": 2.0},
    {"speedup": 2.0, "bn_between": True},
], ids=["dense", "factorized", "factorized-bn-between"])
def test_a_runs_final_checkpoint_evaluates_to_the_runs_own_numbers(tmp_path, synthetic, capsys, lowrank):
    result = fit(load_config(config(tmp_path, synthetic, "r", model={"lowrank": lowrank})))
    latest = CheckpointManager(result.folder / "checkpoints", 1).latest()
    got = evaluated(capsys, latest)
    assert_same_metrics(got, result)
    assert got["count"] == 28 and got["step"] == result.step and got["model"] == "tiny_vgg"


def test_a_run_folder_means_its_best_checkpoint(tmp_path, synthetic, capsys):
    result = fit(load_config(config(tmp_path, synthetic, "r")))
    best = result.folder / "checkpoints" / "best.pt"
    assert best.is_file()
    assert evaluated(capsys, result.folder)["checkpoint"] == str(best)


def test_projected_run_and_its_export_evaluate_alike(tmp_path, synthetic, capsys):
    """The projected run's last checkpoint holds dense kernels of rank K; the export holds their
    exact factors: both give the run's numbers."""
    path = config(tmp_path, synthetic, "p", model={"lowrank": {"mode": "projected", "speedup": 2.0, "project_every": 2}})
    result = fit(load_config(path))
    assert_same_metrics(evaluated(capsys, CheckpointManager(result.folder / "checkpoints", 1).latest()), result)
    exported = evaluated(capsys, result.exported)
    assert exported["top1"] == pytest.approx(result.top1, abs=1e-9)
    assert math.isclose(exported["loss"], result.loss, rel_tol=1e-4)


def test_decomposed_run_evaluates_from_the_ranks_it_recorded(tmp_path, synthetic, capsys):
    """Decomposed ranks came from the dense model's spectrum (energy policy): rebuilt from the
    checkpoint's record, not by decomposing the dense checkpoint again (which may be gone)."""
    dense = fit(load_config(config(tmp_path, synthetic, "dense", model={"lowrank": None}, optim={"epochs": 1})))
    dense_checkpoint = CheckpointManager(dense.folder / "checkpoints", 1).latest()
    path = config(tmp_path, synthetic, "d", optim={"epochs": 1},
                  model={"lowrank": {"mode": "decomposed", "energy": 0.9, "dense_checkpoint": str(dense_checkpoint)}})
    result = fit(load_config(path))
    dense_checkpoint.unlink()
    assert_same_metrics(evaluated(capsys, CheckpointManager(result.folder / "checkpoints", 1).latest()), result)


def test_two_processes_count_every_val_image_once(tmp_path, synthetic):
    result = fit(load_config(config(tmp_path, synthetic, "r")))
    out = tmp_path / "two.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "lowrank_dist.evaluate", str(result.folder), "--set", "data.batch_size=5", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["count"] == 28
    best = torch.load(result.folder / "checkpoints" / "best.pt", weights_only=True)
    assert got["top1"] == pytest.approx(best["best_top1"], abs=1e-9)


def test_bad_input_gives_one_line_and_exit_2(tmp_path, synthetic, capsys):
    result = fit(load_config(config(tmp_path, synthetic, "r", optim={"epochs": 1})))
    latest = CheckpointManager(result.folder / "checkpoints", 1).latest()
    nin = config(tmp_path, synthetic, "nin", model={"name": "nin"})
    empty = tmp_path / "empty"
    empty.mkdir()
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    cases = [
        ([str(tmp_path / "nope.pt")], f"checkpoint '{tmp_path / 'nope.pt'}' does not exist"),
        ([str(empty)], f"'{empty}' holds no checkpoint"),
        ([str(not_a_checkpoint)], "cannot be read (damaged, or not a checkpoint)"),
        ([str(latest), "--config", str(nin)], f"checkpoint '{latest}' does not fit model nin as configured"),
        ([str(latest), "--set", "data.root=/no/such/imagenet"], "data: data folder '/no/such/imagenet' does not exist"),
        ([str(latest), "--set", "optim.learning_rate=1"], "(its config): optim.learning_rate: unknown key"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, (argv, err)
