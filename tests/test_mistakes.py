"""Nothing a user does by mistake loses a run (issue 24): one run per run folder, a full disk is one
line, no image can exhaust memory, every damaged file we wrote ourselves is rebuilt or named, a
stop request (Ctrl-C too) checkpoints, and saving never changes the run.

Each case runs the real command (`python -m lowrank_dist.train`'s `main`, in this process or in
subprocesses where a second process, several ranks or a signal need it). `test_every_case` is the
table (one row per case: exit code, one line naming the file or key, no traceback, nothing lost);
the cases that need more than one command have their own tests below it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lowrank_dist.training.checkpoint import load_checkpoint
from lowrank_dist.training.run_lock import LOCK_FILE, acquire
from lowrank_dist.train import main

from .test_reliability import (ROOT, TRAIN, Ranks, assert_same_state, checkpoints, reference,  # noqa: F401
                               synthetic, wait_for_step, write_config)


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
    """`small_disk(kib)`: a new folder on a tmpfs of that size (needs root; skipped where mounting is
    refused), unmounted after the test."""
    mounted = []

    def mount(kib: int) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(target)],
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
