"""Every shipped config (configs/*.yaml, the modern recipes, and configs/paper/*.yaml, the authors')
loads, builds its model the way training does, reads its data through its own pipeline and takes
one optimizer step: on tiny images on the CPU, so a broken config is found here, not on a cluster."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowrank_dist.config import load_config
from lowrank_dist.training.distributed import DistContext
from lowrank_dist.runtime import logits_of
from lowrank_dist.training.optim import build_optimizer, learning_rate
from lowrank_dist.training.trainer import build_model_for, loaders_for
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model

from .helpers import write_cifar_batches, write_jpeg_folder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
PAPER = {  # what each of the authors' recipes must say (their prototxts and solvers)
    "caffenet_bn_lr": ("caffenet", "factorized", 0.1, 1e-4, "caffe", 227),
    "caffenet_bn": ("caffenet", None, 0.1, 1e-4, "caffe", 227),
    "caffenet": ("caffenet", None, 0.01, 5e-4, "caffe", 227),
    "caffenet_decompose": ("caffenet", "decomposed", 0.001, 5e-4, "caffe", 227),
    "vgg16_bn_lr": ("vgg16", "factorized", 0.01, 1e-4, "caffe", 224),  # CaffeNet-BN's solver at VGG's lr (header)
    "vgg16_decompose": ("vgg16", "decomposed", 0.01, 5e-4, None, 224),
    "nin_cifar10_lr": ("nin", "factorized", 0.01, 5e-4, "none", 32),
    "nin_cifar10": ("nin", None, 0.01, 5e-4, "none", 32),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imagenet = write_jpeg_folder(root / "imagenet", {"train": [2, 2], "val": [1, 1]})
    rng = np.random.default_rng(0)
    cifar = write_cifar_batches(root / "cifar", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
                                np.arange(10) % 10, rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4))
    return {"imagenet": imagenet, "cifar10": cifar, "root": root}


def test_the_paper_recipes_are_shipped_as_the_authors_wrote_them():
    paper = {p.stem: load_config(p, check_paths=False) for p in (REPO / "configs/paper").glob("*.yaml")}
    assert set(paper) == set(PAPER)
    for name, (model, mode, lr, decay, augment, size) in PAPER.items():
        cfg = paper[name]
        assert cfg.model.name == model and (cfg.model.lowrank.mode if cfg.model.lowrank else None) == mode, name
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum) == (lr, decay, 0.9), name
        assert cfg.data.augment == augment and cfg.data.image_size == size, name
        if cfg.model.lowrank is not None:
            assert cfg.model.lowrank.preset == "tai2016", name
    assert paper["vgg16_bn_lr"].model.fc_batch_norm and paper["vgg16_bn_lr"].model.batch_norm
    assert paper["nin_cifar10_lr"].data.format == "cifar10" and not paper["nin_cifar10_lr"].data.hflip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_trains_one_step_on_tiny_images(path, folders, tmp_path):
    cfg = load_config(path, check_paths=False)
    cifar = cfg.data.format == "cifar10"
    overrides = [f"data.root={folders['cifar10' if cifar else 'imagenet']}", "data.batch_size=2", "data.workers=0",
                 "data.backend=torchvision", "precision.amp=none", "precision.compile=false", "run.speed_report=false"]
    if not cifar:
        overrides.append("data.image_size=64")  # CaffeNet's conv1 (11×11, stride 4) needs more than 32
    if cfg.model.lowrank is not None and cfg.model.lowrank.mode == "decomposed":
        # a trained dense model to decompose: here an untrained one of the same shape
        dense = build_model(cfg.model.build_dict(num_classes=2) | {"lowrank": None})
        torch.save(dense.state_dict(), tmp_path / "dense.pt")
        overrides.append(f"model.lowrank.dense_checkpoint={tmp_path / 'dense.pt'}")
    cfg = load_config(path, overrides)
    torch.manual_seed(0)
    loaders = loaders_for(cfg, DistContext(), torch.device("cpu"))
    setup = build_model_for(cfg, len(loaders.classes))
    model = setup.model.train()
    if cfg.model.lowrank is not None and cfg.model.lowrank.mode != "projected":
        assert any(isinstance(m, LowRankConv2d) for m in model.modules())
    optimizer = build_optimizer(model, cfg.optim, global_batch=cfg.data.batch_size)
    for group in optimizer.param_groups:  # the schedule's first step (warm-up, cosine, Caffe's steps)
        group["lr"] = learning_rate(cfg.optim, cfg.optim.lr, len(loaders.train), 0, 0)
    images, labels = next(iter(loaders.train.epoch(0)))
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(logits_of(model(images)), labels)  # GoogLeNet: the main head
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
