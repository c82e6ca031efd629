"""No file we load can run code: every checkpoint, export and dense state_dict is read with
`torch.load(weights_only=True)`.

A crafted checkpoint whose unpickling runs `touch MARKER` is refused by resume (named, and as the
run folder's latest), by `python -m lowrank_dist.evaluate` and as `model.lowrank.dense_checkpoint`:
one line naming the file, exit 2, and the marker never appears — until the test unpickles the file
the unsafe way itself, which proves the file really runs code. What we write (checkpoints,
exports) loads weights-only; a torchvision-style `.pth` state_dict still loads as a dense model; a
checkpoint of an older version is refused with the conversion command, and that conversion keeps
every value.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training.checkpoint import CheckpointManager, load_checkpoint, restore_rng_states
from lowrank_dist.evaluate import main as evaluate_main
from lowrank_dist.models import build_model
from lowrank_dist.train import main as train_main
from lowrank_dist.upgrade_checkpoint import main as upgrade_main

from . import helpers


class RunsCode:
    """Unpickling this runs `command` in a shell (what a malicious checkpoint would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=8, val_per_class=3, seed=0)
    return root


def write_config(folder: Path, root: Path, name: str = "r", **sections) -> Path:
    tree = {
        "run": {"out_dir": str(folder / "runs"), "name": name, "seed": 0, "device": "cpu", "log_every": 1,
                "speed_report": False},
        "model": {"name": "tiny_vgg", "dropout": 0.0, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 1, "lr": 0.05},
    }
    return helpers.write_config(folder / f"{name}.yaml", tree, sections)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic) -> Path:
    """A real checkpoint (one epoch, 2 steps) of the base config."""
    folder = tmp_path_factory.mktemp("trained")
    assert train_main(["--config", str(write_config(folder, synthetic))]) == 0
    return CheckpointManager(folder / "runs" / "r" / "checkpoints", 10).latest()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_what_we_write_loads_weights_only(trained):
    """Checkpoints (RNG states and config included) hold tensors and plain types only."""
    state = torch.load(trained, weights_only=True)
    assert state["step"] == 2 and state["config"]["model"]["name"] == "tiny_vgg"
    assert set(state["rng"]) >= {"torch", "numpy", "python"} and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    """Saved, loaded weights-only and restored, every generator continues exactly where it was."""
    import random

    from lowrank_dist.training.checkpoint import atomic_save, rng_states

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state: that must survive too
    atomic_save({"rng": rng_states()}, tmp_path / "rng.pt")
    expected = (np.random.randn(5), [random.random() for _ in range(5)], torch.rand(5))
    restore_rng_states(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (np.random.randn(5), [random.random() for _ in range(5)], torch.rand(5))
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path, synthetic, trained, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    state = torch.load(trained, weights_only=True)
    torch.save(state | {"note": RunsCode(f"touch {marker}")}, evil)  # looks like ours, plus one pickled call
    refused = re.compile(rf"^error: .*'{re.escape(str(evil))}' was not loaded: it needs Python objects beyond tensors"
                         r" and plain types \(posix\.system\)")

    # resume: named with --resume ...
    assert train_main(["--config", str(write_config(tmp_path, synthetic)), "--resume", str(evil)]) == 2
    assert refused.search(one_error_line(capsys))
    # ... and as the run folder's latest checkpoint
    folder = tmp_path / "runs" / "r" / "checkpoints"
    folder.mkdir(parents=True)
    latest = folder / "step_000000099.pt"
    latest.write_bytes(evil.read_bytes())
    assert train_main(["--config", str(write_config(tmp_path, synthetic))]) == 2
    assert re.search(rf"'{re.escape(str(latest))}' was not loaded", one_error_line(capsys))
    # evaluate: the file, and the run folder holding it
    assert evaluate_main([str(evil)]) == 2
    assert refused.search(one_error_line(capsys))
    assert evaluate_main([str(tmp_path / "runs" / "r")]) == 2
    assert "step_000000099.pt' was not loaded" in one_error_line(capsys)
    old_format = tmp_path / "evil_old_format.pt"  # torch's pre-zip format is read weights-only too
    torch.save(state | {"note": RunsCode(f"touch {marker}")}, old_format, _use_new_zipfile_serialization=False)
    assert evaluate_main([str(old_format)]) == 2
    assert re.search(r"evil_old_format\.pt' was not loaded: .* \(posix\.system\)", one_error_line(capsys))
    # a dense checkpoint to decompose: often someone else's file
    dense = tmp_path / "evil_dense.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": RunsCode(f"touch {marker}")}, dense)
    decomposed = write_config(tmp_path, synthetic, "d", model={"lowrank": {"mode": "decomposed", "speedup": 2.0,
                                                                           "dense_checkpoint": str(dense)}})
    assert train_main(["--config", str(decomposed)]) == 2
    assert re.search(rf"^error: model\.lowrank\.dense_checkpoint: checkpoint '{re.escape(str(dense))}' was not loaded",
                     one_error_line(capsys))
    # and in a fresh process: the exit code and a single line
    done = subprocess.run([sys.executable, "-m", "lowrank_dist.evaluate", str(evil)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and refused.search(done.stderr.strip()) and len(done.stderr.strip().splitlines()) == 1

    assert not marker.exists(), "nothing in a refused file may run"
    # the proof that these files do run code when unpickled the unsafe way (which the project never does)
    subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)", str(dense)],
                   capture_output=True, timeout=120)
    assert marker.exists()


def test_a_torchvision_style_state_dict_loads_as_the_dense_checkpoint(tmp_path, synthetic):
    """A plain `torch.save(model.state_dict(), 'x.pth')` (an OrderedDict of tensors, as torchvision
    publishes) is decomposed and fine-tuned."""
    dense = build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.0})
    torch.save(dense.state_dict(), tmp_path / "dense.pth")
    path = write_config(tmp_path, synthetic, "d", model={"lowrank": {"mode": "decomposed", "speedup": 2.0,
                                                                     "dense_checkpoint": str(tmp_path / "dense.pth")}},
                        run={"max_steps": 1})
    assert train_main(["--config", str(path)]) == 0
    state = load_checkpoint(CheckpointManager(tmp_path / "runs" / "d" / "checkpoints", 10).latest())
    assert state["ranks"] and any(".horizontal." in key for key in state["model"])


def legacy_copy(trained: Path, target: Path) -> dict:
    """`trained` as an older lowrank-dist wrote it: NumPy's RNG state as np.random.get_state()'s tuple."""
    state = torch.load(trained, weights_only=True)
    numpy_state = state["rng"]["numpy"]
    legacy = dict(state, rng=dict(state["rng"], numpy=(
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"],
        numpy_state["cached_gaussian"])))
    torch.save(legacy, target)
    return state


def test_an_older_checkpoint_is_refused_with_the_conversion_command_which_keeps_every_value(
        tmp_path, synthetic, trained, capsys):
    old = tmp_path / "old.pt"
    state = legacy_copy(trained, old)
    config = str(write_config(tmp_path, synthetic, "r", optim={"epochs": 2}))
    assert train_main(["--config", config, "--resume", str(old)]) == 2
    err = one_error_line(capsys)
    assert re.search(rf"'{re.escape(str(old))}' was written by an older lowrank-dist .* and was not loaded: if you trust"
                     rf" where it came from, convert it once with `python -m lowrank_dist\.upgrade_checkpoint"
                     rf" {re.escape(str(old))}`$", err), err

    assert upgrade_main([str(old)]) == 2  # no terminal to confirm on, no --yes: nothing is done
    assert "add --yes" in one_error_line(capsys)
    assert upgrade_main([str(old), "--yes"]) == 0
    assert "converted" in capsys.readouterr().out
    converted = torch.load(old, weights_only=True)
    assert pickle.dumps(converted["config"]) == pickle.dumps(state["config"])
    assert converted["model"].keys() == state["model"].keys()
    assert all(torch.equal(converted["model"][k], state["model"][k]) for k in state["model"])
    assert torch.equal(converted["rng"]["numpy"]["keys"], state["rng"]["numpy"]["keys"])
    assert {k: v for k, v in converted["rng"]["numpy"].items() if k != "keys"} == \
        {k: v for k, v in state["rng"]["numpy"].items() if k != "keys"}
    assert upgrade_main([str(old), "--yes"]) == 0 and "already weights-only" in capsys.readouterr().out
    assert train_main(["--config", config, "--resume", str(old)]) == 0  # and it resumes


def test_the_conversion_refuses_anything_but_an_older_checkpoint(tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "rng": {"numpy": np.zeros(3)}, "x": RunsCode(f"touch {marker}")}, evil)
    assert upgrade_main([str(evil), "--yes"]) == 2
    assert re.search(r"needs numpy\..*posix\.system: not a checkpoint of lowrank-dist, not converted", one_error_line(capsys))
    assert not marker.exists()
