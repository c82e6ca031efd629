"""Execution plans: a factorized layer run composed (one dense conv of Σ_k V_k ⊗ H_k) against a
float64 reference of the factorized layer, forward and backward; `auto` choosing the faster form;
the plan cache; rank 0's plan on every rank; checkpoints that do not depend on the plan.

Timing is noisy on this shared machine, so the test of `auto` makes one form slower by a margin
(a 0.1 s sleep per call) that dwarfs the noise, and the cache tests replace the timing itself with
made-up times, which also makes their decisions known in advance.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lowrank_dist.config import ConfigError, config_from_dict, load_config
from lowrank_dist.training.checkpoint import CheckpointManager, load_checkpoint
from lowrank_dist.training.distributed import DistContext, Rendezvous, process_group
from lowrank_dist.training.trainer import fit
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model
from lowrank_dist.speed import execution
from lowrank_dist.speed.execution import ExecutionPlan, plan_execution, read_cache, set_execution
from lowrank_dist.training.model_setup import plan_for_run
from lowrank_dist.speed.report import speed_report

from .helpers import write_config

# (C, N, kernel, stride, padding, dilation, groups, rank (the total over the groups), input H×W)
GEOMETRIES = [
    (6, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 4, (13, 11)),
    (6, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, 5, (13, 11)),  # stride 2 (GoogLeNet's stem)
    (3, 16, (11, 11), (4, 4), (2, 2), (1, 1), 1, 5, (35, 31)),  # stride 4, AlexNet's conv1
    (8, 12, (3, 3), (1, 1), (1, 1), (1, 1), 2, 6, (9, 10)),  # groups (CaffeNet's grouped convs), 3 per group
    (8, 12, (5, 5), (1, 1), (2, 2), (1, 1), 4, 8, (9, 10)),  # more groups, 5×5, 2 per group
    (5, 7, (5, 3), (2, 1), (2, 0), (1, 1), 1, 4, (15, 12)),  # kh ≠ kw, stride and padding per axis
    (5, 7, (3, 5), (1, 2), (0, 2), (2, 1), 1, 3, (15, 12)),  # kw > kh, dilation
]


def layer_for(geometry, bias: bool = True) -> LowRankConv2d:
    c, n, kernel, stride, padding, dilation, groups, rank, _ = geometry
    torch.manual_seed(0)
    layer = LowRankConv2d(c, n, kernel, rank, stride, padding, dilation, groups, bias=bias)
    with torch.no_grad():  # a bias that is not zero, so its gradient is tested too
        if bias:
            layer.horizontal.bias.normal_()
    return layer


def outputs_and_gradients(layer: LowRankConv2d, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    found = {"output": y.detach(), "input": x.grad}
    found |= {name: p.grad for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return found


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[2]}s{g[3]}p{g[4]}d{g[5]}g{g[6]}")
def test_both_forms_equal_a_float64_reference_of_the_factorized_layer(geometry):
    """Output and the gradients of the input, V, H and the bias. In float64 composed equals
    factorized to 1e-12 (the same function, summed in another order); in float32 both are within
    2e-6 of the float64 reference, relative to the largest value: a few hundred fp32 roundings of
    2^-24 each, while a wrong stride, padding or group shows as an O(1) error."""
    layer = layer_for(geometry)
    c, n, *_ = geometry
    torch.manual_seed(1)
    x = torch.randn(2, c, *geometry[-1])
    reference_layer = layer_for(geometry).double()
    dense_shape = F.conv2d(x, torch.zeros(n, c // geometry[6], *geometry[2]), None, *geometry[3:7]).shape
    grad_out = torch.randn(dense_shape, dtype=torch.float64)
    reference = outputs_and_gradients(reference_layer, x.double(), grad_out)
    assert reference["output"].shape == dense_shape
    reference_layer.execution = "composed"
    composed64 = outputs_and_gradients(reference_layer, x.double(), grad_out)
    for key, value in reference.items():
        torch.testing.assert_close(composed64[key], value, rtol=1e-12, atol=1e-12 * float(value.abs().max()))
    for execution in ("factorized", "composed"):
        layer.execution = execution
        got = outputs_and_gradients(layer, x, grad_out.float())
        assert set(got) == set(reference) == {"output", "input", "vertical.weight", "horizontal.weight", "horizontal.bias"}
        for key, value in reference.items():
            scale = float(value.abs().max())
            torch.testing.assert_close(got[key].double() / scale, value / scale, rtol=0, atol=2e-6, msg=f"{execution} {key}")


def test_composed_trains_only_v_and_h_and_keeps_the_rank():
    """After SGD steps under 'composed' the parameters are still V and H (no dense weight appears)
    and the layer's kernel has rank K per group."""
    layer = layer_for(GEOMETRIES[3])
    layer.execution = "composed"
    names = [name for name, _ in layer.named_parameters()]
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    for _ in range(3):
        layer(torch.randn(2, 8, 9, 10)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [name for name, _ in layer.named_parameters()] == names == ["vertical.weight", "horizontal.weight",
                                                                         "horizontal.bias"]
    assert all(not torch.equal(before[name], p) for name, p in layer.named_parameters())
    from lowrank_dist.lowrank.svd import unfold

    kernel = layer.dense_weight().detach().double()  # composed in fp32: singular values beyond K are rounding
    per_group = layer.rank // layer.groups
    for group in kernel.chunk(layer.groups, dim=0):
        singular = torch.linalg.svdvals(unfold(group))
        assert singular[per_group - 1] > 1e-3 * singular[0] and singular[per_group] < 1e-6 * singular[0]


def test_the_state_dict_is_the_same_under_any_plan():
    torch.manual_seed(0)
    model = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})
    before = model.state_dict()
    set_execution(model, "composed")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    twin = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})  # factorized, other weights
    twin.load_state_dict(after)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), twin.eval()(x), rtol=1e-4, atol=1e-5)


def test_batch_norm_between_has_no_composed_form(tmp_path):
    layer = LowRankConv2d(4, 6, 3, 2, padding=1, bn_between=True)
    with pytest.raises(ValueError, match="impossible with BatchNorm between"):
        layer.execution = "composed"
    with pytest.raises(ValueError, match="execution must be one of"):
        layer.execution = "dense"
    model = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0, "bn_between": True}})
    with pytest.raises(ValueError, match=r"'composed' is impossible for 4, 8, 11: BatchNorm sits between"):
        plan_execution(model, (2, 3, 16, 16), "composed", "cpu")
    plan = plan_execution(model, (2, 3, 16, 16), "auto", "cpu")  # auto keeps such layers factorized, untimed
    assert set(plan.executions.values()) == {"factorized"} and all(layer.factorized_s is None for layer in plan.layers)
    tree = {"model": {"name": "tiny_vgg", "lowrank": {"speedup": 2.0, "bn_between": True}},
            "precision": {"execution": "composed"}, "data": {"root": str(tmp_path)}}
    with pytest.raises(ConfigError, match="precision.execution 'composed' is impossible with model.lowrank.bn_between"):
        config_from_dict(tree, "cfg.yaml")


# -- auto -------------------------------------------------------------------------------------------


DELAY_S = 0.1


def slowed(method):
    def slow(self, x):
        time.sleep(DELAY_S)
        return method(self, x)

    return slow


@pytest.fixture
def one_thread():
    """On this shared machine two threads wait for each other whenever a neighbour takes a core, and
    a tiny conv can then take tens of milliseconds; one thread is at most about 2× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("slow", ["composed", "factorized"])
def test_auto_picks_the_faster_form_when_one_is_made_slow(slow, monkeypatch, one_thread):
    """Each call of the slowed form sleeps 0.1 s; the layers themselves take well under 10 ms here."""
    original = getattr(LowRankConv2d, f"_{slow}")
    monkeypatch.setattr(LowRankConv2d, f"_{slow}", slowed(original))
    torch.manual_seed(0)
    model = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})
    plan = plan_execution(model, (2, 3, 16, 16), "auto", "cpu", repeats=3, warmup=1)
    other = "factorized" if slow == "composed" else "composed"
    assert plan.executions == {"4": other, "8": other, "11": other}
    for layer in plan.layers:
        assert getattr(layer, f"{slow}_s") > DELAY_S and 0 < getattr(layer, f"{other}_s") < getattr(layer, f"{slow}_s")
        assert layer.input_shape[0] == 2 and not layer.cached
    assert all(m.execution == "factorized" for m in model.modules() if isinstance(m, LowRankConv2d))  # untouched
    plan.apply(model)
    assert [m.execution for m in model.modules() if isinstance(m, LowRankConv2d)] == [other] * 3


# -- the cache --------------------------------------------------------------------------------------


class FakeTimes:
    """Made-up timings: composed wins exactly on layers with at most 64 input channels."""

    def __init__(self):
        self.calls = []

    def __call__(self, layer, given, device, dtype, channels_last, **timing):
        self.calls.append((layer.in_channels, given.shape))
        composed = 1e-3 if layer.in_channels <= 64 else 3e-3
        return {"factorized_s": 2e-3, "composed_s": composed}


@pytest.fixture
def fake(monkeypatch):
    times = FakeTimes()
    monkeypatch.setattr(execution, "_time_layer", times)
    return times


def tiny(speedup: float = 2.0) -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "tiny_vgg", "lowrank": {"speedup": speedup}})


def test_the_cache_is_used_for_the_same_setting(fake, tmp_path):
    cache = tmp_path / "cache.json"
    first = plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    assert first.executions == {"4": "composed", "8": "composed", "11": "factorized"}
    assert [(layer.module, layer.layer) for layer in first.layers] == [("4", "conv2"), ("8", "conv3"), ("11", "conv4")]
    assert "| conv2 | 8×32×16×16 |" in first.to_markdown()  # the printed plan names layers as the paper does
    assert [shape for _, shape in fake.calls] == [(8, 32, 16, 16), (8, 64, 8, 8), (8, 128, 8, 8)]
    assert len(read_cache(cache)) == 3 and not any(layer.cached for layer in first.layers)
    fake.calls.clear()
    second = plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    assert fake.calls == [] and second.executions == first.executions and all(layer.cached for layer in second.layers)
    assert re.search(rf"\(auto: 0 layers timed \(\d+\.\d s\), 3 from the cache {re.escape(str(cache))}\)", second.summary())


@pytest.mark.parametrize("change", ["batch", "image size", "dtype", "memory format", "torch version", "device"])
def test_the_cache_is_invalidated_by_what_timing_depends_on(change, fake, tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    setting = {"input_shape": (8, 3, 32, 32), "dtype": torch.float32, "channels_last": False}
    plan_execution(tiny(), execution="auto", device="cpu", cache=cache, **setting)
    fake.calls.clear()
    if change == "batch":
        setting["input_shape"] = (16, 3, 32, 32)
    elif change == "image size":
        setting["input_shape"] = (8, 3, 48, 48)
    elif change == "dtype":
        setting["dtype"] = torch.bfloat16
    elif change == "memory format":
        setting["channels_last"] = True
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", "9.9.9")
    else:  # another card, or on the CPU another thread count: device_description says which
        monkeypatch.setattr(execution, "device_description", lambda device: "another device")
    plan = plan_execution(tiny(), execution="auto", device="cpu", cache=cache, **setting)
    assert len(fake.calls) == 3 and not any(layer.cached for layer in plan.layers)
    assert len(read_cache(cache)) == 6  # the old setting's decisions are kept beside the new ones


def test_the_cache_is_per_layer_a_changed_rank_retimes_only_that_layer(fake, tmp_path):
    cache = tmp_path / "cache.json"
    plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    fake.calls.clear()
    torch.manual_seed(0)
    model = build_model({"name": "tiny_vgg", "lowrank": {"ranks": {"4": 32, "8": 64, "11": 50}}})  # 11 had 96
    plan = plan_execution(model, (8, 3, 32, 32), "auto", "cpu", cache=cache)
    assert fake.calls == [(128, (8, 128, 8, 8))]
    assert [layer.cached for layer in plan.layers] == [True, True, False]


def test_a_broken_cache_entry_is_timed_again(fake, tmp_path):
    cache = tmp_path / "cache.json"
    plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    data = json.loads(cache.read_text())
    first = next(iter(data["layers"]))
    data["layers"][first] = {"factorized_s": "fast"}
    cache.write_text(json.dumps(data))
    fake.calls.clear()
    plan = plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    assert len(fake.calls) == 1 and [layer.cached for layer in plan.layers].count(False) == 1
    assert execution._usable(read_cache(cache)[first])


def test_an_unreadable_cache_is_ignored_with_a_warning_and_replaced(fake, tmp_path, capsys):
    cache = tmp_path / "cache.json"
    cache.write_text("{ half a file")
    plan = plan_execution(tiny(), (8, 3, 32, 32), "auto", "cpu", cache=cache)
    assert "warning: ignoring the execution plan cache" in capsys.readouterr().err
    assert len(fake.calls) == 3 and len(plan.layers) == 3
    assert json.loads(cache.read_text())["version"] == execution.CACHE_VERSION and len(read_cache(cache)) == 3


def test_fixed_plans_time_nothing(fake):
    for form in ("factorized", "composed"):
        plan = plan_execution(tiny(), (8, 3, 32, 32), form, "cpu")
        assert set(plan.executions.values()) == {form} and fake.calls == []


def test_a_plan_survives_the_trip_through_a_dict():
    plan = ExecutionPlan("auto", {"input_shape": [2, 3, 8, 8]}, [execution.LayerPlan("a", "conv_a", "composed", "why", (2, 3, 8, 8),
                                                                                        2e-3, 1e-3)])
    again = ExecutionPlan.from_dict(json.loads(json.dumps(plan.as_dict())))
    assert again == plan and again.layers[0].speedup == pytest.approx(2.0)


# -- in a run -----------------------------------------------------------------------------------------


def run_config(out_dir: Path, execution_: str | None = "auto", **sections) -> dict:
    tree = {
        "run": {"out_dir": str(out_dir), "name": "t", "device": "cpu"},
        "model": {"name": "tiny_vgg", "lowrank": {"speedup": 2.0}},
        "data": {"root": str(out_dir), "batch_size": 8, "image_size": 32},
    }
    if execution_ is not None:
        tree["precision"] = {"execution": execution_}
    for section, values in sections.items():
        tree[section] = tree.get(section, {}) | values
    return tree


class Log:
    def __init__(self):
        self.printed, self.texts = [], {}

    def print(self, message):
        self.printed.append(message)

    def text(self, tag, text):
        self.texts[tag] = text


def test_a_run_prints_logs_writes_and_applies_its_plan(fake, tmp_path):
    cfg = config_from_dict(run_config(tmp_path), "cfg.yaml", check_paths=False)
    model, log = tiny(), Log()
    plan = plan_for_run(cfg, model, torch.device("cpu"), DistContext(), log)
    assert plan.executions == {"4": "composed", "8": "composed", "11": "factorized"}
    assert [m.execution for m in model.modules() if isinstance(m, LowRankConv2d)] == ["composed", "composed", "factorized"]
    assert [shape for _, shape in fake.calls] == [(8, 32, 16, 16), (8, 64, 8, 8), (8, 128, 8, 8)]  # the run's batch
    assert "| conv4 | 8×128×8×8 | 2 | 3 | factorized |" in log.printed[0] and log.texts["execution/plan"] == log.printed[0]
    saved = json.loads((tmp_path / "t" / "execution_plan.json").read_text())
    assert ExecutionPlan.from_dict(saved).executions == plan.executions
    assert (tmp_path / "t" / "execution_plan.md").read_text() == log.printed[0] + "\n"
    assert len(read_cache(tmp_path / "execution_cache.json")) == 3  # run.out_dir/execution_cache.json
    # the same setting again (a resume, or the next run in this out_dir): nothing is timed
    fake.calls.clear()
    again = plan_for_run(cfg, tiny(), torch.device("cpu"), DistContext(), Log())
    assert fake.calls == [] and again.executions == plan.executions


def test_the_cpu_default_is_the_measured_choice_and_a_dense_model_has_no_plan(fake, tmp_path):
    cfg = config_from_dict(run_config(tmp_path, None), "cfg.yaml", check_paths=False)
    log = Log()
    plan = plan_for_run(cfg, tiny(), torch.device("cpu"), DistContext(), log)
    assert plan.mode == execution.CPU_DEFAULT == "factorized" and fake.calls == []
    assert "precision.execution not set: factorized on the CPU" in log.printed[0]
    assert execution.default_execution(torch.device("cuda")) == "auto"
    dense = config_from_dict(run_config(tmp_path, None) | {"model": {"name": "tiny_vgg"}}, "cfg.yaml", check_paths=False)
    assert plan_for_run(dense, build_model({"name": "tiny_vgg"}), torch.device("cpu"), DistContext(), Log()) is None


def _plan_rank(rank: int, port: int, out: str) -> None:
    """Rank 0's made-up timings favour composed, rank 1's factorized: rank 1 must not time at all
    and must run rank 0's plan."""
    times = FakeTimes()

    def favour_factorized(layer, given, *args, **kwargs):
        times.calls.append(layer.in_channels)
        return {"factorized_s": 1e-3, "composed_s": 2e-3}

    execution._time_layer = times if rank == 0 else favour_factorized
    cfg = config_from_dict(run_config(Path(out)), "cfg.yaml", check_paths=False)
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=60) as ctx:
        model = tiny()
        plan_for_run(cfg, model, torch.device("cpu"), ctx, Log())
        runs = {name: m.execution for name, m in model.named_modules() if isinstance(m, LowRankConv2d)}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"runs": runs, "timed": len(times.calls)}))


def test_every_rank_runs_rank_0s_plan(tmp_path):
    from .test_distributed import free_port

    mp.spawn(_plan_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["runs"] == rank1["runs"] == {"4": "composed", "8": "composed", "11": "factorized"}
    assert rank0["timed"] == 3 and rank1["timed"] == 0
    written = ExecutionPlan.from_dict(json.loads((tmp_path / "t" / "execution_plan.json").read_text()))  # by rank 0
    assert written.executions == rank0["runs"]


# -- checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from lowrank_dist.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=16, val_per_class=4, seed=0)
    return root


def test_a_resume_under_another_plan_takes_the_same_step(tmp_path, synthetic):
    """Step 1 factorized, then step 2 twice from its checkpoint: factorized (the original run) and
    composed (a resume with precision.execution changed, which check_resumable must accept).

    Tolerance: the two step-2 updates w2 − w1 agree to 1e-3 of the largest update of that tensor,
    plus 1e-7 absolute. Both forms compute the same sums in another order, so the loss and the
    gradients differ by fp32 rounding and the updates inherit it: measured 1e-6–5e-6 of the update
    for V and H, 9e-5 for a BatchNorm weight (its gradient sums over every pixel of the batch); a
    real difference — a gradient that misses V or H, a wrong stride or bias — changes an update by
    O(1). The absolute 1e-7 (≈ one fp32 ulp of a weight of 1) is for conv biases followed by
    BatchNorm: their gradient is exactly zero in exact arithmetic, so their "update" is rounding
    noise (~1e-8) whose relative size means nothing. BN running statistics agree to 1e-5."""
    def tree(folder: Path, form: str) -> Path:
        return write_config(folder / "cfg.yaml", {}, {
            "run": {"out_dir": str(folder / "runs"), "name": "t", "seed": 0, "device": "cpu", "checkpoint_every": 1,
                    "keep_last": 10, "max_steps": 2, "speed_report": False},
            "model": {"name": "tiny_vgg", "dropout": 0.2, "lowrank": {"speedup": 2.0}}, "precision": {"execution": form},
            "data": {"root": str(synthetic), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
            "optim": {"epochs": 1, "lr": 0.05},
        })

    original = fit(load_config(tree(tmp_path / "a", "factorized")))
    steps = CheckpointManager(original.folder / "checkpoints", 10)
    first = load_checkpoint(steps.folder / "step_000000001.pt")
    resumed = fit(load_config(tree(tmp_path / "b", "composed")), resume=steps.folder / "step_000000001.pt")
    assert resumed.step == original.step == 2
    a = load_checkpoint(steps.latest())["model"]
    b = load_checkpoint(CheckpointManager(resumed.folder / "checkpoints", 10).latest())["model"]
    assert a.keys() == b.keys()
    for key, start in first["model"].items():
        if not start.is_floating_point():
            assert torch.equal(a[key], b[key]), key
            continue
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
            continue
        update_a, update_b = a[key] - start, b[key] - start
        assert update_a.abs().max() > 0, key  # every parameter moved
        torch.testing.assert_close(update_b, update_a, rtol=0, atol=1e-3 * float(update_a.abs().max()) + 1e-7, msg=key)
    plans = [json.loads((run.folder / "execution_plan.json").read_text())["mode"] for run in (original, resumed)]
    assert plans == ["factorized", "composed"]


# -- the speed report -------------------------------------------------------------------------------


def test_the_speed_report_times_three_forms_and_follows_a_given_plan():
    torch.manual_seed(0)
    dense, lowrank = build_model({"name": "tiny_vgg"}), build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})
    set_execution(lowrank, "composed")  # the report's factorized columns are factorized whatever the model ran
    quick = {"repeats": 2, "warmup": 1, "min_sample_s": 0.0}
    report = speed_report(dense, lowrank, (2, 3, 16, 16), "cpu", **quick)
    for row in report.rows[1:]:
        assert row.composed_train.median > 0 and row.composed_forward.median > 0
        faster = "composed" if row.composed_train.median < row.lowrank_train.median else "factorized"
        assert row.execution == faster  # by default, the auto rule on the report's own times
        assert row.planned_train is (row.composed_train if faster == "composed" else row.lowrank_train)
    assert report.rows[0].execution == "dense" and report.rows[0].composed_train is None
    assert report.model.planned_train.median > 0 and report.model.planned_train_speedup > 0
    given = {"4": "composed", "8": "factorized", "11": "composed"}
    report = speed_report(dense, lowrank, (2, 3, 16, 16), "cpu", plan=given, plan_source="a test", whole_model=False,
                          **quick)
    assert {row.module: row.execution for row in report.rows[1:]} == given and report.meta["plan"] == "a test"
    markdown = report.to_markdown()
    assert "| fwd+bwd composed |" in markdown and "| composed |" in markdown and "(a test)" in markdown
