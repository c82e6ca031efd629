"""Config loading: every shipped config validates; bad configs give one message and exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowrank_dist.config import ConfigError, apply_override, load_config
from lowrank_dist.models import build_model
from lowrank_dist.train import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_the_paper_and_baseline_configs_are_all_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"alexnet_lr", "vgg16_lr", "googlenet_lr", "alexnet", "vgg16", "googlenet", "debug"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate_and_build(path):
    cfg = load_config(path, check_paths=False)
    model = build_model(cfg.model.build_dict(num_classes=10))
    assert sum(p.numel() for p in model.parameters()) > 0
    if path.stem.endswith("_lr"):
        assert cfg.model.lowrank is not None and cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 1e-4
        assert cfg.data.batch_size == 256 and cfg.optim.momentum == 0.9


def test_overrides_are_typed_and_repeatable(tmp_path):
    cfg = load_config(REPO / "configs/vgg16_lr.yaml",
                      ["optim.lr=0.05", "precision.compile=true", "optim.milestones=[10, 20]", f"data.root={tmp_path}"])
    assert cfg.optim.lr == 0.05 and cfg.precision.compile is True and cfg.optim.milestones == [10, 20]
    assert cfg.data.root == tmp_path and cfg.run.name == "vgg16_lr"
    tree = {}
    apply_override(tree, "a.b.c=null")
    assert tree == {"a": {"b": {"c": None}}}


def write(tmp_path, tree) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def base(tmp_path) -> dict:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {"model": {"name": "tiny_vgg", "lowrank": {"speedup": 2.0}}, "data": {"root": str(tmp_path / "data")}}


BAD = [  # (change to the base config, expected message)
    (lambda t: t.update(optimizer={"lr": 1}), r"optimizer: unknown key; allowed here: data, distributed, model, optim, precision, run"),
    (lambda t: t.setdefault("optim", {}).update(learning_rate=0.1), r"optim.learning_rate: unknown key; allowed here: .*lr"),
    (lambda t: t.setdefault("optim", {}).update(epochs="ten"), r"optim.epochs: Input should be a valid integer.*'ten'"),
    (lambda t: t.setdefault("optim", {}).update(lr=-0.1), r"optim.lr: Input should be greater than 0 \(got -0.1\)"),
    (lambda t: t["model"].update(name="resnet50"), r"model.name: unknown model 'resnet50'; available: alexnet"),
    (lambda t: t["data"].update(root="/no/such/imagenet"), r"data: data folder '/no/such/imagenet' does not exist"),
    (lambda t: t["model"]["lowrank"].update(energy=0.9), r"give exactly one of preset, ranks, speedup, energy"),
    (lambda t: t["model"].update(lowrank={"ranks": [0, 4]}), r"ranks must be >= 1"),
    (lambda t: t["model"]["lowrank"].update(mode="decomposed"), r"needs dense_checkpoint"),
    (lambda t: t["model"]["lowrank"].update(mode="pruned"), r"model.lowrank.mode: Input should be 'factorized', 'decomposed' or 'projected'"),
    (lambda t: t.setdefault("optim", {}).update(schedule="linear"), r"optim.schedule: Input should be 'cosine', 'step' or 'linear_step'"),
    (lambda t: t.setdefault("optim", {}).update(epochs=2, warmup_epochs=2), r"warmup_epochs \(2.0\) must be shorter than epochs \(2\)"),
    (lambda t: t["data"].update(backend="pil"), r"data.backend: Input should be 'auto', 'dali' or 'torchvision'"),
    (lambda t: t["data"].update(batch_size=0), r"data.batch_size: Input should be greater than or equal to 1"),
    (lambda t: t.setdefault("run", {}).update(name="../escape"), r"run.name: run name '../escape' must be a plain folder name"),
    (lambda t: t["model"]["lowrank"].update(speedup=0.5), r"model.lowrank.speedup: Input should be greater than 1"),
    (lambda t: t.update(model=None), r"model: Input should be a valid dictionary"),
    (lambda t: t.pop("data"), r"data: Field required"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_configs_name_the_key(tmp_path, change, message, capsys):
    tree = base(tmp_path)
    change(tree)
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and len(err.strip().splitlines()) == 1


def test_bad_command_lines(tmp_path, capsys):
    path = write(tmp_path, base(tmp_path))
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "config file '.*missing.yaml' does not exist"),
        (["--config", str(path), "--set", "optim.lr"], r"--set 'optim.lr': expected KEY.PATH=VALUE"),
        (["--config", str(path), "--set", "data.root.x=1"], r"data.root is not a section"),
        (["--config", str(path), "--resume", str(tmp_path / "nope.pt")], r"--resume: checkpoint '.*nope.pt' does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        import re

        assert re.search(message, err), err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_a_bad_config_exits_2_without_a_traceback(tmp_path):
    tree = base(tmp_path)
    tree["optim"] = {"lr": -1}
    path = write(tmp_path, tree)
    done = subprocess.run([sys.executable, "-m", "lowrank_dist.train", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "optim.lr: Input should be greater than 0" in done.stderr


@pytest.mark.parametrize("mode", ["factorized", "projected"])
def test_energy_policy_needs_trained_weights(tmp_path, mode):
    path = tmp_path / "energy.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "nin", "lowrank": {"mode": mode, "energy": 0.9}},
                                    "data": {"root": str(tmp_path)}}))
    with pytest.raises(ConfigError, match=f"model.lowrank.energy: the energy policy .* mode '{mode}' chooses ranks"):
        load_config(path)
    tree = yaml.safe_load(path.read_text())
    tree["model"]["lowrank"] |= {"mode": "decomposed", "dense_checkpoint": str(tmp_path / "dense.pt")}
    path.write_text(yaml.safe_dump(tree))
    assert load_config(path).model.lowrank.energy == 0.9  # decomposed: the dense model's spectrum


def test_a_moved_or_dropped_key_is_one_line_naming_where_it_went(tmp_path, capsys):
    """model.lowrank.execution moved to precision.execution; the factorise_first spelling is gone."""
    tree = base(tmp_path)
    tree["model"]["lowrank"]["execution"] = "auto"
    path = write(tmp_path, tree)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.lowrank.execution has moved to precision.execution" in err[0], err
    del tree["model"]["lowrank"]["execution"]
    tree["precision"] = {"execution": "auto"}
    assert load_config(write(tmp_path, tree)).precision.execution == "auto"
    tree["model"]["lowrank"]["factorise_first"] = True
    with pytest.raises(ConfigError, match="factorise_first"):
        load_config(write(tmp_path, tree))
