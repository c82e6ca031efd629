"""The supported-versions floor (pyproject.toml's lower bounds, `make test-floor`) and the guards that
let the code run on it and on the newest releases alike. Each guard's two paths are tested: the
main suite runs the newest torch and DALI, the floor leg torch 2.11 and DALI 2.0; a path the
installed version lacks is skipped, saying so.

Also here: the trainer's cudnn.benchmark decision, a pure function, so a machine without CUDA
checks it.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from lowrank_dist.config import config_from_dict, load_config
from lowrank_dist.data import dali as dali_module
from lowrank_dist.models import build_model
from lowrank_dist.training import engines, trainer
from lowrank_dist.training.distributed import DistContext, Rendezvous, process_group

from .helpers import loaders_from, write_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3])


# -- the floor itself ------------------------------------------------------------------------------------------


def floor_pins() -> dict[str, str]:
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "floor_pins.py")], capture_output=True, text=True,
                            check=True)
    return dict(line.split("==") for line in result.stdout.split())


def test_every_dependency_has_a_floor_and_torch_2_11_is_supported():
    pins = floor_pins()
    assert {"torch", "torchvision", "nvidia-dali-cuda130", "deepspeed", "pydantic", "tensorboard"} <= set(pins)
    assert version_tuple(pins["torch"]) <= (2, 11, 0) and version_tuple(pins["torchvision"]) <= (0, 26, 0)


def test_a_dependency_without_a_lower_bound_is_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\ndependencies = ["torch"]\n[project.optional-dependencies]\n'
                                             'dali = []\ndeepspeed = []\nsubmitit = []\ndev = []\n')
    result = subprocess.run([sys.executable, str(ROOT / ".ci" / "floor_pins.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().endswith("dependency 'torch' is not 'name>=version': the supported-versions floor"
                                          " needs one lower bound per dependency")


@pytest.mark.skipif("FLOOR_PINS" not in os.environ, reason="runs in `make test-floor` (FLOOR_PINS names its pin file)")
def test_the_floor_leg_runs_on_exactly_the_floor_versions():
    pins = dict(line.split("==") for line in Path(os.environ["FLOOR_PINS"]).read_text().split())
    installed = {name: importlib.metadata.version(name) for name in pins}
    assert {n: version_tuple(v) for n, v in installed.items()} == {n: version_tuple(v) for n, v in pins.items()}
    assert not engines.DDP_HAS_FORWARD_SYNC_BUFFERS, \
        "the floor's torch has forward_sync_buffers: ddp_without_buffer_sync's older path is dead code now"


# -- DDP: rank 0's buffers once at the start, never at a forward ------------------------------------------------


def test_the_ddp_keyword_follows_the_torch_version():
    """forward_sync_buffers came with torch 2.13: the main suite (newest torch) takes that path,
    the floor leg (torch 2.11) the broadcast_buffers one."""
    assert engines.DDP_HAS_FORWARD_SYNC_BUFFERS == (version_tuple(torch.__version__) >= (2, 13, 0))


def _tiny_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _rank_inputs(rank: int) -> list[torch.Tensor]:
    data = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(4, 3, 8, 8, generator=data) * (1 + rank) + rank for _ in range(2)]


def _buffer_sync_rank(rank: int, port: int, out: str, keywords: list[str]) -> None:
    """Each DDP path this torch has, in turn, in one process group (one spawn for both paths)."""
    results = {}
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=60):
        for keyword in keywords:
            engines.DDP_HAS_FORWARD_SYNC_BUFFERS = keyword == "forward_sync_buffers"  # the path to take
            torch.manual_seed(rank)  # each rank starts from its own weights and BN statistics
            model = _tiny_bn_model()
            model[1].running_mean.fill_(rank + 1.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.13 deprecates broadcast_buffers
                ddp = engines.ddp_without_buffer_sync(model)
            wrapped = {k: v.clone() for k, v in model.state_dict().items()}
            for images in _rank_inputs(rank):
                ddp(images).sum().backward()
            after = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            results[keyword] = {"wrapped": wrapped, "after": after}
    torch.save(results, Path(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def buffer_sync(tmp_path_factory) -> list[dict]:
    """Per rank, per DDP path this torch has: the state right after wrapping, and the BN buffers
    after two steps on the rank's own batches."""
    out = tmp_path_factory.mktemp("buffer_sync")
    keywords = ["broadcast_buffers"] + (["forward_sync_buffers"] if engines.DDP_HAS_FORWARD_SYNC_BUFFERS else [])
    mp.spawn(_buffer_sync_rank, args=(free_port(), str(out), keywords), nprocs=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("keyword", ["forward_sync_buffers", "broadcast_buffers"])
def test_ddp_broadcasts_buffers_once_and_then_each_rank_keeps_its_own(buffer_sync, keyword):
    """Wrapping gives every rank rank 0's weights and BN statistics; after that each rank's running
    statistics follow its own batches only (the trainer averages them before evaluating), with
    either keyword: forward_sync_buffers=False (torch >= 2.13), or broadcast_buffers=False and our
    own broadcast (older torch)."""
    if keyword not in buffer_sync[0]:
        pytest.skip(f"torch {torch.__version__} has no forward_sync_buffers (it came with 2.13)")
    ranks = [results[keyword] for results in buffer_sync]
    for key, value in ranks[0]["wrapped"].items():
        assert torch.equal(ranks[1]["wrapped"][key], value), key
    assert torch.equal(ranks[0]["wrapped"]["1.running_mean"], torch.ones(4))  # rank 0's, not rank 1's 2.0
    for rank, result in enumerate(ranks):  # what this rank's batches alone make of the shared start
        model = _tiny_bn_model()
        model.load_state_dict(result["wrapped"])
        for images in _rank_inputs(rank):
            model(images)
        for key, value in result["after"].items():
            assert torch.allclose(value, model.state_dict()[key], rtol=1e-5, atol=1e-6), (rank, key)
    assert not torch.allclose(ranks[0]["after"]["1.running_mean"], ranks[1]["after"]["1.running_mean"])


# -- torch.compile through the engine -----------------------------------------------------------------------


def _initial_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.0})


def _engine_weights(tmp_path: Path, compile: bool, ctx: DistContext) -> dict[str, torch.Tensor]:
    cfg = config_from_dict({"model": {"name": "tiny_vgg"}, "data": {"root": str(tmp_path), "batch_size": 4},
                            "optim": {"lr": 0.1, "weight_decay": 0.0}, "precision": {"compile": compile}},
                           "test", check_paths=False)
    model = _initial_model()
    engine = engines.DDPEngine(model, cfg, ctx, torch.device("cpu"), steps_per_epoch=3)
    data = torch.Generator().manual_seed(1)
    for _ in range(3):
        images, labels = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 4, (4,), generator=data)
        with engine.micro_batch(boundary=True):
            engine.backward(nn.functional.cross_entropy(engine.forward(images), labels))
        engine.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compiled_ddp_training_takes_the_eager_steps(tmp_path):
    """precision.compile on a DDP-wrapped model (a gloo group of one: DDP, its reducer and the
    compiled graph all run): three SGD steps land where eager ones do, to float round-off."""
    with process_group(Rendezvous(master_port=free_port()), "cpu", 60, group_of_one=True) as ctx:
        eager = _engine_weights(tmp_path, False, ctx)
        compiled = _engine_weights(tmp_path, True, ctx)
    torch._dynamo.reset()
    moved = max((eager[k] - v).abs().max().item() for k, v in _initial_model().state_dict().items())
    assert moved > 1e-3  # the steps did change the weights
    for key, value in eager.items():
        assert torch.allclose(compiled[key], value, rtol=1e-4, atol=1e-5), key


# -- DALI: pixels as stored, whatever the EXIF orientation ----------------------------------------------------


def _gradient(width: int, height: int) -> Image.Image:
    """Red grows left to right, green top to bottom: any rotation changes every crop."""
    x = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    y = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    rgb = torch.stack([x, y, torch.full_like(x, 128)], dim=2).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy())


@pytest.mark.skipif(not dali_module.dali_available(), reason="needs DALI")
def test_dali_decodes_exif_rotated_jpegs_as_stored_like_pil(tmp_path):
    """A JPEG whose EXIF says "rotate 90°": both back-ends crop the stored pixels (the crop
    windows are planned in those coordinates). DALI 2.4 would rotate it unless told not to
    (adjust_orientation=False); DALI 2.0 has no such argument and never rotates. The control: the
    same picture stored already rotated gives other crops."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    for root, image, extra in ((tmp_path / "tagged", _gradient(96, 48), {"exif": exif.tobytes()}),
                               (tmp_path / "rotated", _gradient(96, 48).transpose(Image.Transpose.ROTATE_270), {})):
        for split in ("train", "val"):
            (root / split / "c0").mkdir(parents=True)
            image.save(root / split / "c0" / "0.JPEG", quality=95, **extra)
    batches = {}
    for name in ("tagged", "rotated"):
        for backend in ("torchvision", "dali"):
            loaders = loaders_from(tmp_path / name, backend=backend, dali_device="cpu", batch_size=1, image_size=16,
                                   workers=0 if backend == "torchvision" else 1)
            batches[name, backend] = next(iter(loaders.val))[0]
    assert (batches["tagged", "dali"] - batches["tagged", "torchvision"]).abs().mean() < 0.02
    assert (batches["rotated", "dali"] - batches["rotated", "torchvision"]).abs().mean() < 0.02
    assert (batches["tagged", "dali"] - batches["rotated", "dali"]).abs().mean() > 0.5


# -- cudnn.benchmark --------------------------------------------------------------------------------------------


def test_cudnn_benchmark_is_on_for_one_image_size_on_a_gpu_only():
    assert trainer.cudnn_benchmark_for(torch.device("cuda", 0), {224}) is True
    assert trainer.cudnn_benchmark_for(torch.device("cuda"), {224, 288}) is False  # each new size timed again
    assert trainer.cudnn_benchmark_for(torch.device("cpu"), {224}) is False


def test_the_trainer_sets_cudnn_benchmark_from_its_decision(tmp_path, monkeypatch):
    """set_up applies the decision for its device and image size (decided as for a GPU here, to see it set)."""
    from lowrank_dist.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2, seed=0)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", {
        "run": {"out_dir": str(tmp_path / "runs"), "name": "t", "device": "cpu", "speed_report": False},
        "model": {"name": "tiny_vgg"},
        "data": {"root": str(tmp_path / "data"), "backend": "torchvision", "batch_size": 4, "image_size": 32,
                 "workers": 0},
        "optim": {"epochs": 1},
    }, {}))
    asked = []
    monkeypatch.setattr(trainer, "cudnn_benchmark_for", lambda device, sizes: asked.append((device, sizes)) or True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    trainer.make_run_folder(cfg)  # what fit does before set_up
    run, _ = trainer.set_up(cfg, DistContext(), None, None)
    run.log.close()
    assert asked == [(torch.device("cpu"), {32})] and torch.backends.cudnn.benchmark is True
