"""Measured-speed report on CPU: rows and MAC counts against the models, files and TensorBoard,
the speed-aware rank choice on injected timings, agreement with a timing by hand and the CLI
(bench/gpu.py's smoke mode: tests/test_gpu_bench.py).

Timing on a shared 2-core machine is noisy, so no test here asserts that one layer is faster than
another; tests of timing check what the numbers are (positive, medians of their samples, the
right calls alternated) and, once, that a measurement agrees with an independent one within a
generous factor.
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.benchmark import Timer

from lowrank_dist.config import load_config
from lowrank_dist.lowrank.ranks import TargetSpeedup
from lowrank_dist.lowrank.layers import LowRankConv2d, LowRankLinear
from lowrank_dist.models import build_model, convert, factorizable_convs, layer_names
from lowrank_dist.speed import render
from lowrank_dist.speed.__main__ import main
from lowrank_dist.speed.report import speed_report
from lowrank_dist.speed.speed_aware import speed_aware_ranks
from lowrank_dist.speed.timing import measure

REPO = Path(__file__).resolve().parents[1]
SHAPE = (2, 3, 64, 64)  # the smallest square input AlexNet's pooling takes is 63
POLICIES = {"alexnet": {"preset": "tai2016"}, "vgg16": {"preset": "tai2016"}, "googlenet": {"speedup": 2.0}}
QUICK = {"repeats": 2, "warmup": 1}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One report per model at 64×64, batch 2, files in its own folder; with the models it measured."""
    made = {}
    for name, policy in POLICIES.items():
        torch.manual_seed(0)
        dense, lowrank = build_model({"name": name}), build_model({"name": name, "lowrank": policy})
        out = tmp_path_factory.mktemp(name)
        report = speed_report(dense, lowrank, SHAPE, "cpu", out_dir=out, title=name, **QUICK)
        made[name] = (report, out, dense, lowrank)
    return made


def by_hand(model: nn.Module) -> dict[str, dict]:
    """Per conv (LowRankConv2d as one layer): its input shape and MACs per image, from hooks on the
    model's own convs: a conv costs (C/groups)·kh·kw per output element."""
    seen = {}

    def hook(module, args, output):
        seen[module] = (tuple(args[0].shape), output[0].numel() * module.weight[0].numel())

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad():
        model.eval()(torch.zeros(SHAPE))
    for handle in handles:
        handle.remove()
    layers, inner = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LowRankConv2d):
            inner.update((module.vertical, module.horizontal))
            layers[name] = {"input": seen[module.vertical][0],
                            "macs": seen[module.vertical][1] + seen[module.horizontal][1]}
        elif isinstance(module, nn.Conv2d) and module not in inner and module in seen:
            layers[name] = {"input": seen[module][0], "macs": seen[module][1]}
    return layers


# -- the report -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_one_row_per_conv_with_the_models_own_mac_counts(reports, name):
    report, _, dense, lowrank = reports[name]
    dense_layers, lowrank_layers = by_hand(dense), by_hand(lowrank)
    assert [row.module for row in report.rows] == list(lowrank_layers) == list(dense_layers)
    assert [row.layer for row in report.rows] == [layer_names(lowrank)[row.module] for row in report.rows]
    for row in report.rows:
        assert row.input_shape == lowrank_layers[row.module]["input"] == dense_layers[row.module]["input"]
        assert row.cost.dense_macs == dense_layers[row.module]["macs"]
        assert row.cost.lowrank_macs == lowrank_layers[row.module]["macs"]
        assert row.theoretical == pytest.approx(row.cost.dense_macs / row.cost.lowrank_macs)
        for timing in (row.dense_forward, row.lowrank_forward, row.dense_train, row.lowrank_train):
            assert len(timing.samples) == QUICK["repeats"] and min(timing.samples) > 0
            assert timing.median == statistics.median(timing.samples)
        assert row.train_speedup == row.dense_train.median / row.lowrank_train.median
        if row.cost.rank is None:  # the same layer in both models, timed once
            assert row.dense_train is row.lowrank_train and row.train_speedup == 1.0
    factorized = [n for n, m in lowrank.named_modules() if isinstance(m, LowRankConv2d)]
    assert [row.module for row in report.rows if row.cost.rank is not None] == factorized
    assert report.model.batch == SHAPE[0] and report.model.images_per_s(report.model.lowrank_train) > 0


def test_vgg16_rows_match_the_paper_formula(reports):
    """Stride-1 layers: dense N·C·9·H·W, factorized K·(3C + 3N)·H·W, with the authors' ranks,
    each on the layer their config names (imagenet/models_vgg/config.json)."""
    rows = reports["vgg16"][0].rows
    authors = {"conv1_1": 5, "conv1_2": 24, "conv2_1": 48, "conv2_2": 48, "conv3_1": 64, "conv3_2": 128,
               "conv3_3": 160, "conv4_1": 192, "conv4_2": 192, "conv4_3": 256, "conv5_1": 320, "conv5_2": 320,
               "conv5_3": 320}
    assert {row.layer: row.cost.rank for row in rows} == authors
    ranks = list(authors.values())
    assert [row.cost.rank for row in rows] == ranks
    for row, k in zip(rows, ranks):
        n, c, _, _ = row.cost.kernel
        pixels = row.input_shape[2] * row.input_shape[3]
        assert row.cost.dense_macs == n * c * 9 * pixels
        assert row.cost.lowrank_macs == k * (3 * c + 3 * n) * pixels


def test_markdown_csv_json_and_png_are_written(reports):
    report, out, _, _ = reports["googlenet"]
    markdown = report.to_markdown()
    assert (out / "speed.md").read_text() == markdown + "\n"
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report.rows) + 1  # header, a row per conv, totals
    assert "Whole model, batch 2" in markdown and "images/s" in markdown
    lines = (out / "speed.csv").read_text().splitlines()
    assert len(lines) == 1 + len(report.rows) and lines[0].startswith("layer,module,kernel,groups,rank")
    assert "\ninception_3a/3x3,inception3a.branch2.1.conv,128×96×3×3," in (out / "speed.csv").read_text()
    assert "| inception_3a/3x3 | 128×96×3×3 |" in markdown and "inception3a.branch2.1.conv" not in markdown
    saved = json.loads((out / "speed.json").read_text())
    assert [(layer["layer"], layer["module"]) for layer in saved["layers"]] == [(row.layer, row.module) for row in report.rows]
    assert saved["meta"]["input_shape"] == list(SHAPE) and saved["meta"]["dtype"] == "fp32"
    assert saved["model"]["train_speedup"] == pytest.approx(report.model.train_speedup)
    png = (out / "speed.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_tensorboard_has_a_scalar_per_layer_the_table_and_the_chart(reports):
    report, out, _, _ = reports["alexnet"]
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert [row.layer for row in report.rows] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for row in report.rows:
        for kind, value in (("theoretical", row.theoretical), ("forward", row.forward_speedup), ("train", row.train_speedup)):
            (event,) = events.Scalars(f"speed/layer/{row.layer}/{kind}")
            assert event.value == pytest.approx(value, rel=1e-6)
    assert not any("features" in tag for tag in tags["scalars"])
    (event,) = events.Scalars("speed/model/train_speedup")
    assert event.value == pytest.approx(report.model.train_speedup, rel=1e-6)
    assert "speed/table/text_summary" in tags["tensors"]
    text = events.Tensors("speed/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| conv2 | 192×64×5×5 |" in text
    assert "speed/chart" in tags["images"]


def test_the_chart_names_the_layers_as_the_paper_does(reports):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = reports["vgg16"][0]
    figure = render._figure(report, report.rows, plt)
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    plt.close(figure)
    assert labels == [row.layer for row in report.rows] and labels[:3] == ["conv1_1", "conv1_2", "conv2_1"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_layer_timing_agrees_with_torch_benchmark_timer(one_thread):
    """One conv timed by the report, then by torch.utils.benchmark.Timer, a harness the report
    does not share (report/timing.py says why the report keeps its own).

    Tolerance: Timer's median must fall within 3× of the report's interquartile range. The
    machine is shared, so both run on one thread: with two, a busy neighbour makes the threads
    wait for each other at every parallel region and a conv can slow down tenfold; with one, a
    neighbour taking the core costs at most about 2×. The errors this guards against — timing
    another shape or layer, dividing by the wrong number of calls, seconds vs milliseconds —
    are larger than 3× or caught by the other tests."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1))
    lowrank = convert(dense, {"ranks": {"0": 48}})
    report = speed_report(dense, lowrank, (4, 64, 32, 32), "cpu", repeats=7, warmup=2, whole_model=False)
    (row,) = report.rows
    assert row.input_shape == (4, 64, 32, 32) and row.dense_forward.number >= 1
    x = torch.randn(4, 64, 32, 32)
    for layer, timing in ((dense[0], row.dense_forward), (lowrank[0], row.lowrank_forward)):
        timer = Timer("with torch.no_grad(): layer(x)", globals={"layer": layer.eval(), "x": x}, num_threads=1)
        reference = timer.blocked_autorange(min_run_time=0.2).median
        q1, q3 = timing.quartiles
        assert q1 / 3 < reference < q3 * 3, (reference, timing.samples)


def test_measure_alternates_and_reverses_the_order_every_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ab"}
    timings = measure(fns, "cpu", repeats=4, warmup=1, min_sample_s=0.0)
    assert calls == ["a", "b"] + ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, calibration, rounds
    assert all(len(t.samples) == 4 and t.number == 1 for t in timings.values())


def test_the_report_runs_in_bf16():
    """Layers cast to bf16, whole models under bf16 autocast (tiny: bf16 convs are slow on CPUs)."""
    torch.manual_seed(0)
    dense = build_model({"name": "tiny_vgg"})
    lowrank = build_model({"name": "tiny_vgg", "lowrank": {"speedup": 2.0}})
    report = speed_report(dense, lowrank, (2, 3, 16, 16), "cpu", torch.bfloat16, repeats=1, warmup=0, min_sample_s=0.0)
    assert report.meta["dtype"] == "bf16" and len(report.rows) == 4
    assert all(row.lowrank_train.median > 0 for row in report.rows) and report.model.train_speedup > 0


# -- speed-aware ranks --------------------------------------------------------------------------------


class FakeTimer:
    """Made-up layer times: dense 1 ms; a candidate at rank K takes `lowrank(name, K)` ms."""

    def __init__(self, lowrank):
        self.lowrank, self.seen = lowrank, {}

    def __call__(self, case):
        assert isinstance(case.dense, nn.Conv2d) and all(isinstance(m, LowRankConv2d) for m in case.lowrank.values())
        assert [m.rank for m in case.lowrank.values()] == list(case.lowrank)
        self.seen[case.name] = (sorted(case.lowrank), case.given.shape)
        return 1e-3, {k: self.lowrank(case.name, k) * 1e-3 for k in case.lowrank}


@pytest.fixture(scope="module")
def vgg16():
    torch.manual_seed(0)
    return build_model({"name": "vgg16"})


def test_speed_aware_keeps_exactly_the_layers_measured_faster(vgg16, tmp_path):
    names = [name for name, _ in factorizable_convs(vgg16)]
    slower = {names[0], names[3], names[12]}
    tied = {names[7]}  # as fast as dense is not faster
    timer = FakeTimer(lambda name, k: 1.3 if name in slower else 1.0 if name in tied else 0.6)
    chosen = speed_aware_ranks(vgg16, (2, 3, 32, 32), {"ranks": [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]},
                               timer=timer, model_name="vgg16")
    authors = dict(zip(names, [5, 24, 48, 48, 64, 128, 160, 192, 192, 256, 320, 320, 320]))
    assert chosen.ranks == {n: None if n in slower | tied else authors[n] for n in names}
    assert set(timer.seen) == set(names) and timer.seen[names[1]] == ([24], (2, 64, 32, 32))
    reasons = {c.module: c.reason for c in chosen.choices}
    assert "0.77×" in reasons[names[0]] and reasons[names[0]].endswith("no candidate is faster than dense")
    assert "1.67×" in reasons[names[1]] and "factorize" in reasons[names[1]]
    assert [c.layer for c in chosen.choices][:2] == ["conv1_1", "conv1_2"]
    assert "| conv1_2 | 64×64×3×3 | 24 |" in chosen.to_markdown()

    path = tmp_path / "vgg16_speed.yaml"
    path.write_text(chosen.to_yaml({"name": "vgg16"}))
    text = path.read_text()
    assert text.startswith("# Speed-aware ranks for vgg16") and text.count("→") == len(names)
    assert "      features.2: 24  # conv1_2: dense 1 ms" in text  # keyed by module path, the paper's name beside
    model = build_model(yaml.safe_load(text)["model"])
    built = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankConv2d)}
    assert built == {n: k for n, k in chosen.ranks.items() if k is not None}


def test_speed_aware_search_takes_the_largest_rank_reaching_the_target(vgg16):
    """Made-up speed 100/K: the rank chosen is the largest candidate with 100/K >= 1.5. The base
    policy (a 2× target) keeps the first conv dense without timing it."""
    search = (3.0, 4.0, 8.0)
    timer = FakeTimer(lambda name, k: k / 100)
    chosen = speed_aware_ranks(vgg16, (2, 3, 32, 32), {"speedup": 2.0}, search=search, target=1.5, timer=timer)
    convs = list(factorizable_convs(vgg16))
    first = convs[0][0]
    assert first not in timer.seen and chosen.ranks[first] is None
    assert "base policy keeps it dense" in chosen.choices[0].reason
    for name, conv in convs[1:]:
        candidates = {TargetSpeedup(s).rank_for(name, conv.weight) for s in (2.0, *search)}
        assert timer.seen[name][0] == sorted(candidates)
        fast_enough = [k for k in candidates if 100 / k >= 1.5]
        assert chosen.ranks[name] == (max(fast_enough) if fast_enough else None), name
    assert any(k is None for k in list(chosen.ranks.values())[1:]) and any(k is not None for k in chosen.ranks.values())


def test_speed_aware_config_keeps_the_rest_of_a_training_config(tmp_path):
    timer = FakeTimer(lambda name, k: 0.5 if name.endswith(("3", "7")) else 2.0)
    vgg16_bn = build_model({"name": "vgg16", "batch_norm": True})  # what configs/vgg16_lr.yaml builds
    chosen = speed_aware_ranks(vgg16_bn, (2, 3, 32, 32), {"speedup": 2.0}, timer=timer)
    base = yaml.safe_load((REPO / "configs/vgg16_lr.yaml").read_text()) | {"run": {"name": "vgg16_lr", "log_every": 5}}
    path = tmp_path / "vgg16_fast.yaml"
    path.write_text(chosen.to_yaml({"name": "vgg16"}, base))
    cfg = load_config(path, check_paths=False)
    assert cfg.run.name == "vgg16_fast" and cfg.run.log_every == 5  # a new run, not the old one resumed
    assert cfg.model.batch_norm is True and cfg.model.lowrank.mode == "factorized" and cfg.data.batch_size == 256
    assert cfg.model.lowrank.ranks == chosen.ranks
    model = build_model(cfg.model.build_dict())
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankConv2d)} == {
        n: k for n, k in chosen.ranks.items() if k is not None}


def test_speed_aware_rejects_a_timer_that_returns_nonsense(vgg16):
    with pytest.raises(ValueError, match="unusable times"):
        speed_aware_ranks(vgg16, (1, 3, 32, 32), {"speedup": 2.0}, timer=FakeTimer(lambda name, k: 0.0))


# -- the command line -------------------------------------------------------------------------------


def test_cli_reports_a_model_by_name(tmp_path, capsys):
    out = tmp_path / "alexnet"
    argv = ["--model", "alexnet", "--device", "cpu", "--batch", "2", "--image-size", "64", "--repeats", "1",
            "--warmup", "0", "--layers-only", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "alexnet, low-rank (preset=tai2016)" in printed and "| conv2 |" in printed
    assert {p.name for p in out.iterdir()} == {"speed.md", "speed.csv", "speed.json", "speed.png", "tensorboard"}


def test_cli_speed_aware_writes_a_config_that_builds(tmp_path, capsys):
    path = tmp_path / "fast.yaml"
    argv = ["--model", "tiny_vgg", "--device", "cpu", "--batch", "2", "--image-size", "32", "--repeats", "1",
            "--warmup", "0", "--layers-only", "--out", str(tmp_path / "out"), "--speed-aware", "--search", "3",
            "--write-config", str(path)]
    assert main(argv) == 0
    assert "Speed-aware ranks for tiny_vgg" in capsys.readouterr().out
    model_section = yaml.safe_load(path.read_text())["model"]
    assert model_section["name"] == "tiny_vgg" and len(model_section["lowrank"]["ranks"]) == 4
    build_model(model_section)


def test_cli_speed_aware_keeps_the_fc_ranks_of_the_preset_it_replaces(tmp_path, capsys):
    """The search picks conv ranks only; fc6/fc7 stay at the ranks the replaced preset gave them,
    in the timed model and in the written config."""
    path = tmp_path / "fast.yaml"
    argv = ["--model", "tiny_caffenet", "--preset", "fc32", "--device", "cpu", "--batch", "2", "--repeats", "1",
            "--warmup", "0", "--layers-only", "--out", str(tmp_path / "out"), "--speed-aware", "--search", "2",
            "--write-config", str(path)]
    assert main(argv) == 0
    assert "| fc6 |" in capsys.readouterr().out  # timed as a factorized layer
    model_section = yaml.safe_load(path.read_text())["model"]
    assert model_section["lowrank"]["fc"] == {"ranks": {"fc6": 32, "fc7": 32}}
    model = build_model(model_section)
    assert sorted(m.rank for m in model.modules() if isinstance(m, LowRankLinear)) == [32, 32]


def test_cli_reads_a_training_config(tmp_path, capsys):
    """--config: model, batch and image size, bf16 and channels_last come from the config (here
    the flags override batch and size; channels_last stays the config's; the config's bf16 becomes
    fp32 on the CPU, where bf16 convolutions say nothing about a GPU run). The config's
    precision.execution is the report's plan."""
    out = tmp_path / "from_config"
    argv = ["--config", str(REPO / "configs/alexnet_lr.yaml"), "--set", "model.num_classes=10", "--device", "cpu",
            "--set", "precision.execution=composed", "--batch", "2", "--image-size", "64", "--repeats", "1",
            "--warmup", "0", "--layers-only", "--out", str(out)]
    assert main(argv) == 0
    assert "alexnet, low-rank (preset=tai2016): measured speed" in capsys.readouterr().out
    saved = json.loads((out / "speed.json").read_text())
    meta = saved["meta"]
    assert meta["channels_last"] is True and meta["input_shape"] == [2, 3, 64, 64] and meta["dtype"] == "fp32"
    assert meta["plan"] == "--execution composed"
    assert [row["execution"] for row in saved["layers"]] == ["dense" if row["rank"] is None else "composed"
                                                             for row in saved["layers"]]


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg16", "--preset", "nope"], "has no preset 'nope'"),
    (["--model", "vgg16", "--batch", "0"], "--batch must be >= 1"),
    (["--model", "vgg16", "--search", "2"], "go with --speed-aware"),
    (["--model", "caffenet", "--batch", "1"], "--batch 1: caffenet has BatchNorm after its fully-connected layers"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--config", str(REPO / "configs/vgg16.yaml")], "model.lowrank is not set"),
    (["--config", str(REPO / "configs/vgg16_lr.yaml"), "--speedup", "2"], "go with --model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_usage_errors_exit_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "lowrank_dist.speed", "--model", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "invalid choice" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cli_asking_for_a_missing_gpu_is_exit_2(capsys):
    assert main(["--model", "vgg16", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'\n"
