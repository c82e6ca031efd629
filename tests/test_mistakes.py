"""Nothing a user does by mistake loses a run (issue 24): one run per run folder, a full disk is one
line, no image can exhaust memory, every damaged file we wrote ourselves is rebuilt or named, a
stop request (Ctrl-C too) checkpoints, and saving never changes the run.

Each case runs the real command (`python -m lowrank_dist.train`'s `main`, in this process or in
subprocesses where a second process, several ranks or a signal need it). `test_every_case` is the
table (one row per case: exit code, one line naming the file or key, no traceback, nothing lost);
the cases that need more than one command have their own tests below it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from lowrank_dist.files import TEMPORARY_FILE
from lowrank_dist.training import trainer as trainer_module
from lowrank_dist.training.checkpoint import load_checkpoint
from lowrank_dist.training.run_lock import LOCK_FILE, acquire
from lowrank_dist.train import main

from . import test_reliability as reliability
from .test_reliability import (ROOT, TRAIN, Ranks, assert_same_state, base_checkpoint, checkpoints,  # noqa: F401
                               reference, synthetic, wait_for_step, write_config)


# -- the table: one row per case ------------------------------------------------------------------------------


@dataclass
class Case:
    """One mistake: the command (train, evaluate, data.check, data.synthetic, data.index,
    upgrade_checkpoint), its arguments built in a fresh folder, the exit code, the one line on
    stderr (a regex; None: nothing on stderr), and what must still be there afterwards."""

    number: int  # the case in issue 24
    name: str
    command: str
    build: Callable[[Ctx], list[str]]
    code: int
    line: str | None
    kept: Callable[[Ctx], None] | None = None
    out: str | None = None  # a line stdout must hold (data.check reports on stdout)
    lines: int = 1  # stderr lines, each matching `line` (a warning per split of the data index)
    marks: tuple = ()


class Ctx(reliability.Ctx):
    """A case's fresh folder, the shared synthetic data and a checkpoint of the base model; tmpfs
    disks (`disk`), and `monkeypatch` for faults injected in this process."""

    def __init__(self, tmp_path, synthetic, checkpoint, small_disk, monkeypatch):
        super().__init__(tmp_path, synthetic, checkpoint)
        self.disk, self.monkeypatch, self.held = small_disk, monkeypatch, []

    def full_disk(self) -> Path:
        """A folder on a 4 KiB tmpfs that a file already fills."""
        disk = self.disk(4)
        (disk / "filler").write_bytes(b"\0" * 4096)
        return disk

    def read_only_disk(self) -> Path:
        return self.disk(64, "ro")

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def train(self, changes: dict | None = None, *extra: str, root: Path | None = None) -> list[str]:
        return ["--config", self.config(changes, root), *extra]

    def saved(self, change: Callable[[dict], None], name: str = "edited.pt") -> Path:
        """The base checkpoint, loaded, changed by `change` and written back under `name`."""
        state = load_checkpoint(self.checkpoint)
        change(state)
        torch.save(state, self.tmp / name)
        return self.tmp / name

    @property
    def run_folder(self) -> Path:
        return self.tmp / "runs" / "r"


def run_command(command: str, argv: list[str]) -> int:
    from lowrank_dist import evaluate, upgrade_checkpoint
    from lowrank_dist.data import check, synthetic as synthetic_command

    from lowrank_dist.data import index

    mains = {"train": main, "evaluate": evaluate.main, "data.check": check.main, "data.synthetic": synthetic_command.main,
             "data.index": index.main, "upgrade_checkpoint": upgrade_checkpoint.main}
    return mains[command](argv)


def busy_folder(ctx: Ctx) -> list[str]:
    ctx.run_folder.mkdir(parents=True)
    ctx.held.append(acquire(ctx.run_folder))  # this process holds it, as another run would
    return ctx.train()


def busy_folder_kept(ctx: Ctx) -> None:
    os.close(ctx.held.pop())
    assert sorted(p.name for p in ctx.run_folder.iterdir()) == [LOCK_FILE], "the refused run wrote nothing"


def cache_with(ctx: Ctx, change: Callable[[dict], None]) -> list[str]:
    """run.out_dir/execution_cache.json as a short run with precision.execution auto writes it, then
    `change`d; the arguments of that run again."""
    from lowrank_dist.config import load_config
    from lowrank_dist.models import build_model
    from lowrank_dist.speed.execution import plan_execution

    changes = {"precision": {"execution": "auto"}, "run.max_steps": 1}
    argv = ctx.train(changes)
    cfg = load_config(argv[1])
    model = build_model(cfg.model.build_dict(4))
    cache = cfg.run.out_dir / "execution_cache.json"
    plan_execution(model, (16, 3, 32, 32), "auto", "cpu", cache=cache)
    data = json.loads(cache.read_text())
    replaced = change(data)
    cache.write_text(replaced if isinstance(replaced, str) else json.dumps(data))
    return argv


def dates_as_numbers(data: dict) -> None:
    for entry in data["layers"].values():
        entry["date"] = 20240101


def interrupt_in_step_3(ctx: Ctx) -> list[str]:
    """Ctrl-C (SIGINT to this process) while step 3's batch is loaded."""
    real = trainer_module.build_loaders

    def build_loaders(*args, **kwargs):
        loaders = real(*args, **kwargs)
        epoch_of = loaders.train.epoch

        def epoch(number, start_batch=0):
            for index, batch in enumerate(epoch_of(number, start_batch), start=start_batch):
                if (number, index) == (0, 2):
                    os.kill(os.getpid(), signal.SIGINT)
                yield batch

        loaders.train.epoch = epoch
        return loaders

    ctx.monkeypatch.setattr(trainer_module, "build_loaders", build_loaders)
    return ctx.train({"run.checkpoint_every": 0})


def one_class_fewer(ctx: Ctx) -> list[str]:
    """A run folder holding a checkpoint of the 4-class data, rerun on a data.root with 3 classes."""
    (ctx.run_folder / "checkpoints").mkdir(parents=True)
    shutil.copy(ctx.checkpoint, ctx.run_folder / "checkpoints" / "step_000000001.pt")

    def drop_a_class(root: Path) -> None:
        for split in ("train", "val"):
            shutil.rmtree(sorted((root / split).iterdir())[-1])

    return ctx.train(root=ctx.data_copy(drop_a_class))


def legacy_checkpoint(ctx: Ctx, keys: np.ndarray) -> Path:
    """A checkpoint as lowrank-dist wrote them before the weights-only format (NumPy's RNG state
    pickled), with `keys` as the state's key array."""
    state = load_checkpoint(ctx.checkpoint)
    state["rng"]["numpy"] = ("MT19937", np.asarray(keys), 0, 0, 0.0)
    torch.save(state, ctx.tmp / "old.pt")
    return ctx.tmp / "old.pt"


def broken_image(root: Path) -> None:
    (next((root / "train").iterdir()) / "broken.JPEG").write_bytes(b"not a JPEG at all")


def read_only(path: Path) -> Path:
    path.chmod(0o444)
    return path


def bomb(root: Path) -> None:
    """A 16×16 JPEG of 600 bytes whose header says 20000×20000 (decoded: 1.2 GB)."""
    import io
    import struct

    from PIL import Image

    data = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(data, "JPEG")
    data = bytearray(data.getvalue())
    frame = data.index(b"\xff\xc0")  # SOF0: length, precision, then height and width
    data[frame + 5:frame + 9] = struct.pack(">HH", 20000, 20000)
    (sorted((root / "train").iterdir())[1] / "bomb.JPEG").write_bytes(bytes(data))


def one_pixel_images(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        Image.new("RGB", (1, 1), (200, 10, 10)).save(sorted((root / split).iterdir())[0] / "tiny.JPEG")


def names_not_utf8(root: Path) -> None:
    """A file and a class folder (train and val) whose names are Latin-1 bytes."""
    first = sorted((root / "train").iterdir())[0]
    os.rename(os.fsencode(next(first.iterdir())), os.fsencode(first) + b"/caf\xe9.JPEG")
    for split in ("train", "val"):
        last = sorted((root / split).iterdir())[-1]
        os.rename(os.fsencode(last), os.fsencode(root / split) + b"/classe_\xe9")


def lists_not_utf8(ctx: Ctx) -> list[str]:
    """data.train_list/val_list files in Latin-1 naming a file whose name is Latin-1 bytes."""
    root = ctx.data_copy(names_not_utf8)
    for split in ("train", "val"):
        lines = [os.fsencode(path.relative_to(root)) + f" {label}".encode()
                 for label, folder in enumerate(sorted((root / split).iterdir())) for path in sorted(folder.iterdir())]
        (ctx.tmp / f"{split}.txt").write_bytes(b"\n".join(lines) + b"\n")
    return ctx.train({"data.train_list": str(ctx.tmp / "train.txt"), "data.val_list": str(ctx.tmp / "val.txt"),
                      "run.max_steps": 1}, root=root)


def symlink_loop(root: Path) -> None:
    (root / "train" / "loop").symlink_to("loop")


def indexed(ctx: Ctx, damage: Callable[[Path], None]) -> list[str]:
    """A copy of the data whose train index `damage` changed; the arguments of a short run on it."""
    from lowrank_dist.data.index import main as index_main

    root = ctx.data_copy(lambda root: None)
    assert index_main([str(root), "--jobs", "1"]) == 0
    damage(root / ".lowrank_index" / "train.npz")
    return ctx.train({"run.max_steps": 1}, root=root)


def labels_out_of_range(path: Path) -> None:
    arrays = dict(np.load(path))
    arrays["labels"] = arrays["labels"] + 100
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def data_on_a_full_disk(ctx: Ctx) -> list[str]:
    """The data set on a disk filled up after copying it: its index cannot be saved."""
    disk = ctx.disk(2048)
    shutil.copytree(ctx.data, disk / "data", ignore=shutil.ignore_patterns(".lowrank_index"))
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()
    return ctx.train({"run.max_steps": 1}, root=disk / "data")


def read_only_data_and_cache(ctx: Ctx) -> list[str]:
    """The data set on a read-only file system, and a cache folder that is read-only too."""
    disk = ctx.disk(2048)
    shutil.copytree(ctx.data, disk / "data")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True, timeout=30)
    ctx.monkeypatch.setenv("XDG_CACHE_HOME", str(ctx.read_only_disk()))
    return ctx.train({"run.max_steps": 1}, root=disk / "data")


NEEDS_DALI = (pytest.mark.skipif(not reliability.HAS_DALI, reason="needs NVIDIA DALI"),)
BOMB_LINE = (r"error: bad image '.*/bomb\.JPEG': its header declares 20000×20000 = 400,000,000 pixels, over"
             r" data\.max_image_pixels \(89,478,485\): decoding it could exhaust memory \(data\.on_bad_image is 'error';.*")


def files_under(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


CASES = [
    Case(1, "a run folder that another run holds", "train", busy_folder, 2,
         rf"error: run folder '.*/runs/r' is in use by another run \(host {re.escape(socket.gethostname())}, PID"
         rf" {os.getpid()}, since .*\): wait for it to end, or give this one another run\.name \(or run\.out_dir\)",
         busy_folder_kept),
    Case(2, "a full disk before the first step", "train", lambda ctx: ctx.train({"run.out_dir": str(ctx.disk(4))}), 1,
         r"training stopped: could not write to the run folder .*/r \(\[Errno 28\] No space left on device.*\); nothing"
         r" was trained: make room \(or fix its permissions\) and run the same command again"),
    Case(2, "evaluate --json on a full disk", "evaluate",
         lambda ctx: [str(ctx.checkpoint), "--json", str(ctx.full_disk() / "result.json")], 1,
         r"error: --json: could not write '.*/result\.json' \(\[Errno 28\] No space left on device\); the result is"
         r" the line above"),
    Case(2, "evaluate --json under a file", "evaluate",
         lambda ctx: [str(ctx.checkpoint), "--json", str(ctx.saved(lambda s: None, "file") / "result.json")], 2,
         r"error: --json: could not write '.*/file/result\.json' \(\[Errno 17\] File exists\); the result is the"
         r" line above"),
    Case(2, "data.check --list on a full disk", "data.check",
         lambda ctx: [str(ctx.data_copy(broken_image)), "--list", str(ctx.full_disk() / "bad.txt"), "--jobs", "1"], 1,
         r"error: --list: could not write '.*/bad\.txt' \(\[Errno 28\] No space left on device\)"),
    Case(2, "data.synthetic --out on a full disk", "data.synthetic",
         lambda ctx: ["--out", str(ctx.disk(64) / "set"), "--classes", "2", "--train-per-class", "40"], 1,
         r"error: --out: could not write the data set to '.*/set' \(\[Errno 28\] No space left on device\)",
         lambda ctx: files_under(ctx.tmp / "disk0" / "set") == [] or pytest.fail("half a data set was left")),
    Case(2, "data.synthetic --out that is a file", "data.synthetic",
         lambda ctx: ["--out", str(ctx.saved(lambda s: None, "file"))], 2, r"error: .*/file is a file, not a folder"),
    Case(2, "the data index on a full disk", "train", data_on_a_full_disk, 0,
         r"warning: could not save the data index .*/data/\.lowrank_index/(train|val)\.npz \(No space left on device\); the"
         r" next run builds it again", lines=2),
    Case(3, "an image declaring 20000×20000 pixels (torchvision)", "train",
         lambda ctx: ctx.train({"data.backend": "torchvision"}, root=ctx.data_copy(bomb)), 2, BOMB_LINE),
    Case(3, "an image declaring 20000×20000 pixels (DALI)", "train",
         lambda ctx: ctx.train({"data.backend": "dali"}, root=ctx.data_copy(bomb)), 2, BOMB_LINE, marks=NEEDS_DALI),
    Case(3, "an image declaring 20000×20000 pixels (data.check)", "data.check",
         lambda ctx: [str(ctx.data_copy(bomb)), "--jobs", "1"], 1, None,
         out=r"^PROBLEM .*/bomb\.JPEG  its header declares 20000×20000 = 400,000,000 pixels, over data\.max_image_pixels"),
    Case(3, "a 1×1 image under the caffe crop (DALI)", "train",
         lambda ctx: ctx.train({"data.backend": "dali", "data.augment": "caffe", "run.max_steps": 7},
                               root=ctx.data_copy(one_pixel_images)), 0, None, marks=NEEDS_DALI),
    Case(3, "a 1×1 image under the caffe crop (torchvision)", "train",
         lambda ctx: ctx.train({"data.backend": "torchvision", "data.augment": "caffe", "run.max_steps": 7},
                               root=ctx.data_copy(one_pixel_images)), 0, None),
    Case(4, "a truncated data index", "train",
         lambda ctx: indexed(ctx, lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])), 0,
         r"warning: the data index .*/train\.npz is damaged \(File is not a zip file\); rebuilding it"),
    Case(4, "an empty data index", "train", lambda ctx: indexed(ctx, lambda p: p.write_bytes(b"")), 0,
         r"warning: the data index .*/train\.npz is damaged \(No data left in file\); rebuilding it"),
    Case(4, "a data index with labels out of range", "train", lambda ctx: indexed(ctx, labels_out_of_range), 0,
         r"warning: the data index .*/train\.npz is damaged \(labels out of range of its classes\); rebuilding it"),
    Case(4, "a plan cache whose dates are numbers", "train", lambda ctx: cache_with(ctx, dates_as_numbers), 0, None),
    Case(4, "a plan cache of 200,000 nested brackets", "train",
         lambda ctx: cache_with(ctx, lambda data: "[" * 200_000 + "]" * 200_000), 0,
         r"warning: ignoring the execution plan cache .*/runs/execution_cache\.json \(nested too deeply to be a plan"
         r" cache\); timing every layer"),
    Case(5, "a file and class folders whose names are not UTF-8", "train",
         lambda ctx: ctx.train({"run.max_steps": 1}, root=ctx.data_copy(names_not_utf8)), 0, None),
    Case(5, "list files that are not UTF-8", "train", lists_not_utf8, 0, None),
    Case(5, "a class folder that is a symlink loop", "train", lambda ctx: ctx.train(root=ctx.data_copy(symlink_loop)), 2,
         r"error: '.*/train/loop' cannot be read: Too many levels of symbolic links \(a symbolic link that points back at"
         r" itself\); remove it or fix the link"),
    Case(5, "a class folder that is a symlink loop (data.check)", "data.check",
         lambda ctx: [str(ctx.data_copy(symlink_loop)), "--jobs", "1"], 1, None,
         out=r"^PROBLEM .*/train/loop  cannot be read: Too many levels of symbolic links"),
    Case(5, "a class folder that is a symlink loop (data.index)", "data.index",
         lambda ctx: [str(ctx.data_copy(symlink_loop)), "--jobs", "1"], 2,
         r"error: '.*/train/loop' cannot be read: Too many levels of symbolic links .*"),
    Case(6, "a read-only data root and an unwritable cache folder", "train", read_only_data_and_cache, 0,
         r"warning: could not save the data index .*/(train|val)\.npz \(Read-only file system\); the next run builds it"
         r" again", lines=2),
    Case(6, "a config with YAML aliases (billion laughs)", "train", lambda ctx: ["--config", str(ctx.write(
        "laughs.yaml", "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"))], 2,
         r"error: .*/laughs\.yaml: not valid YAML: found the alias \*a, which configs do not accept \(write the value out\)"
         r" at line 2, column 8"),
    Case(6, "a config that is not UTF-8", "train",
         lambda ctx: ["--config", str(ctx.write("latin1.yaml", b"model: {name: tiny_vgg}\nrun: {name: caf\xe9}\n"))], 2,
         r"error: .*/latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 39\); save it as UTF-8"),
    Case(6, "a run.name of 300 characters", "train", lambda ctx: ctx.train({"run.name": "x" * 300}), 2,
         r"error: .*cfg\.yaml: run\.name: run name 'x{40}'… has 300 characters; at most 100"),
    Case(6, "a run.name with a NUL", "train", lambda ctx: ctx.train({"run.name": "a\0b"}), 2,
         r"error: .*cfg\.yaml: run\.name: run name 'a\\x00b' must be a plain folder name: printable characters, no / or"
         r" \\, not starting with \. or -, no spaces at either end"),
    Case(6, "a run.out_dir that is a file", "train",
         lambda ctx: ctx.train({"run.out_dir": str(ctx.saved(lambda s: None, "out"))}), 2,
         r"error: run\.out_dir: cannot create or write the run folder '.*/out/r' \(Not a directory\); give run\.out_dir a"
         r" folder this user can write"),
    Case(6, "a run.out_dir on a read-only file system", "train",
         lambda ctx: ctx.train({"run.out_dir": str(ctx.read_only_disk())}), 2,
         r"error: run\.out_dir: cannot create or write the run folder '.*/r' \(Read-only file system\); give"
         r" run\.out_dir a folder this user can write"),
    Case(7, "a rerun after data.root lost a class", "train", one_class_fewer, 2,
         r"error: --resume '.*/step_000000001\.pt' was written for 4 classes; this run has 3 \(the class folders of"
         r" data\.root '.*/data'\): give run\.name another name to start anew, or go back to the data it was trained on"),
    Case(7, "--resume with a damaged RNG state", "train",
         lambda ctx: ctx.train(None, "--resume", str(ctx.saved(lambda s: s["rng"].pop("python")))), 2,
         r"error: --resume '.*/edited\.pt' is damaged or not a checkpoint of this trainer: its RNG state cannot be"
         r" restored \('python'\)"),
    Case(7, "--resume with a step that is not a number", "train",
         lambda ctx: ctx.train(None, "--resume", str(ctx.saved(lambda s: s.update(step="3")))), 2,
         r"error: --resume '.*/edited\.pt' is damaged or not a checkpoint of this trainer: its 'step' is '3', not a count"),
    Case(7, "--resume whose model is not a state_dict", "train",
         lambda ctx: ctx.train(None, "--resume", str(ctx.saved(lambda s: s.update(model=[1, 2])))), 2,
         r"error: --resume '.*/edited\.pt' is damaged or not a checkpoint of this trainer: its 'model' is not a"
         r" state_dict \(names → tensors\)"),
    Case(7, "--resume with a tensor of another shape", "train",
         lambda ctx: ctx.train(None, "--resume", str(ctx.saved(
             lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]})))), 2,
         r"error: --resume '.*/edited\.pt' does not fit this run's model \(4 classes, the class folders of data\.root"
         r" '.*'\): \S+ is 3 there, \S+ here"),
    Case(7, "dense_checkpoint whose config has no model section", "train",
         lambda ctx: ctx.train({"model.lowrank": {"mode": "decomposed", "speedup": 2.0, "dense_checkpoint": str(
             ctx.saved(lambda s: s.update(config={"model": 3})))}}), 2,
         r"error: model\.lowrank\.dense_checkpoint '.*/edited\.pt' is damaged: its config has no model section, or its"
         r" 'model' is not a state_dict \(names → tensors\)"),
    Case(7, "upgrade_checkpoint --yes on a damaged older checkpoint", "upgrade_checkpoint",
         lambda ctx: [str(legacy_checkpoint(ctx, np.zeros(5, dtype=np.uint32))), "--yes"], 2,
         r"error: '.*/old\.pt' is damaged: its RNG state cannot be restored \(.*\); not converted"),
    Case(7, "upgrade_checkpoint --yes on a read-only checkpoint", "upgrade_checkpoint",
         lambda ctx: [str(read_only(legacy_checkpoint(ctx, np.zeros(624, dtype=np.uint32)))), "--yes"], 2,
         r"error: '.*/old\.pt' is read-only: left as it is \(make it writable, e.g\. chmod u\+w, to convert it\)"),
    Case(8, "Ctrl-C during a step", "train", interrupt_in_step_3, 3,
         r"preempted: stopped on request at step 3; checkpoint: .*/runs/r/checkpoints/step_000000003\.pt",
         lambda ctx: load_checkpoint(checkpoints(ctx.run_folder).latest())["step"] == 3 or pytest.fail("no checkpoint")),
]


@pytest.mark.parametrize("case", [pytest.param(c, marks=c.marks) for c in CASES],
                         ids=[f"{c.number}: {c.name}" for c in CASES])
def test_every_case(case, tmp_path, synthetic, base_checkpoint, small_disk, monkeypatch, capsys):
    """Exit code, one line naming the file or key (or nothing on stderr), no traceback, nothing lost."""
    ctx = Ctx(tmp_path, synthetic, base_checkpoint, small_disk, monkeypatch)
    argv = case.build(ctx)
    capsys.readouterr()
    code = run_command(case.command, argv)
    out, err = capsys.readouterr()
    if case.line is None:
        assert err == "", err
    elif case.lines == 1:
        assert re.fullmatch(case.line, one_line(err)), err
    else:
        assert len(err.splitlines()) == case.lines and "Traceback" not in err, err
        assert all(re.fullmatch(case.line, line) for line in err.splitlines()), err
    assert code == case.code, err
    if case.out is not None:
        assert re.search(case.out, out, re.MULTILINE), out
    if case.kept is not None:
        case.kept(ctx)
    assert not [p for p in tmp_path.rglob("*") if TEMPORARY_FILE.match(p.name)], "a temporary file was left"
    if case.code == 2 and case.number in (1, 6):  # refused before the first step
        assert not list(tmp_path.glob("runs/*/checkpoints/step_*")), "a refused run trained"


def one_line(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- 1. one run per run folder ---------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_and_the_first_loses_nothing(tmp_path, synthetic, capsys):
    """Two train commands on one run folder (lr 0.05, then lr 0.02 while the first runs): the second
    exits 2 naming the first one's host and PID, having written nothing; the first finishes with
    its own config.yaml, metrics and checkpoints only."""
    first = write_config(tmp_path, synthetic, "r", optim={"epochs": 4})
    running = subprocess.Popen(TRAIN + ["--config", str(first)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "r"
    try:
        wait_for_step(folder, 1, [running])
        second = write_config(tmp_path / "second", synthetic, "r", run={"out_dir": str(tmp_path / "runs")},
                              optim={"epochs": 4, "lr": 0.02})
        assert main(["--config", str(second)]) == 2
        err = one_line(capsys.readouterr().err)
        assert re.fullmatch(rf"error: run folder '{re.escape(str(folder))}' is in use by another run \(host"
                            rf" {re.escape(socket.gethostname())}, PID {running.pid}, since [0-9: -]+\): wait for it"
                            r" to end, or give this one another run\.name \(or run\.out_dir\)", err), err
        _, first_err = running.communicate(timeout=300)
    finally:
        running.kill()
    assert running.returncode == 0, first_err[-3000:]
    assert yaml.safe_load((folder / "config.yaml").read_text())["optim"]["lr"] == 0.05
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics.jsonl holds one run's lines, in order"
    final = load_checkpoint(checkpoints(folder).latest())
    assert final["step"] == 24 and final["config"]["optim"]["lr"] == 0.05


HOLD_LOCK = ("import sys, time; from pathlib import Path; from lowrank_dist.training.run_lock import acquire;"
             " acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")


def test_a_held_folder_refuses_every_rank_and_a_dead_holder_leaves_no_lock(tmp_path, synthetic):
    """Two gloo ranks on a folder another process holds: both exit 2 with the holder's PID and
    nothing is written; once the holder is SIGKILLed the OS has dropped its lock."""
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        ranks = Ranks(tmp_path / "logs", TRAIN + ["--config", str(write_config(tmp_path, synthetic))])
        assert ranks.wait() == [2, 2], ranks.err(0)[-2000:] + ranks.err(1)[-2000:]
        for rank in (0, 1):
            err = one_line(ranks.err(rank))
            assert err.startswith(f"error (rank {rank} of 2): run folder ") and f"PID {holder.pid}," in err, err
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE], "a refused run writes nothing"
    finally:
        holder.kill()
        holder.wait()
    descriptor = acquire(folder)  # SIGKILL dropped the lock: no stale lock to remove by hand
    try:
        with pytest.raises(BlockingIOError):  # and this process holds it now
            with open(folder / LOCK_FILE) as other:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)


# -- 10. saving never changes the run --------------------------------------------------------------------------


def test_a_two_rank_resume_from_a_step_the_uninterrupted_run_never_saved_is_bitwise_equal(tmp_path, synthetic):
    """Two gloo ranks, checkpoints only at epoch ends (steps 3 and 6): one run straight through; one
    stopped at step 2 (run.max_steps: it evaluates and saves there) and run again. Saving and
    evaluating average the ranks' BN statistics for the checkpoint and the evaluation only, and the
    checkpoint keeps each rank's own, so the resumed run ends with the same weights, optimizer
    state, and each rank's own and mean statistics, bit for bit."""
    def two_ranks(name: str, *extra: str) -> Path:
        config = write_config(tmp_path / name, synthetic, name, run={"checkpoint_every": 0})
        ranks = Ranks(tmp_path / name / "logs", TRAIN + ["--config", str(config), *extra])
        assert ranks.wait() == [0, 0], ranks.err(0)[-2000:] + ranks.err(1)[-2000:]
        return tmp_path / name / "runs" / name

    straight = load_checkpoint(checkpoints(two_ranks("straight")).latest())
    two_ranks("stopped", "--set", "run.max_steps=2")
    stopped_at = load_checkpoint(checkpoints(tmp_path / "stopped" / "runs" / "stopped").latest())
    assert stopped_at["step"] == 2 and stopped_at["batch"] == 2
    resumed = load_checkpoint(checkpoints(two_ranks("stopped")).latest())
    assert resumed["step"] == straight["step"] == 6
    assert_same_state(resumed, straight, keys=("model", "engine", "rank_buffers"))
    own = straight["rank_buffers"]
    name = next(k for k in own[0] if k.endswith("running_mean"))
    assert not torch.equal(own[0][name], own[1][name]), "each rank's own statistics are kept, not their mean"
    assert torch.equal(straight["model"][name], (own[0][name] + own[1][name]) / 2)


# -- 2. a full disk (a real one: a small tmpfs) ----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib, options)`: a new folder on a tmpfs of that size (needs root; skipped where
    mounting is refused), unmounted after the test."""
    mounted = []

    def mount(kib: int, options: str = "") -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(filter(None, [f"size={kib}k", options])),
                                   "tmpfs", str(target)],
                                  capture_output=True, text=True, timeout=30)
        except OSError as error:
            pytest.skip(f"a real full disk needs `mount -t tmpfs`: {error}")
        if done.returncode != 0:
            pytest.skip(f"a real full disk needs `mount -t tmpfs`, refused here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def resize(disk: Path, kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(disk)], check=True, capture_output=True, timeout=30)


def test_atomic_writes_on_a_full_disk_raise_the_os_error_and_leave_nothing(small_disk):
    """torch.save into a tmpfs that fills at every 4 KiB step of a 64 KiB disk: wherever the disk
    fills, the writer sees OSError ENOSPC (torch's zip writer wraps some as `RuntimeError: [enforce
    fail at inline_container.cc] unexpected pos`), and no temporary file is left."""
    from lowrank_dist.training.checkpoint import atomic_save

    disk = small_disk(64)
    payload = {"weights": torch.arange(40_000, dtype=torch.float32), "config": {"name": "x" * 3000}}
    for free in range(0, 64, 4):
        filler = disk / "filler"
        filler.write_bytes(b"\0" * ((64 - free) * 1024))
        with pytest.raises(OSError) as raised:
            atomic_save(payload, disk / "step.pt")
        assert raised.value.errno == 28 and type(raised.value) is OSError, (free, raised.value)
        assert sorted(p.name for p in disk.iterdir()) == ["filler"], free
        filler.unlink()


def test_a_full_disk_while_checkpointing_is_one_line_and_the_resume_is_exact(tmp_path, synthetic, reference,
                                                                          small_disk, capsys):
    """The run folder on a disk with room for two and a half checkpoints: step 3's checkpoint finds
    it full. One line, exit 1, steps 1 and 2 kept, no temporary left; with room again the same
    command resumes and ends with the uninterrupted weights."""
    import io

    size = io.BytesIO()
    torch.save(reference, size)
    disk = small_disk(int(2.5 * len(size.getvalue()) / 1024) + 64)
    config = write_config(tmp_path, synthetic, run={"out_dir": str(disk)})
    assert main(["--config", str(config)]) == 1
    folder = disk / "r" / "checkpoints"
    assert one_line(capsys.readouterr().err) == (
        f"training stopped: could not write the checkpoint of step 3 to {folder}: [Errno 28] No space left on device;"
        f" the last complete checkpoint, {folder / 'step_000000002.pt'}, is kept: make room and run the same command"
        " to resume")
    assert sorted(p.name for p in folder.iterdir()) == ["step_000000001.pt", "step_000000002.pt"]
    resize(disk, 64 * 1024)
    assert main(["--config", str(config)]) == 0
    assert_same_state(load_checkpoint(checkpoints(disk / "r").latest()), reference, keys=("model", "engine"))


def test_a_run_folder_without_room_stops_before_the_first_step_in_one_line(tmp_path, synthetic, small_disk, capsys):
    disk = small_disk(4)  # the run's lock file takes its only page
    config = write_config(tmp_path, synthetic, run={"out_dir": str(disk)})
    assert main(["--config", str(config)]) == 1
    err = one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"training stopped: could not write to the run folder {re.escape(str(disk / 'r'))} \(\[Errno 28\]"
                        r" No space left on device.*\); nothing was trained: make room \(or fix its permissions\) and run"
                        r" the same command again", err), err
    assert not (disk / "r" / "checkpoints").exists()


def test_tensorboard_on_a_full_disk_is_one_warning_and_the_run_goes_on(tmp_path, synthetic, reference, small_disk):
    """TensorBoard's folder on a 4 KiB disk (its header fits, the scalars do not): its writer thread
    fails on the way; the run says so once, without the thread's traceback, and ends as if nothing
    happened (in a fresh process: the thread's report goes to the real stderr)."""
    tiny = small_disk(4)
    config = write_config(tmp_path, synthetic)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "tensorboard").symlink_to(tiny)
    done = subprocess.run(TRAIN + ["--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert one_line(done.stderr) == ("warning: could not write tensorboard ([Errno 28] No space left on device); the run"
                                     " goes on without it")
    assert_same_state(load_checkpoint(checkpoints(tmp_path / "runs" / "r").latest()), reference, keys=("model", "engine"))


# -- 8. Ctrl-C is a stop request -------------------------------------------------------------------------------


def caught_signals(pid: int) -> set[int]:
    """The signals process `pid` has a handler for (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask >> (number - 1) & 1}
    return set()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_ctrl_c_as_soon_as_the_command_starts_checkpoints_and_exits_3(tmp_path, synthetic):
    """The stop handlers are installed before torch is imported, and Ctrl-C (SIGINT) then is a stop
    request like TERM: the run checkpoints at its first stop check and exits 3 in one line."""
    config = write_config(tmp_path, synthetic, run={"stop_check_every": 2})
    process = subprocess.Popen(TRAIN + ["--config", str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not {signal.SIGINT, signal.SIGTERM, signal.SIGUSR2} <= caught_signals(process.pid):
            assert time.time() < deadline and process.poll() is None, "no handlers installed"
            time.sleep(0.002)
        assert b"libtorch" not in Path(f"/proc/{process.pid}/maps").read_bytes(), "handlers came after torch"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 3, err[-3000:]
    line = re.fullmatch(r"preempted: stopped on request at step (\d+); checkpoint: (.*step_\d{9}\.pt)", one_line(err))
    assert line, err  # the first stop check: step 1 (every log line, run.log_every 1, is one)
    assert "stop requested (SIGINT): checkpointing at the next stop check" in out
    assert load_checkpoint(Path(line.group(2)))["step"] == int(line.group(1)) == 1


# -- 11. --wait reads JSON, never a pickle ---------------------------------------------------------------------


class UnpicklingJob:
    """A submitted job as --wait sees it; reading submitit's result pickles fails the test."""

    def __init__(self, job_id: str, folder: Path):
        self.job_id = job_id
        self.paths = type("Paths", (), {"folder": folder, "stderr": folder / f"{job_id}_%t_log.err"})

    def results(self):
        raise AssertionError("--wait unpickled the job's results")

    exception = result = results


def test_wait_reads_the_tasks_json_outcome_not_submitits_pickles(tmp_path, synthetic, monkeypatch, capsys):
    """TrainJob (what each SLURM task runs) writes how it ended as JSON in the job folder; --wait
    reads that, for a completed job and for a failed one, and never asks submitit to unpickle."""
    from lowrank_dist.config import load_config
    from lowrank_dist.launch import cli
    from lowrank_dist.launch.jobs import TrainJob, job_folder_for
    from lowrank_dist.launch.slurm import JobStatus

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    config = write_config(tmp_path, synthetic, run={"max_steps": 1})
    cfg = load_config(config)
    done = TrainJob(str(config), [])()
    assert done["step"] == 1
    monkeypatch.setattr(cli, "wait_for_job", lambda job_id, on_change: JobStatus("COMPLETED", None))
    job = UnpicklingJob("4242", job_folder_for(cfg) / "4242")
    assert cli.wait(job, cfg) == 0
    assert f"job 4242 finished: {json.dumps(done)}" in capsys.readouterr().out

    broken = reliability.Ctx(tmp_path / "broken", synthetic, None).data_copy(reliability.empty_class_folder)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    overrides = [f"data.root={broken}", "run.name=b"]
    with pytest.raises(Exception, match="zzz"):
        TrainJob(str(config), overrides)()
    monkeypatch.setattr(cli, "wait_for_job", lambda job_id, on_change: JobStatus("FAILED", "exit code 1:0"))
    cfg = load_config(config, overrides)
    assert cli.wait(UnpicklingJob("4243", job_folder_for(cfg) / "4243"), cfg) == 1
    line = one_line(capsys.readouterr().err)
    assert re.search(r"^error: job 4243 failed \(FAILED, exit code 1:0; DataError: class folder '.*/zzz' .*\)\. Logs: .*4243_0_log"
                     r"\.err \(one per task\); last checkpoint: none yet\.", line), line


# -- 9. every documented `python -m lowrank_dist.…` command with a python that lacks the packages -------------


def documented_commands() -> list[str]:
    text = "".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    return sorted(set(re.findall(r"python -m (lowrank_dist(?:\.\w+)+)", text)))


def python_without_torch() -> str:
    """The interpreter the venv was made from: it lacks the project's packages on a clean machine."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    if subprocess.run([base, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{base} has torch: no interpreter without the project's packages to run the commands with")
    return base


def test_documented_commands_with_a_bare_python_and_no_venv_are_one_line(tmp_path):
    """A checkout without .venv, `python -m lowrank_dist.X --help` with a python lacking torch: one line
    saying how to get the packages, exit 2, for every command the docs type that way."""
    commands = documented_commands()
    assert {"lowrank_dist.train", "lowrank_dist.evaluate", "lowrank_dist.data.check", "lowrank_dist.data.synthetic",
            "lowrank_dist.upgrade_checkpoint", "lowrank_dist.speed.costs"} <= set(commands), commands
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "lowrank_dist", checkout / "lowrank_dist")
    python = python_without_torch()
    for command in commands:
        done = subprocess.run([python, "-m", command, "--help"], cwd=checkout, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (command, done.stderr)
        assert re.fullmatch(rf"error: \S+ lacks torch.*: run `make setup` in {re.escape(str(checkout))} once \(it makes"
                            r" \.venv, which the commands then use by themselves\), or activate an environment with the"
                            r" project installed", one_line(done.stderr)), (command, done.stderr)


def test_documented_commands_with_a_bare_python_use_the_checkouts_venv():
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (make setup makes it)")
    python = python_without_torch()
    for command in documented_commands():
        done = subprocess.run([python, "-m", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-2000:])
