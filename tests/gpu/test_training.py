"""The trainer on the device: from JPEGs in bf16 and fp16, with GradScaler and the skipping SGD;
no host syncs between sync points; a process group of one over NCCL, and exactly-once evaluation.

The data come through torchvision's back-end always, never DALI: a broken DALI (a decoder that
crashes the process) must not take these tests down with it. test_dali.py checks DALI on its own.
"""

from __future__ import annotations

import copy
import json
import math
import socket
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .common import REPO, needs

TRAINER_PACKAGES = ("pydantic", "yaml", "tensorboard", "tqdm")  # what the config and the trainer import


def trainer_config(root: Path, work: Path, device: torch.device, sizes: dict, name: str, steps: int, log_every: int,
                   amp: str = "bf16"):
    """configs/debug.yaml on the generated JPEGs, on this device, stopping after `steps` steps."""
    needs(*TRAINER_PACKAGES)
    from lowrank_dist.config import load_config

    sets = [f"data.root={root}", "data.backend=torchvision", f"data.workers={sizes['threads'] if device.type == 'cuda' else 0}",
            f"run.out_dir={work}", f"run.name={name}", f"run.max_steps={steps}", f"run.log_every={log_every}",
            f"run.device={device.type}", "run.checkpoint_every=0", f"precision.amp={amp}", "precision.channels_last=true"]
    if sizes["batch"]:
        sets.append(f"data.batch_size={sizes['batch']}")
    return load_config(REPO / "configs/debug.yaml", sets)


def logged_losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record["train/loss"] for record in map(json.loads, lines) if "train/loss" in record]


@pytest.fixture
def engines(monkeypatch) -> list:
    """The engines the trainer builds, in order (the trainer's own build_engine, recorded)."""
    needs(*TRAINER_PACKAGES)
    from lowrank_dist.training import trainer as trainer_module

    built, real = [], trainer_module.build_engine
    monkeypatch.setattr(trainer_module, "build_engine", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    return built


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_learns_from_jpegs(amp, jpegs, tmp_path, device, sizes, engines, record_property):
    """The debug model through the real trainer (fit), channels_last: every logged loss finite and
    the last window's below the first; in fp16 the weights stay finite under GradScaler."""
    if amp == "fp16" and device.type != "cuda":
        pytest.skip("fp16 needs a CUDA GPU (the trainer refuses it on the CPU)")
    from lowrank_dist.training.trainer import fit

    cfg = trainer_config(jpegs, tmp_path, device, sizes, f"train-{amp}", sizes["train_steps"], sizes["log_every"], amp)
    result = fit(cfg)
    losses = logged_losses(cfg.run.folder)
    record_property("losses", json.dumps(losses))
    record_property("val_top1", result.top1)
    assert result.step == sizes["train_steps"]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], f"the loss did not go down: first window {losses[0]:.4f}, last {losses[-1]:.4f}"
    engine = engines[-1]
    assert engine.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        record_property("grad_scale", engine.scaler.get_scale())
        assert 0 < engine.scaler.get_scale() < math.inf
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_grad_scaler_with_skipping_sgd_is_torch_sgd_and_skips_an_overflow(device):
    """SkippingSGD (fused; GradScaler hands it the scale and its inf flag) against torch's foreach
    SGD under GradScaler's own unscale-and-skip, on the same fp16 steps: the same weights, and a
    step with an infinite gradient leaves weights and momentum untouched in both."""
    if device.type != "cuda":
        pytest.skip("fp16 autocast with GradScaler is the GPU's (the trainer refuses fp16 on the CPU)")
    from lowrank_dist.models import build_model
    from lowrank_dist.runtime import logits_of
    from lowrank_dist.training.optim import SkippingSGD

    torch.manual_seed(0)
    ours = build_model({"name": "tiny_vgg"}).to(device).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(ours)
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    # a small initial scale: no overflow but the one made on purpose
    runs = [(ours, SkippingSGD(ours.parameters(), **options), torch.amp.GradScaler("cuda", init_scale=2.0**10)),
            (theirs, torch.optim.SGD(theirs.parameters(), foreach=True, **options),
             torch.amp.GradScaler("cuda", init_scale=2.0**10))]
    overflow = 3
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # both twins compute the same gradients
    try:
        for step in range(8):
            x = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (16,), device=device)
            before = [[p.detach().clone() for p in model.parameters()] for model, _, _ in runs]
            for model, optimizer, scaler in runs:
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = F.cross_entropy(logits_of(model(x)).float(), y)
                scaler.scale(loss).backward()
                if step == overflow:
                    grad = next(model.parameters()).grad
                    grad[(0,) * grad.dim()] = math.inf
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            if step == overflow:
                assert runs[0][1].skipped.item() == 1.0
                for (model, _, _), saved in zip(runs, before):
                    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), saved))
            else:
                assert runs[0][1].skipped.item() == 0.0
            assert runs[0][2].get_scale() == runs[1][2].get_scale()
    finally:
        torch.backends.cudnn.deterministic = deterministic
    for p, q in zip(ours.parameters(), theirs.parameters()):
        # fused and foreach SGD round differently (~1 ulp a step), and fp16 forward passes amplify that a little
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


# -- no host syncs between sync points -------------------------------------------------------------

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__repr__", "__format__")


class StepWatch:
    """While on, each host read of a tensor (READS, outside the data feed, as tests/test_host_syncs.py
    counts them) and, on CUDA, each synchronizing operation torch.cuda.set_sync_debug_mode("warn")
    reports, with where it came from, in the window it happened (windows end at the loop's sync points)."""

    def __init__(self, cuda: bool):
        self.cuda, self.on, self.window, self.depth = cuda, False, 0, 0
        self.events: list[dict] = []
        self.restore: list[tuple[object, str, object]] = []

    def _where(self) -> str | None:
        """file:line of the innermost project frame; None for the data feed's own reads (host
        tensors that never were on the device)."""
        frames = [f for f in traceback.extract_stack()[:-2] if "lowrank_dist" in f.filename]
        if frames and "lowrank_dist/data/" in frames[-1].filename.replace("\\", "/"):
            return None
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside lowrank_dist"

    def _wrap(self, owner, name: str, wrapper) -> None:
        self.restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper(getattr(owner, name)))

    def _counted(self, name: str):
        def wrapper(real):
            def counted(*args, **kwargs):
                if self.on and self.depth == 0:
                    where = self._where()
                    if where is not None:
                        self.events.append({"kind": "read", "what": name, "where": where, "window": self.window})
                self.depth += 1
                try:
                    return real(*args, **kwargs)
                finally:
                    self.depth -= 1
            return counted
        return wrapper

    def _paused(self, real):
        """The sync point itself reads on purpose: not counted; the next window starts after it."""
        def paused(*args, **kwargs):
            self.switch(False)
            try:
                return real(*args, **kwargs)
            finally:
                self.window += 1
                self.switch(True)
        return paused

    def _epoch(self, real):
        def epoch(*args, **kwargs):
            self.switch(True)
            try:
                return real(*args, **kwargs)
            finally:
                self.switch(False)
        return epoch

    def switch(self, on: bool) -> None:
        self.on = on
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    @contextmanager
    def watching(self):
        from lowrank_dist.training import loop as loop_module
        from lowrank_dist.training import trainer as trainer_module

        for name in READS:
            self._wrap(torch.Tensor, name, self._counted(name))
        self._wrap(loop_module, "sync", self._paused)
        self._wrap(trainer_module, "train_one_epoch", self._epoch)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            self.switch(False)
            for owner, name, real in reversed(self.restore):
                setattr(owner, name, real)
        for warning in caught:
            if "synchroniz" in str(warning.message):
                self.events.append({"kind": "cuda sync", "what": str(warning.message).splitlines()[0],
                                    "where": f"{Path(warning.filename).name}:{warning.lineno}", "window": None})


def test_no_host_syncs_between_sync_points(jpegs, tmp_path, device, sizes, record_property):
    """The trainer's loop, sync_steps steps with a sync point every sync_log_every: no host read
    and no CUDA synchronisation inside the windows between sync points. The sync-debug warnings
    carry no window (they arrive through the warnings module), so they count for the whole loop."""
    cfg = trainer_config(jpegs, tmp_path, device, sizes, "syncs", sizes["sync_steps"], sizes["sync_log_every"])
    from lowrank_dist.training.trainer import fit

    watch = StepWatch(device.type == "cuda")
    with watch.watching():
        fit(cfg)
    record_property("events", json.dumps(sorted({f"{e['kind']} {e['what']} at {e['where']}" for e in watch.events})))
    assert watch.window >= sizes["sync_steps"] // sizes["sync_log_every"]  # the sync points were reached
    assert watch.events == [], f"{len(watch.events)} host reads or CUDA syncs between sync points"


# -- NCCL --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _val_options(cfg, device: torch.device, rank: int, world_size: int) -> dict:
    return {"device": device, "channels_last": cfg.precision.channels_last, "rank": rank, "world_size": world_size,
            "train": False}


def test_a_group_of_one_trains_over_nccl_and_evaluates_each_image_once(jpegs, tmp_path, device, sizes, engines,
                                                                       record_property):
    """A group of one (NCCL on the GPU, gloo on the CPU) through process_group, the trainer on it
    (DDP; the sync points' and the evaluation's all-reduces through the backend); then the val set
    evaluated whole in the group and over 3 shards: every image counted once."""
    import torch.distributed as dist

    from lowrank_dist.data import build_loaders
    from lowrank_dist.training.distributed import DistContext, Rendezvous, process_group
    from lowrank_dist.training.evaluate import evaluate
    from lowrank_dist.training.trainer import fit

    cfg = trainer_config(jpegs, tmp_path, device, sizes, "nccl", sizes["nccl_steps"], sizes["nccl_steps"])
    with process_group(Rendezvous(master_port=free_port()), device.type, 120, group_of_one=True) as ctx:
        backend, world_size, distributed = dist.get_backend(), dist.get_world_size(), ctx.distributed
        result = fit(cfg, ctx)
        model = engines[-1].module
        wrapped_in = type(engines[-1]._ddp).__name__
        whole = evaluate(model, build_loaders(cfg.data, **_val_options(cfg, device, 0, 1)).val, ctx)
    shards = [evaluate(model, build_loaders(cfg.data, **_val_options(cfg, device, rank, 3)).val, DistContext())
              for rank in range(3)]
    record_property("backend", backend)
    assert backend == ("nccl" if device.type == "cuda" else "gloo")
    assert world_size == 1 and distributed and result.step == sizes["nccl_steps"]
    assert wrapped_in == "DistributedDataParallel"
    num_val = sizes["classes"] * sizes["val_per_class"]
    assert whole["count"] == num_val and sum(r["count"] for r in shards) == num_val, (whole, shards)
    # each image's verdict does not depend on its shard, up to a near-tie flipped by another batch
    # composition (another cuDNN algorithm): at most one image
    from_shards = sum(r["top1"] * r["count"] for r in shards) / num_val
    assert abs(whole["top1"] - from_shards) * num_val / 100 <= 1.0 + 1e-9, (whole, shards)
