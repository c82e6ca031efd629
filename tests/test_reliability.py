"""Reliability: bad inputs, faults and preemption lose nothing.

Every case runs through the real command line (`python -m lowrank_dist.train`'s `main`, or
`launch/submit.py`), in this process where it can and in subprocesses where it must (several
ranks, a process killed, proof that no traceback is printed). The promises checked here are the
table in docs/troubleshooting.md:

* a bad config, command line, data folder or checkpoint: one line on stderr naming the key, file
  or value and what is allowed, exit code 2;
* a rank killed or hung mid-step: the others stop within distributed.timeout_s with one line
  naming their rank and the last checkpoint, and a resume ends with the uninterrupted weights;
* a checkpoint write killed mid-way or failing (full disk): the previous checkpoint stays
  loadable, and the resume is exact;
* a non-finite loss: stop with the last good checkpoint (exit 1), or skip the step's update on
  every rank (optim.skip_nonfinite_steps), leaving weights, optimizer and BN statistics as they were;
* a resume at another world size: refused mid-epoch (exit 2), continued at an epoch boundary.

Faults are injected deterministically: a NaN pixel in chosen train batches (`poison_batches`),
torch.save failing or killing its process when it writes a chosen step (`fail_saves`), SIGKILL or
SIGSTOP to rank 1 once a given checkpoint exists. Subprocesses get the same injections from
environment variables through `faulty_main`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from lowrank_dist.config import load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training import checkpoint as checkpoint_module
from lowrank_dist.training import trainer as trainer_module
from lowrank_dist.training import run_log as run_log_module
from lowrank_dist.training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from lowrank_dist.training.optim import lr_factor, scaled_lr
from lowrank_dist.train import main

from . import helpers

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


# -- fault injection (also run in subprocesses, through faulty_main) ---------------------------------


def poison_batches(monkeypatch, batches: set[tuple[int, int]], ranks: set[int] | None = None) -> None:
    """Train batches (epoch, index) get a NaN pixel on `ranks` (all if None): the forward, its BN
    statistics and the loss all become NaN, as with a corrupted input or a diverging layer."""
    real = trainer_module.build_loaders

    def build_loaders(*args, **kwargs):
        loaders = real(*args, **kwargs)
        if ranks is not None and kwargs.get("rank", 0) not in ranks:
            return loaders
        epoch_of = loaders.train.epoch

        def epoch(number, start_batch=0):
            for index, (images, labels) in enumerate(epoch_of(number, start_batch), start=start_batch):
                if (number, index) in batches:
                    images = images.clone()
                    images[0, 0, 0, 0] = float("nan")
                yield images, labels

        loaders.train.epoch = epoch
        return loaders

    monkeypatch.setattr(trainer_module, "build_loaders", build_loaders)


def fail_saves(monkeypatch, step: int, how: str) -> None:
    """torch.save of the checkpoint of `step` writes half a file, then raises ENOSPC ("enospc") or
    SIGKILLs its own process ("kill")."""
    real = checkpoint_module.torch.save

    def save(payload, f, *args, **kwargs):
        if isinstance(payload, dict) and payload.get("step") == step:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device")
        return real(payload, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)


def faulty_main() -> None:
    """`python -c 'from tests.test_reliability import faulty_main; faulty_main()' --config ...`:
    the train command with the faults named in TEST_NAN_BATCHES ("epoch:batch,...") on the ranks
    in TEST_NAN_RANKS ("1,2"; all if unset) and TEST_FAIL_SAVE ("step:enospc|kill", rank 0)."""
    patch = pytest.MonkeyPatch()
    if os.environ.get("TEST_NAN_BATCHES"):
        batches = {tuple(int(x) for x in item.split(":")) for item in os.environ["TEST_NAN_BATCHES"].split(",")}
        ranks = os.environ.get("TEST_NAN_RANKS")
        poison_batches(patch, batches, {int(r) for r in ranks.split(",")} if ranks else None)
    if os.environ.get("TEST_FAIL_SAVE") and os.environ.get("RANK", "0") == "0":
        step, how = os.environ["TEST_FAIL_SAVE"].split(":")
        fail_saves(patch, int(step), how)
    sys.exit(main(sys.argv[1:]))


FAULTY = [sys.executable, "-c", "from tests.test_reliability import faulty_main; faulty_main()"]
TRAIN = [sys.executable, "-m", "lowrank_dist.train"]


# -- data, configs, runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    # 96 train images: 6 steps per epoch in one process (batch 16), 3 in two
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=24, val_per_class=5, seed=0)
    return root


def base_tree(folder: Path, root: Path, name: str = "r") -> dict:
    return {
        "run": {"out_dir": str(folder / "runs"), "name": name, "seed": 0, "device": "cpu", "log_every": 1,
                "checkpoint_every": 1, "keep_last": 50, "speed_report": False},
        "model": {"name": "tiny_vgg", "dropout": 0.0, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 2, "lr": 0.05},
        "distributed": {"timeout_s": 30},
    }


def write_config(folder: Path, root: Path, name: str = "r", **sections) -> Path:
    return helpers.write_config(folder / f"{name}.yaml", base_tree(folder, root, name), sections)


def checkpoints(run_folder: Path) -> CheckpointManager:
    return CheckpointManager(run_folder / "checkpoints", 100)


def step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


def assert_same_state(a: dict, b: dict, keys=("model",)) -> None:
    """Bitwise: on the CPU an interrupted and resumed run repeats the uninterrupted one exactly
    (weights and BN statistics; with "engine" also momentum buffers, lr schedule and scaler)."""
    def same(x, y, where: str) -> None:
        if isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        else:
            assert x == y, where

    for key in keys:
        same(a[key], b[key], key)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic) -> dict:
    """One process, never interrupted: the final checkpoint every interrupted run must end with."""
    folder = tmp_path_factory.mktemp("reference")
    assert main(["--config", str(write_config(folder, synthetic))]) == 0
    return load_checkpoint(checkpoints(folder / "runs" / "r").latest())


# -- 1. bad configs and command lines: one line, exit 2 ---------------------------------------------------


DELETE = object()  # set_key's value that removes the key


def set_key(tree: dict, dotted: str, value) -> None:
    *sections, key = dotted.split(".")
    node = tree
    for section in sections:
        node = node.setdefault(section, {})
    if value is DELETE:
        node.pop(key, None)
    else:
        node[key] = value


class Ctx:
    """What a case needs: a fresh folder, the synthetic data, a checkpoint of the base model."""

    def __init__(self, tmp_path: Path, synthetic: Path, checkpoint: Path):
        self.tmp, self.data, self.checkpoint = tmp_path, synthetic, checkpoint

    def config(self, changes: dict | None = None, root: Path | None = None) -> str:
        tree = base_tree(self.tmp, root or self.data)
        for dotted, value in (changes or {}).items():
            set_key(tree, dotted, value)
        path = self.tmp / "cfg.yaml"
        path.write_text(yaml.safe_dump(tree))
        return str(path)

    def data_copy(self, change) -> Path:
        root = self.tmp / "data"
        shutil.copytree(self.data, root)
        change(root)
        return root


def edit(**changes):
    """A config with `changes` ({'optim.lr': -1} spelled optim__lr=-1)."""
    return lambda ctx: ["--config", ctx.config({k.replace("__", "."): v for k, v in changes.items()})]


def with_data(change):
    return lambda ctx: ["--config", ctx.config(root=ctx.data_copy(change))]


def empty_class_folder(root: Path) -> None:
    (root / "train" / "zzz").mkdir()


def val_class_not_in_train(root: Path) -> None:
    shutil.copytree(next((root / "val").iterdir()), root / "val" / "zebra")


def no_val_folder(root: Path) -> None:
    shutil.rmtree(root / "val")


def not_a_checkpoint(ctx) -> list[str]:
    (ctx.tmp / "notes.pt").write_text("these are not weights\n")
    return ["--config", ctx.config(), "--resume", str(ctx.tmp / "notes.pt")]


def broken_yaml(ctx) -> list[str]:
    (ctx.tmp / "broken.yaml").write_text("model: [unclosed\n  name: tiny_vgg\n")
    return ["--config", str(ctx.tmp / "broken.yaml")]


def submit(*argv):
    return lambda ctx: ("submit", ["--config", ctx.config(), "--dry-run", *argv])


NEEDS_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="the check needs DeepSpeed installed")
BAD_INPUTS = [  # (case, argv builder, what stderr must say)
    ("unknown key", edit(optim__learning_rate=0.1), r"cfg\.yaml: optim\.learning_rate: unknown key; allowed here: .*\blr\b"),
    ("unknown section", edit(optimizer={"lr": 1}),
     r"optimizer: unknown key; allowed here: data, distributed, model, optim, precision, run"),
    ("wrong type", edit(optim__epochs="ten"), r"optim\.epochs: Input should be a valid integer.*'ten'"),
    ("negative lr", edit(optim__lr=-0.1), r"optim\.lr: Input should be greater than 0 \(got -0\.1\)"),
    ("missing section", edit(data=DELETE), r"cfg\.yaml: data: Field required"),
    ("rank 0", edit(model__lowrank={"ranks": [None, 0, 4, 4]}), r"model\.lowrank: ranks must be >= 1 \(or null"),
    ("rank above a layer's max rank", edit(model__lowrank={"ranks": [None, 1000, 4, 4]}),
     r"^error: model\.lowrank\.ranks: layer \S+: rank 1000 is out of range for a 3×3 conv 32→64 .*: allowed 1\.\.96$"),
    ("rank list of the wrong length", edit(model__lowrank={"ranks": [4, 4]}),
     r"model\.lowrank\.ranks: a rank list needs one entry per factorizable conv: the model has 4, the list has 2"),
    ("unknown preset", edit(model__lowrank={"preset": "tai2016"}),
     r"^error: model\.lowrank\.preset: tiny_vgg has no preset 'tai2016'; available: none$"),
    ("unknown model", edit(model__name="resnet50"), r"model\.name: unknown model 'resnet50'; available: alexnet, "),
    ("fewer classes than the data", edit(model__num_classes=2),
     r"model\.num_classes: 2 is fewer than the 4 classes of .*data; set at least 4"),
    ("unknown engine", edit(distributed__engine="horovod"),
     r"distributed\.engine: Input should be 'ddp' or 'deepspeed' \(got 'horovod'\)"),
    ("unknown data back-end", edit(data__backend="pil"),
     r"data\.backend: Input should be 'auto', 'dali' or 'torchvision' \(got 'pil'\)"),
    ("missing data dir", edit(data__root="/no/such/imagenet"), r"data: data folder '/no/such/imagenet' does not exist"),
    ("missing list file", edit(data__train_list="/no/such/train.txt"),
     r"data: train_list: file '/no/such/train\.txt' does not exist"),
    ("no val folder", with_data(no_val_folder),
     r"data folder '.*/val' does not exist \(expected root/train and root/val\)"),
    ("empty class folder", with_data(empty_class_folder), r"class folder '.*/train/zzz' holds no \.JPEG/\.jpg images"),
    ("val classes missing from train", with_data(val_class_not_in_train),
     r"class folder '.*/val/zebra' is not among the train classes"),
    pytest.param("DALI GPU without a GPU", edit(data__backend="dali", data__dali_device="gpu"),
                 r"^error: data\.dali_device: 'gpu' needs a CUDA GPU and none is visible; use 'cpu' or 'auto'$",
                 marks=pytest.mark.skipif(HAS_CUDA or not HAS_DALI, reason="needs DALI and no GPU")),
    pytest.param("CUDA without a GPU", edit(run__device="cuda"),
                 r"run\.device: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")),
    ("fp16 on the CPU", edit(precision={"amp": "fp16"}), r"precision\.amp: 'fp16' needs a CUDA GPU"),
    ("warm-up longer than the run", edit(optim__warmup_epochs=2),
     r"optim: warmup_epochs \(2\.0\) must be shorter than epochs \(2\)"),
    ("decomposed without a dense checkpoint", edit(model__lowrank={"mode": "decomposed", "speedup": 2.0}),
     r"model\.lowrank: mode 'decomposed' needs dense_checkpoint"),
    ("dense checkpoint missing",
     edit(model__lowrank={"mode": "decomposed", "speedup": 2.0, "dense_checkpoint": "/no/such/dense.pt"}),
     r"^error: model\.lowrank\.dense_checkpoint: file '/no/such/dense\.pt' does not exist$"),
    pytest.param("projected under DeepSpeed", edit(distributed__engine="deepspeed", model__lowrank={"mode": "projected", "speedup": 2.0}),
                 r"model\.lowrank\.mode 'projected' needs distributed\.engine 'ddp'", marks=NEEDS_DEEPSPEED),
    pytest.param("skipping non-finite steps under DeepSpeed with accumulation",
                 edit(distributed__engine="deepspeed", optim__accumulate=2, optim__skip_nonfinite_steps=2),
                 r"cfg\.yaml: optim\.skip_nonfinite_steps with distributed\.engine 'deepspeed' needs optim\.accumulate 1",
                 marks=NEEDS_DEEPSPEED),
    ("config file missing", lambda ctx: ["--config", str(ctx.tmp / "missing.yaml")],
     r"config file '.*missing\.yaml' does not exist"),
    ("config not YAML", broken_yaml, r"broken\.yaml: not valid YAML: .* at line 2, column \d+$"),
    ("--set without a value", lambda ctx: ["--config", ctx.config(), "--set", "optim.lr"],
     r"--set 'optim\.lr': expected KEY\.PATH=VALUE"),
    ("--set value not YAML", lambda ctx: ["--config", ctx.config(), "--set", "optim.milestones=[3, 6"],
     r"--set 'optim\.milestones=\[3, 6': the value is not valid YAML \(.* at line 1, column \d+\)$"),
    ("resume path that does not exist", lambda ctx: ["--config", ctx.config(), "--resume", str(ctx.tmp / "nope.pt")],
     r"--resume: checkpoint '.*nope\.pt' does not exist"),
    ("resume path that is a folder", lambda ctx: ["--config", ctx.config(), "--resume", str(ctx.tmp)],
     r"--resume: '.*' is a folder; give a checkpoint file"),
    ("resume path of another model",
     lambda ctx: ["--config", ctx.config({"model.lowrank.speedup": 3.0}), "--resume", str(ctx.checkpoint)],
     r"was written for model lowrank\.speedup=2\.0, not this config's lowrank\.speedup=3\.0: resume with the config"),
    ("resume path that is not a checkpoint", not_a_checkpoint,
     r"checkpoint '.*notes\.pt' cannot be read \(damaged, or not a checkpoint\)"),
    ("--nodes 0", submit("--nodes", "0"), r"^error: --nodes: must be >= 1, got 0$"),
    ("--tasks-per-node 0", submit("--tasks-per-node", "0"), r"^error: --tasks-per-node: must be >= 1, got 0$"),
]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, synthetic) -> Path:
    """A checkpoint of the base config's model (one step)."""
    folder = tmp_path_factory.mktemp("base")
    assert main(["--config", str(write_config(folder, synthetic)), "--set", "run.max_steps=1"]) == 0
    return checkpoints(folder / "runs" / "r").latest()


def load_submit():
    """What `python launch/submit.py` runs."""
    from lowrank_dist.launch import cli

    return cli


def test_there_are_at_least_20_bad_input_cases():
    assert len(BAD_INPUTS) >= 20


@pytest.mark.parametrize("case, build, message", BAD_INPUTS, ids=[getattr(c, "values", c)[0] for c in BAD_INPUTS])
def test_a_bad_input_gives_one_line_naming_it_and_exit_2(tmp_path, synthetic, base_checkpoint, case, build, message,
                                                         capsys):
    argv = build(Ctx(tmp_path, synthetic, base_checkpoint))
    command, argv = argv if isinstance(argv, tuple) else ("train", argv)
    code = (load_submit().main if command == "submit" else main)(argv)
    err = one_line_error(capsys)
    assert code == 2, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not list((tmp_path / "runs").glob("*/checkpoints/step_*")), "a refused run trains nothing"


def test_deepspeed_asked_for_but_not_installed(tmp_path, synthetic, base_checkpoint, monkeypatch, capsys):
    """DeepSpeed hidden (find_spec finds nothing), in this process and, below, in a fresh one."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    config = Ctx(tmp_path, synthetic, base_checkpoint).config({"distributed.engine": "deepspeed"})
    assert main(["--config", config]) == 2
    assert re.search(r"cfg\.yaml: distributed\.engine: 'deepspeed' is not installed here \(pip install"
                     r" 'lowrank-dist\[deepspeed\]'\); use 'ddp'$", one_line_error(capsys))


def test_bad_inputs_print_no_traceback_in_a_fresh_process(tmp_path, synthetic, base_checkpoint):
    """Four representative cases as real processes, all at once: at load time, DeepSpeed hidden from
    the interpreter, inside the trainer (model build) and at resume."""
    ctx = lambda name: Ctx(tmp_path / name, synthetic, base_checkpoint)  # noqa: E731
    for name in ("key", "deepspeed", "rank", "resume"):
        (tmp_path / name).mkdir()
    hide_deepspeed = ("import sys; sys.modules['deepspeed'] = None; from lowrank_dist.train import main;"
                      " sys.exit(main(sys.argv[1:]))")
    cases = {
        "key": (TRAIN + ["--config", ctx("key").config({"optim.learning_rate": 0.1})], "optim.learning_rate: unknown key"),
        "deepspeed": ([sys.executable, "-c", hide_deepspeed, "--config",
                       ctx("deepspeed").config({"distributed.engine": "deepspeed"})], "'deepspeed' is not installed here"),
        "rank": (TRAIN + ["--config", ctx("rank").config({"model.lowrank": {"ranks": [None, 1000, 4, 4]}})],
                 "model.lowrank.ranks: layer 4: rank 1000 is out of range"),
        "resume": (TRAIN + ["--config", ctx("resume").config({"model.lowrank.speedup": 3.0}),
                            "--resume", str(base_checkpoint)], "was written for model lowrank.speedup=2.0"),
    }
    running = {name: subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, (command, _) in cases.items()}
    for name, process in running.items():
        out, err = process.communicate(timeout=180)
        assert process.returncode == 2, f"{name}: exit {process.returncode}\n{err[-2000:]}"
        assert "Traceback" not in err and cases[name][1] in err, f"{name}: {err[-2000:]}"
        assert len([line for line in err.splitlines() if line.startswith("error")]) == 1, err


# -- several processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`world_size` processes started by hand, as torchrun would (RANK, WORLD_SIZE, MASTER_*), each
    with its own log files, so a test can kill one and read what each said."""

    def __init__(self, folder: Path, command: list[str], world_size: int = 2, **env):
        folder.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ, WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    OMP_NUM_THREADS="1", **env)  # one thread each, as torchrun sets it
        self.logs = [(folder / f"rank{r}.out", folder / f"rank{r}.err") for r in range(world_size)]
        self.processes = [
            subprocess.Popen(command, cwd=ROOT, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                             stdout=open(out, "w"), stderr=open(err, "w"))
            for r, (out, err) in enumerate(self.logs)
        ]

    def wait(self, timeout: float = 240) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.processes]
        finally:
            self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def err(self, rank: int) -> str:
        return self.logs[rank][1].read_text()

    def out(self, rank: int) -> str:
        return self.logs[rank][0].read_text()


def wait_for_step(run_folder: Path, step: int, processes, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = checkpoints(run_folder).latest()
        if latest is not None and step_of(latest) >= step:
            return
        assert all(p.poll() is None for p in processes), "a process ended before the fault was injected"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} after {timeout} s")


def pid_of_rank(marker: str, rank: int) -> int:
    """The pid of the training process of rank `rank` among those started with RELIABILITY_RUN=marker."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (f"RELIABILITY_RUN={marker}".encode() in environ and f"RANK={rank}".encode() in environ
                and b"lowrank_dist.train" in command and b"torch.distributed.run" not in command):
            return int(pid)
    raise AssertionError(f"no rank {rank} process")


SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]


def run_local(config: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(SUBMIT + ["--config", str(config), "--local", "--tasks-per-node", "2", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


# -- 3. faults: a rank killed or hung ---------------------------------------------------------------------------


def test_a_rank_killed_mid_step_ends_the_job_clearly_and_the_resume_is_exact(tmp_path, synthetic):
    """Two gloo ranks under `submit.py --local` (torchrun); rank 1 is SIGKILLed once step 2 is
    checkpointed. The launcher must exit non-zero within seconds, rank 0 saying it lost contact
    and naming the last checkpoint, torchrun naming rank 1; that checkpoint loads, and running
    the same command again ends with the weights of a run that was never killed."""
    sections = dict(optim={"epochs": 4})  # 12 steps of 2 × 16
    straight = write_config(tmp_path / "straight", synthetic, "straight", **sections)
    run_local(straight)
    config = write_config(tmp_path / "killed", synthetic, "killed", **sections)
    run_folder = tmp_path / "killed" / "runs" / "killed"
    marker = uuid.uuid4().hex
    launcher = subprocess.Popen(SUBMIT + ["--config", str(config), "--local", "--tasks-per-node", "2"], cwd=ROOT,
                                env=dict(os.environ, RELIABILITY_RUN=marker), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run_folder, 2, [launcher])
        os.kill(pid_of_rank(marker, 1), signal.SIGKILL)
        killed_at = time.time()
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert time.time() - killed_at < 60 and launcher.returncode != 0
    latest = checkpoints(run_folder).latest()
    assert re.search(r"error \(rank 0 of 2\): lost contact with another process \(.*\): a rank died, was killed or did"
                     r" not answer within distributed\.timeout_s \(30 s\); .* Last checkpoint: .*step_\d{9}\.pt", err), err
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", err), err  # torchrun's Root Cause
    assert err.rstrip().splitlines()[-1].startswith("error: the 2 local processes stopped"), err
    stopped = load_checkpoint(latest)
    assert stopped["step"] >= 2 and stopped["world_size"] == 2
    assert not list(run_folder.glob("checkpoints/.*"))  # no half-written file

    resumed = run_local(config)
    assert f"resumed from {latest}" in resumed.stdout
    final = load_checkpoint(checkpoints(run_folder).latest())
    assert final["step"] == 12
    assert_same_state(final, load_checkpoint(checkpoints(tmp_path / "straight" / "runs" / "straight").latest()),
                      keys=("model", "engine"))


def test_a_hung_rank_ends_the_others_within_the_timeout(tmp_path, synthetic):
    """Rank 1 SIGSTOPped mid-run keeps its sockets open: rank 0 waits distributed.timeout_s (5 s)
    in its next collective, then stops with one line, not after the default 30 minutes."""
    config = write_config(tmp_path, synthetic, optim={"epochs": 20}, distributed={"timeout_s": 5})
    ranks = Ranks(tmp_path / "logs", TRAIN + ["--config", str(config)])
    try:
        wait_for_step(tmp_path / "runs" / "r", 2, ranks.processes)
        ranks.processes[1].send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        code = ranks.processes[0].wait(timeout=60)
        waited = time.time() - stopped_at
    finally:
        ranks.kill()
    err = ranks.err(0)
    assert code == 1 and waited < 30, (code, waited, err)  # the timeout's 5 s, plus the step rank 0 was in
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(r"^error \(rank 0 of 2\): lost contact with another process \(.*[Tt]imed out.*\): .* within"
                     r" distributed\.timeout_s \(5 s\); .* Last checkpoint: .*step_\d{9}\.pt", err), err


# -- 3. faults: checkpoints ---------------------------------------------------------------------------------------


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_and_the_resume_is_exact(tmp_path, synthetic,
                                                                                          reference, capsys):
    """The process is SIGKILLed inside torch.save of step 3: step 2 stays the latest and loads; the
    next run removes the half-written file, resumes from step 2 and ends bitwise as if never killed."""
    config = write_config(tmp_path, synthetic)
    done = subprocess.run(FAULTY + ["--config", str(config)], cwd=ROOT, env=dict(os.environ, TEST_FAIL_SAVE="3:kill"),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    folder = tmp_path / "runs" / "r" / "checkpoints"
    assert [p.name for p in folder.glob(".step_000000003.pt.tmp-*")], "the kill left its temporary file"
    latest = checkpoints(tmp_path / "runs" / "r").latest()
    assert latest.name == "step_000000002.pt" and load_checkpoint(latest)["step"] == 2

    assert main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "removed .step_000000003.pt.tmp-" in out and f"resumed from {latest}" in out
    assert not list(folder.glob(".*"))
    assert_same_state(load_checkpoint(checkpoints(tmp_path / "runs" / "r").latest()), reference, keys=("model", "engine"))


def test_a_full_disk_while_checkpointing_stops_clearly_and_keeps_the_previous_checkpoint(tmp_path, synthetic, reference,
                                                                                         monkeypatch, capsys):
    config = write_config(tmp_path, synthetic)
    fail_saves(monkeypatch, step=3, how="enospc")
    assert main(["--config", str(config)]) == 1
    folder = tmp_path / "runs" / "r" / "checkpoints"
    err = one_line_error(capsys)
    assert err == (f"training stopped: could not write the checkpoint of step 3 to {folder}: [Errno 28] No space left on"
                   f" device; the last complete checkpoint, {folder / 'step_000000002.pt'}, is kept: make room and run"
                   " the same command to resume")
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000001.pt", "step_000000002.pt"]  # no temporary file
    assert load_checkpoint(folder / "step_000000002.pt")["step"] == 2

    monkeypatch.undo()  # room again
    assert main(["--config", str(config)]) == 0
    assert_same_state(load_checkpoint(checkpoints(tmp_path / "runs" / "r").latest()), reference, keys=("model", "engine"))


def test_a_full_disk_on_rank_0_stops_every_rank_together(tmp_path, synthetic):
    """Rank 1 does not wait in the barrier for the timeout: both stop at once, with exit code 1."""
    config = write_config(tmp_path, synthetic, distributed={"timeout_s": 120})
    ranks = Ranks(tmp_path / "logs", FAULTY + ["--config", str(config)], TEST_FAIL_SAVE="2:enospc")
    started = time.time()
    assert ranks.wait(timeout=100) == [1, 1]
    assert time.time() - started < 100  # well under distributed.timeout_s
    assert "could not write the checkpoint of step 2" in ranks.err(0) and "No space left on device" in ranks.err(0)
    assert "could not write the checkpoint of step 2" in ranks.err(1) and "it failed on another rank" in ranks.err(1)
    assert "Traceback" not in ranks.err(0) + ranks.err(1)
    assert checkpoints(tmp_path / "runs" / "r").latest().name == "step_000000001.pt"


def test_a_full_disk_for_the_logs_warns_once_and_training_goes_on(tmp_path, synthetic, reference, monkeypatch, capsys):
    """From step 3 on, TensorBoard and metrics.jsonl writes fail with ENOSPC: one warning per sink,
    the run finishes (exit 0) with the uninterrupted weights, the log lines before the fault kept."""
    full = OSError(28, "No space left on device")
    real_add_scalar = run_log_module.SummaryWriter.add_scalar

    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        if step is not None and step >= 3:
            raise full
        return real_add_scalar(self, tag, value, step, *args, **kwargs)

    class FullAfterStep2:
        """metrics.jsonl whose writes fail once a record of step 3 or later arrives."""

        def __init__(self, stream):
            self.stream = stream

        def write(self, line):
            if json.loads(line)["step"] >= 3:
                raise full
            return self.stream.write(line)

        def __getattr__(self, name):
            return getattr(self.stream, name)

    real_init = run_log_module.RunLog.__init__

    def init(self, folder, enabled):
        real_init(self, folder, enabled)
        self.metrics = FullAfterStep2(self.metrics)

    monkeypatch.setattr(run_log_module.SummaryWriter, "add_scalar", add_scalar)
    monkeypatch.setattr(run_log_module.RunLog, "__init__", init)
    config = write_config(tmp_path, synthetic)
    assert main(["--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == [
        "warning: could not write tensorboard ([Errno 28] No space left on device); the run goes on without it",
        "warning: could not write metrics ([Errno 28] No space left on device); the run goes on without it",
    ]
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 2
    assert_same_state(load_checkpoint(checkpoints(tmp_path / "runs" / "r").latest()), reference, keys=("model", "engine"))


# -- 3. faults: a non-finite loss ----------------------------------------------------------------------------------


def test_a_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, synthetic, monkeypatch, capsys):
    poison_batches(monkeypatch, {(0, 2)})
    config = write_config(tmp_path, synthetic)
    assert main(["--config", str(config)]) == 1
    folder = tmp_path / "runs" / "r" / "checkpoints"
    assert one_line_error(capsys) == (
        f"training stopped: the loss became nan in step 3 (epoch 0, batch 2) on some rank; last good checkpoint:"
        f" {folder / 'step_000000002.pt'}. Lower optim.lr or add warm-up; optim.skip_nonfinite_steps N would skip up to"
        " N such steps")
    assert [p.name for p in checkpoints(tmp_path / "runs" / "r").step_files()] == ["step_000000001.pt", "step_000000002.pt"]
    state = load_checkpoint(folder / "step_000000002.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_skipped_nan_steps_leave_weights_optimizer_and_bn_statistics_untouched(tmp_path, synthetic, monkeypatch):
    """optim.skip_nonfinite_steps 2, NaN in steps 3 and 8: both updates are skipped, training ends,
    the count is logged, and the checkpoint after each skipped step equals the one before it
    (weights, BN running statistics, momentum) while the lr schedule moves on."""
    poison_batches(monkeypatch, {(0, 2), (1, 1)})
    config = write_config(tmp_path, synthetic, optim={"skip_nonfinite_steps": 2})
    assert main(["--config", str(config)]) == 0
    folder = tmp_path / "runs" / "r"
    for skipped in (3, 8):
        before, after = (load_checkpoint(checkpoints(folder).path_for(s)) for s in (skipped - 1, skipped))
        assert_same_state(before, after)
        for a, b in zip(before["engine"]["optimizer"]["state"].values(), after["engine"]["optimizer"]["state"].values()):
            assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        assert after["step"] == before["step"] + 1  # the lr is a function of the step: it moved on
        assert after["engine"]["optimizer"]["param_groups"][0]["lr"] != before["engine"]["optimizer"]["param_groups"][0]["lr"]
    final = load_checkpoint(checkpoints(folder).latest())
    assert final["step"] == 12 and final["skipped_nonfinite"] == 2
    assert all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())
    logged = {row["step"]: row["train/skipped_nonfinite"] for row in map(json.loads, (folder / "metrics.jsonl").open())
              if "train/skipped_nonfinite" in row}
    assert [logged[s] for s in (2, 3, 7, 8, 12)] == [0, 1, 1, 2, 2]


def test_with_accumulation_the_whole_step_is_skipped(tmp_path, synthetic, monkeypatch):
    """optim.accumulate 2, NaN in the second micro-batch of step 2: the first one's forward and
    backward are dropped too, BN statistics included; the step leaves no trace."""
    poison_batches(monkeypatch, {(0, 3)})
    config = write_config(tmp_path, synthetic, optim={"skip_nonfinite_steps": 1, "accumulate": 2, "epochs": 1})
    assert main(["--config", str(config)]) == 0
    manager = checkpoints(tmp_path / "runs" / "r")
    assert_same_state(*(load_checkpoint(manager.path_for(s)) for s in (1, 2)))
    assert load_checkpoint(manager.latest())["step"] == 3


def test_more_nan_steps_than_allowed_stop_the_run(tmp_path, synthetic, monkeypatch, capsys):
    poison_batches(monkeypatch, {(0, 2), (0, 4)})
    config = write_config(tmp_path, synthetic, optim={"skip_nonfinite_steps": 1})
    assert main(["--config", str(config)]) == 1
    err = one_line_error(capsys)
    assert "the loss became nan in step 5 (epoch 0, batch 4)" in err and "step_000000004.pt" in err
    assert "(already skipped 1, the optim.skip_nonfinite_steps limit)" in err


def test_a_nan_between_sync_points_stops_at_the_next_one_before_saving(tmp_path, synthetic, monkeypatch, capsys):
    """The loop reads the device only at sync points: with checkpoints every 2 steps and log lines
    every 4, a NaN in step 3 is found at step 4's sync point — before step 4's checkpoint is
    written — so the last checkpoint is step 2's, written before the bad step."""
    poison_batches(monkeypatch, {(0, 2)})
    config = write_config(tmp_path, synthetic, run={"log_every": 4, "checkpoint_every": 2, "stop_check_every": 100})
    assert main(["--config", str(config)]) == 1
    folder = tmp_path / "runs" / "r" / "checkpoints"
    assert one_line_error(capsys) == (
        f"training stopped: the loss became nan in step 3 (epoch 0, batch 2) on some rank; last good checkpoint:"
        f" {folder / 'step_000000002.pt'}. Lower optim.lr or add warm-up; optim.skip_nonfinite_steps N would skip up to"
        " N such steps")
    assert [p.name for p in checkpoints(tmp_path / "runs" / "r").step_files()] == ["step_000000002.pt"]


def test_a_skipped_first_step_leaves_zero_momentum(tmp_path, synthetic, monkeypatch):
    """A NaN in the very first step: torch's fused SGD would leave its freshly allocated momentum
    buffers uninitialised when that step is skipped; ours start at zero, and training goes on."""
    poison_batches(monkeypatch, {(0, 0)})
    config = write_config(tmp_path, synthetic, optim={"skip_nonfinite_steps": 1, "epochs": 1})
    assert main(["--config", str(config)]) == 0
    manager = checkpoints(tmp_path / "runs" / "r")
    first = load_checkpoint(manager.path_for(1))
    assert first["skipped_nonfinite"] == 1
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(s["momentum_buffer"]))
               for s in first["engine"]["optimizer"]["state"].values())
    final = load_checkpoint(manager.latest())
    assert final["step"] == 6 and all(torch.isfinite(t).all() for t in final["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed", marks=NEEDS_DEEPSPEED)])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, synthetic, engine):
    """Only rank 1 sees the NaN (epoch 0, batch 1 → step 2): the ranks agree, both skip, neither
    waits for the other in a collective, and the run finishes with the skipped update absent —
    under DeepSpeed (ZeRO-2) too, whose fp32 partitions and momentum stay as they were."""
    config = write_config(tmp_path, synthetic, optim={"skip_nonfinite_steps": 1, "epochs": 1},
                          distributed={"timeout_s": 60, "engine": engine, "zero_stage": 2})
    ranks = Ranks(tmp_path / "logs", FAULTY + ["--config", str(config)], TEST_NAN_BATCHES="0:1", TEST_NAN_RANKS="1")
    assert ranks.wait() == [0, 0], ranks.err(0)[-2000:] + ranks.err(1)[-2000:]
    assert "step 2: non-finite loss on some rank, update skipped (1 of at most 1" in ranks.out(0)
    manager = checkpoints(tmp_path / "runs" / "r")
    assert_same_state(*(load_checkpoint(manager.path_for(s)) for s in (1, 2)))
    assert load_checkpoint(manager.latest())["step"] == 3
    if engine == "deepspeed":
        for rank in (0, 1):
            before, after = (manager.load_shard(manager.path_for(s), rank, 2)["engine"]["optimizer"] for s in (1, 2))
            assert_same_state(before, after, keys=("single_partition_of_fp32_groups",))
            assert_same_state(before["base_optimizer_state"], after["base_optimizer_state"], keys=("state",))


# -- 3. faults: a resume at another world size ---------------------------------------------------------------------


def test_a_mid_epoch_checkpoint_refuses_another_world_size(tmp_path, synthetic):
    config = write_config(tmp_path, synthetic)
    assert main(["--config", str(config), "--set", "run.max_steps=2"]) == 0  # 1 process, 2 of 6 steps
    ranks = Ranks(tmp_path / "logs", TRAIN + ["--config", str(config)])
    assert ranks.wait() == [2, 2]
    for rank in (0, 1):
        err = ranks.err(rank)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(rf"^error \(rank {rank} of 2\): --resume '.*step_000000002\.pt' stopped mid-epoch with 1"
                         r" processes; resume it with 1, or from a checkpoint written at the end of an epoch", err), err


def test_an_end_of_epoch_checkpoint_resumes_at_another_world_size(tmp_path, synthetic):
    """1 process trains epoch 1 (6 steps of 16); 2 processes train epoch 2 (3 steps of 2 × 16) —
    the same images, cropped the same, sharded over the new ranks — on the schedule's second half,
    at the new global batch's lr (linear scaling: 0.05 × 32/16)."""
    config = write_config(tmp_path, synthetic, optim={"lr_scaling": "linear", "lr_batch": 16})
    assert main(["--config", str(config), "--set", "run.max_steps=6"]) == 0
    folder = tmp_path / "runs" / "r"
    epoch_end = load_checkpoint(checkpoints(folder).latest())
    assert (epoch_end["step"], epoch_end["epoch"], epoch_end["batch"]) == (6, 1, 0)
    ranks = Ranks(tmp_path / "logs", TRAIN + ["--config", str(config)])
    assert ranks.wait() == [0, 0], ranks.err(0)[-2000:]
    assert "written by 1 process(es), resumed by 2" in ranks.out(0)
    final = load_checkpoint(checkpoints(folder).latest())
    assert (final["step"], final["epoch"], final["world_size"]) == (9, 2, 2)
    assert any(not torch.equal(final["model"][k], epoch_end["model"][k]) for k in final["model"])
    optim = load_config(config).optim
    lrs = {row["step"]: row["train/lr"] for row in map(json.loads, (folder / "metrics.jsonl").open()) if "train/lr" in row}
    for step in (7, 8, 9):  # the lr logged after a step is the next step's: position step - 6 + 3 of 6
        assert lrs[step] == pytest.approx(scaled_lr(optim, 32) * lr_factor(step - 3, 3, optim)), step


def test_deepspeed_shards_refuse_another_world_size(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for rank in (0, 1):
        manager.save_shard({"engine": {}}, step=4, rank=rank, world_size=2)
    manager.save({"step": 4}, step=4)
    with pytest.raises(CheckpointError, match=r"step_000000004\.rank00000-of-00001\.pt' is missing \(found"
                                              r" step_000000004\.rank00000-of-00002\.pt, step_000000004\.rank00001-of-00002\.pt:"
                                              r" it was written by another number of processes; resume with that many\)"):
        manager.load_shard(manager.path_for(4), rank=0, world_size=1)


# -- preemption ------------------------------------------------------------------------------------------------------


def test_a_stop_signal_checkpoints_the_current_step_and_the_resume_is_exact(tmp_path, synthetic, reference,
                                                                           monkeypatch, capsys):
    """SLURM's USR2 (before the time limit) arriving during step 3: the step is finished and
    checkpointed, the command exits 3, and running it again ends with the uninterrupted weights."""
    config = write_config(tmp_path, synthetic, run={"checkpoint_every": 0})
    real = trainer_module.build_loaders

    def build_loaders(*args, **kwargs):
        loaders = real(*args, **kwargs)
        epoch_of = loaders.train.epoch

        def epoch(number, start_batch=0):
            for index, batch in enumerate(epoch_of(number, start_batch), start=start_batch):
                if (number, index) == (0, 2):
                    os.kill(os.getpid(), signal.SIGUSR2)
                yield batch

        loaders.train.epoch = epoch
        return loaders

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        monkeypatch.setattr(trainer_module, "build_loaders", build_loaders)
        assert main(["--config", str(config)]) == 3
        assert re.search(r"^preempted: stopped on request at step 3; checkpoint: .*step_000000003\.pt$",
                         one_line_error(capsys))
        monkeypatch.undo()
        assert main(["--config", str(config)]) == 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert_same_state(load_checkpoint(checkpoints(tmp_path / "runs" / "r").latest()), reference, keys=("model", "engine"))
