"""Gradient communication on 2 gloo ranks: PowerSGD through torch's hook with its state in
checkpoints (a stopped and resumed run ends bitwise equal to an uninterrupted one), the bytes the
hooks all-reduce counted exactly, and PowerSGD learning real digits as well as plain all-reduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from lowrank_dist.config import ConfigError, config_from_dict, load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.models import build_model
from lowrank_dist.training.checkpoint import CheckpointManager, load_checkpoint
from lowrank_dist.speed.network import expected_bytes_per_step, factor_layout
from lowrank_dist.training.comm import CommHook
from lowrank_dist.training.distributed import DistContext, Rendezvous, process_group
from lowrank_dist.training.engines import DDPEngine
from lowrank_dist.training.trainer import communication_line, fit

from .helpers import write_config, write_digits
from .test_distributed import free_port

POWERSGD = {"grad_compression": "powersgd", "powersgd": {"rank": 2, "start_iter": 2}}


def run_config(tmp_path: Path, root: Path, name: str, **sections) -> Path:
    tree = {
        "run": {"out_dir": str(tmp_path / "runs"), "name": name, "seed": 0, "device": "cpu", "log_every": 1,
                "speed_report": False, "keep_last": 20},
        "model": {"name": "tiny_vgg", "dropout": 0.2, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 2, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.5},
        "distributed": POWERSGD,
    }
    return write_config(tmp_path / f"{name}.yaml", tree, sections)


def _fit_ranks(rank: int, port: int, jobs: list) -> None:
    """Each job (config path, overrides) in turn, on 2 gloo ranks in one process group."""
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=120) as ctx:
        for path, overrides in jobs:
            fit(load_config(path, overrides), ctx)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=24, val_per_class=6, seed=0)
    return root


def test_a_run_stopped_and_resumed_mid_epoch_with_powersgd_ends_bitwise_equal(tmp_path, synthetic):
    """2 ranks × 3 steps per epoch, 2 epochs, PowerSGD from step 2 (error feedback, warm start).
    Stopped after step 4 (mid-epoch 1: DDP's first step after the resume runs on its initial
    buckets, then rebuilds them) and resumed: weights, optimizer, and PowerSGD's state (iteration,
    RNG, Q factors, each rank's error feedback) equal the uninterrupted run's bit for bit."""
    # both checkpoint every 2 steps: a checkpoint averages the ranks' BN statistics, in both runs alike
    straight, stopped = (run_config(tmp_path, synthetic, name, run={"checkpoint_every": 2}) for name in ("straight", "stopped"))
    mp.spawn(_fit_ranks, args=(free_port(), [(straight, []), (stopped, ["run.max_steps=4"]), (stopped, [])]), nprocs=2)
    runs = tmp_path / "runs"
    at_stop = load_checkpoint(CheckpointManager(runs / "stopped" / "checkpoints", 20).path_for(4))
    assert at_stop["batch"] == 1 and at_stop["engine"]["powersgd"]["iter"] == 4  # mid-epoch, compressing
    assert at_stop["engine"]["powersgd"]["factors"]  # Q factors to warm-start from
    for rank in range(2):
        finals = []
        for name in ("straight", "stopped"):
            manager = CheckpointManager(runs / name / "checkpoints", 20)
            step = manager.latest()
            assert step.name == "step_000000006.pt"
            finals.append((load_checkpoint(step), manager.load_shard(step, rank, 2)["engine"]))
        (a, own_a), (b, own_b) = finals
        assert own_a["error"] and own_a["error"].keys() == own_b["error"].keys()
        assert_same(own_a, own_b, "error feedback")
        assert_same(a["model"], b["model"], "model")
        assert_same(a["engine"], b["engine"], "engine")
    # comm/bytes_per_step (log_every 1): the plain steps send the whole fp32 bucket, then the factors
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "straight" / "tensorboard"))
    events.Reload()
    sent = {e.step: e.value for e in events.Scalars("comm/bytes_per_step")}
    model = build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.2, "lowrank": {"speedup": 2.0}})
    assert sent == {1: expected_bytes_per_step(model, "none"), 2: expected_bytes_per_step(model, "none")} | {
        step: expected_bytes_per_step(model, "powersgd", rank=2) for step in range(3, 7)}
    errors = [CheckpointManager(runs / "straight" / "checkpoints", 20).load_shard(
        runs / "straight" / "checkpoints" / "step_000000006.pt", r, 2)["engine"]["error"] for r in range(2)]
    assert any(not torch.equal(errors[0][k]["error"], errors[1][k]["error"]) for k in errors[0])  # per rank


def assert_same(x, y, where: str) -> None:
    if isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for key in x:
            assert_same(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    else:
        assert x == y, where


class FakeBucket:
    """What the hook reads of torch's GradBucket when assembling: its index and parameters."""

    def __init__(self, index: int, params: list):
        self._index, self._params = index, params

    def index(self) -> int:
        return self._index

    def parameters(self) -> list:
        return self._params


def test_powersgd_state_survives_a_change_of_bucket_layout():
    """The state saved per parameter from two buckets (as DDP lays them out at first) is put back
    into one bucket of another order (as after a rebuild): every parameter's error feedback and
    P/Q factors land where torch's hook reads them in the new layout, and come out the same."""
    model = _two_layers()
    params = dict(model.named_parameters())
    hook = CommHook(model, "powersgd", powersgd.PowerSGDState(None, 2, 2))
    layout = {0: ["2.bias", "2.weight"], 1: ["0.bias", "0.weight"]}  # fc2's weight: not compressed at rank 2
    generator = torch.Generator().manual_seed(0)
    for index, names in layout.items():
        hook.layout[index] = tuple(names)
        hook.state.error_dict[index] = torch.randn(sum(params[n].numel() for n in names), generator=generator)
        factors = factor_layout({n: params[n].shape for n in names}, 2, 2.0)
        hook.state.p_memory_dict[index] = torch.randn(sum(p for p, _ in factors.values()), generator=generator)
        hook.state.q_memory_dict[index] = torch.randn(sum(q for _, q in factors.values()), generator=generator)
    hook.state.iter = 7
    shared, own = hook.state_dict()
    assert set(shared["factors"]) == {"0.weight"} and shared["factors"]["0.weight"]["q"].numel() == 20 * 2
    assert torch.equal(own["error"]["0.weight"]["error"], hook.state.error_dict[1][30:])

    restored = CommHook(model, "powersgd", powersgd.PowerSGDState(None, 2, 2))
    restored.load_state_dict(shared, own)
    assert restored.state.iter == 7 and not restored.state.error_dict
    assert restored.state_dict()[1]["error"].keys() == own["error"].keys()  # not yet in a bucket: still saved
    order = ["0.weight", "0.bias", "2.weight", "2.bias"]
    restored.layout[0] = tuple(order)
    restored._assemble(0, FakeBucket(0, [params[n] for n in order]))
    assert not restored.pending
    expected = torch.cat([own["error"][n]["error"] for n in order])
    assert torch.equal(restored.state.error_dict[0], expected)
    assert torch.equal(restored.state.q_memory_dict[0], shared["factors"]["0.weight"]["q"])
    assert_same(restored.state_dict(), (shared, own), "state")


# -- bytes on the wire ----------------------------------------------------------------------------------

HOOKS = {"none": {}, "bf16": {"grad_compression": "bf16"}, "powersgd": POWERSGD}


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))


def _count_rank(rank: int, port: int, out: str) -> None:
    """3 optimizer steps of each hook on the two-layer model; the bytes each step counted, and the
    final weights (also of plain DDP without any hook)."""
    counted, weights = {}, {}
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=60) as ctx:
        for name, options in [*HOOKS.items(), ("no hook", None)]:
            model = _two_layers()
            cfg = config_from_dict({"model": {"name": "tiny_vgg"}, "data": {"root": out, "batch_size": 4},
                                    "optim": {"lr": 0.1}, "distributed": options or {}}, "test", check_paths=False)
            engine = DDPEngine(model, cfg, ctx, torch.device("cpu"))
            if options is None:  # torch's built-in reduction, as before the counting hook existed
                engine._ddp = engine.forward = nn.parallel.DistributedDataParallel(model)
                engine.comm = None
            data = torch.Generator().manual_seed(100 + rank)
            counted[name] = []
            for _ in range(3):
                x, y = torch.randn(8, 20, generator=data), torch.randint(0, 4, (8,), generator=data)
                with engine.micro_batch(boundary=True):
                    engine.backward(nn.functional.cross_entropy(engine.forward(x), y))
                engine.step()
                counted[name].append(engine.comm.bytes_last_step if engine.comm else None)
            weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    Path(out, f"counted{rank}.json").write_text(json.dumps(counted))
    torch.save(weights, Path(out, f"weights{rank}.pt"))


def test_counted_bytes_equal_the_analytic_count_of_each_hook(tmp_path):
    """fc1 30×20 (+30 bias), fc2 4×30 (+4): 754 fp32 gradients. Plain: 4 × 754 bytes; bf16: 2 × 754;
    PowerSGD rank 2 with start_iter 2: plain in steps 1 and 2, then only fc1's weight is worth compressing
    ((30+20)·2 = 100 elements, under half its 600; fc2's (30+4)·2 = 68 is not under half of 120),
    so 100 + 30 + 120 + 4 = 254 elements. Counting changes nothing: plain DDP's weights, bitwise."""
    mp.spawn(_count_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        counted = json.loads(Path(tmp_path, f"counted{rank}.json").read_text())
        assert counted["none"] == [4 * 754] * 3
        assert counted["bf16"] == [2 * 754] * 3
        assert counted["powersgd"] == [4 * 754, 4 * 754, 4 * 254]
        weights = torch.load(tmp_path / f"weights{rank}.pt")
        for key, value in weights["no hook"].items():
            assert torch.equal(weights["none"][key], value), key
    model = _two_layers()
    assert expected_bytes_per_step(model, "none") == 4 * 754
    assert expected_bytes_per_step(model, "bf16") == 2 * 754
    assert expected_bytes_per_step(model, "powersgd", rank=2) == 4 * 254


def test_powersgd_factors_follow_the_rank():
    """VGG-16's fc6 (4096 × 25088) at rank 4 sends (4096 + 25088)·4 elements instead of 4096·25088."""
    model = build_model({"name": "vgg16", "num_classes": 1000}, dense=True)
    dense = expected_bytes_per_step(model, "none")
    saved = 4 * (4096 * 25088 - (4096 + 25088) * 4)
    compressed = expected_bytes_per_step(model, "powersgd", rank=4)
    assert dense - compressed > saved  # fc6 and more
    assert compressed < dense / 50


# -- configuration ------------------------------------------------------------------------------------


def test_powersgd_settings_are_checked_in_one_line(tmp_path):
    base = {"model": {"name": "tiny_vgg"}, "data": {"root": str(tmp_path)}}
    cases = [
        ({"grad_compression": "none", "powersgd": {"rank": 2}}, "distributed.powersgd is set but"),
        ({"grad_compression": "powersgd", "powersgd": {"start_iter": 1}}, "start_iter must be >= 2"),
        ({"grad_compression": "powersgd", "engine": "deepspeed"}, "DeepSpeed reduces gradients itself"),
    ]
    for options, message in cases:
        if options.get("engine") == "deepspeed":
            pytest.importorskip("deepspeed")
        with pytest.raises(ConfigError, match=message):
            config_from_dict(base | {"distributed": options}, "test", check_paths=False)
    cfg = config_from_dict(base | {"distributed": {"grad_compression": "powersgd"}}, "test", check_paths=False)
    assert cfg.distributed.powersgd.rank == 1 and cfg.distributed.powersgd.error_feedback  # torch's defaults
    engine = DDPEngine(_two_layers(), cfg, DistContext(), torch.device("cpu"))
    line = communication_line(cfg, DistContext(), _two_layers(), engine)
    assert line == ("model: 0.00M parameters; one process: no gradient all-reduce; distributed.grad_compression"
                    " 'powersgd' has nothing to compress and is not used")


# -- learning ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "data"
    write_digits(root)
    return root


def test_powersgd_learns_real_digits_as_well_as_plain_all_reduce(tmp_path, digits, capsys):
    """scikit-learn's real digits on 2 ranks, 8 epochs: PowerSGD rank 2 (after 1 warm-up epoch)
    within 1 point of plain all-reduce's val top-1."""
    variants = {"plain": {"grad_compression": "none", "powersgd": None}, "powersgd": POWERSGD | {"powersgd": {"rank": 2}}}
    jobs = [(run_config(tmp_path, digits, name, distributed=options, model={"dropout": 0.0},
                        data={"batch_size": 32, "min_crop_scale": 0.6, "hflip": False},
                        optim={"epochs": 8, "lr": 0.05, "warmup_epochs": 1}), []) for name, options in variants.items()]
    mp.spawn(_fit_ranks, args=(free_port(), jobs), nprocs=2)
    top1 = {name: load_checkpoint(CheckpointManager(tmp_path / "runs" / name / "checkpoints", 20).latest())["best_top1"]
            for name in variants}
    with capsys.disabled():
        print(f"\n  digits, 2 gloo ranks, 8 epochs: {top1}")
    assert top1["plain"] >= 90.0
    assert top1["powersgd"] >= top1["plain"] - 1.0
