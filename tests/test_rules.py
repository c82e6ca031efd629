"""Each rule is checked in one place: the config's cross-checks reject before anything is built,
the library's guards use the same definitions, and ValueErrors found at set-up become ConfigErrors."""

import importlib.util

import pytest
import torch

from lowrank_dist.config import ConfigError, config_errors, config_from_dict
from lowrank_dist.models import build_model
from lowrank_dist.lowrank.ranks import SPEEDUP_ABOVE, EnergyFraction, TargetSpeedup
from lowrank_dist.runtime import select_device
from lowrank_dist.training.checkpoint import CheckpointError


def tree(**sections) -> dict:
    base = {"model": {"name": "tiny_vgg", "lowrank": {"speedup": 2.0}}, "data": {"root": "/unused"}}
    return base | sections


def validate(config: dict):
    return config_from_dict(config, "cfg.yaml", check_paths=False)


@pytest.fixture
def deepspeed_installed(monkeypatch):
    """The engine's own check asks whether deepspeed is importable; these checks come after it."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))


@pytest.mark.parametrize("sections,message", [
    ({"model": {"name": "tiny_vgg", "lowrank": {"mode": "projected", "speedup": 2.0}}},
     "cfg.yaml: model.lowrank.mode 'projected' needs distributed.engine 'ddp': DeepSpeed keeps its own fp32 copy"),
    ({"precision": {"compile": True}},
     "cfg.yaml: precision.compile: not supported with distributed.engine 'deepspeed' (use 'ddp')"),
])
def test_what_deepspeed_cannot_do_is_refused_by_the_config(deepspeed_installed, sections, message):
    with pytest.raises(ConfigError) as error:
        validate(tree(distributed={"engine": "deepspeed"}, **sections))
    assert str(error.value).startswith(message)
    validate(tree(**sections))  # the same settings under DDP are fine


def test_the_config_and_the_policies_hold_speedup_and_energy_to_the_same_ranges():
    with pytest.raises(ConfigError, match="model.lowrank.speedup: Input should be greater than 1"):
        validate(tree(model={"name": "tiny_vgg", "lowrank": {"speedup": SPEEDUP_ABOVE}}))
    with pytest.raises(ValueError, match="target speedup must be > 1, got 1.0"):
        TargetSpeedup(SPEEDUP_ABOVE)
    TargetSpeedup(SPEEDUP_ABOVE + 1e-9)
    with pytest.raises(ConfigError, match="model.lowrank.energy: Input should be less than or equal to 1"):
        validate(tree(model={"name": "tiny_vgg", "lowrank": {"mode": "decomposed", "energy": 1.01,
                                                               "dense_checkpoint": "/unused.pt"}}))
    with pytest.raises(ValueError, match=r"energy fraction must be in \(0, 1\], got 1.01"):
        EnergyFraction(1.01)


def test_one_policy_is_phrased_the_same_by_the_config_and_by_build_model():
    message = r"give exactly one of preset, ranks, speedup, energy \(got \['ranks', 'speedup'\]\)"
    with pytest.raises(ConfigError, match="model.lowrank: " + message):
        validate(tree(model={"name": "tiny_vgg", "lowrank": {"ranks": [4, 4, 4, 4], "speedup": 2.0}}))
    with pytest.raises(ValueError, match=message):
        build_model({"name": "tiny_vgg", "lowrank": {"ranks": [4, 4, 4, 4], "speedup": 2.0}})


def test_config_errors_rewrites_plain_value_errors_only():
    with pytest.raises(ConfigError, match=r"^model\.lowrank\.ranks: layer x: rank 0 is out of range$"):
        with config_errors("model.lowrank.ranks"):
            raise ValueError("layer x: rank 0 is out of range")
    with pytest.raises(ConfigError, match=r"^model\.lowrank\.preset: none here$"):  # names its key already
        with config_errors("model.lowrank.ranks"):
            raise ValueError("model.lowrank.preset: none here")
    with pytest.raises(CheckpointError):  # our own errors say what they are about
        with config_errors("model"):
            raise CheckpointError("model.lowrank.dense_checkpoint: file 'x' does not exist")


def test_one_device_rule_for_training_evaluation_and_reports():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device: must be cpu or cuda, got meta"):
        select_device("meta", key="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^run.device: 'cuda' was asked for but no CUDA GPU is visible"):
            select_device("cuda")
