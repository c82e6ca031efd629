"""The training step never waits: between two log points the loop reads no tensor on the host and
runs no collective of its own (the gradient all-reduce inside DDP is the engine's, and is not
counted: DDP's reducer calls the process group directly, not torch.distributed's functions).

Every way a tensor's value reaches the host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
`bool()`, `float()`, `int()`, printing) and every torch.distributed collective is wrapped and
counted in 2 gloo processes training 40 steps with `run.log_every: 20`; the counts of each log
window are compared with the numbers the design allows. A per-step `.item()` or all-reduce put
back into the loop adds 20 to a window and fails the test.

Reads made by the data feed (`lowrank_dist/data/`: the sampler's permutation, the DataLoader's
seed, the sample indices of each batch) are not counted: they touch host tensors that were never
on the device, before the batch is copied there, and never wait for the GPU.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrank_dist.config import load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training import loop as loop_module
from lowrank_dist.training import trainer as trainer_module
from lowrank_dist.training.distributed import Rendezvous, process_group

from . import helpers
from .test_distributed import free_port

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__repr__", "__format__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
               "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")


class Counts:
    """Host reads and collectives, with where each came from (the innermost lowrank_dist frame)."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []  # (kind, name, where)
        self.depth = 0  # count the outermost call only (__format__ calls item, printing calls tolist)

    def wrap(self, owner, name: str, kind: str) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def counted(*args, **kwargs):
            if self.depth == 0:
                frames = [f for f in traceback.extract_stack()[:-1] if "lowrank_dist" in f.filename]
                where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside lowrank_dist"
                # the data thread's own work, and the gradient all-reduce (DDP's comm hook, training/comm.py:
                # asynchronous, one per bucket per step, the one collective a step must have) are not counted
                if not (frames and (f"lowrank_dist{os.sep}data{os.sep}" in frames[-1].filename
                                    or frames[-1].filename.endswith(f"training{os.sep}comm.py"))):
                    self.events.append((kind, name, where))
            self.depth += 1
            try:
                return real(*args, **kwargs)
            finally:
                self.depth -= 1

        setattr(owner, name, counted)

    def install(self) -> None:
        for name in READS:
            self.wrap(torch.Tensor, name, "read")
        for name in COLLECTIVES:
            for module in (dist, dist.distributed_c10d):
                if hasattr(module, name):
                    self.wrap(module, name, "collective")


def _counted_rank(rank: int, port: int, config: str, out: str) -> None:
    torch.set_num_threads(1)  # two processes on the test machine's cores, as torchrun would set it
    counts = Counts()
    marks: list[tuple[int | None, int]] = []  # (step or None for the loop's start, events so far)
    real_epoch, real_log = loop_module.train_one_epoch, loop_module.log_window

    def train_one_epoch(run, state, meter):
        marks.append((None, len(counts.events)))
        return real_epoch(run, state, meter)

    def log_window(run, state, meter):
        marks.append((state.step, len(counts.events)))
        return real_log(run, state, meter)

    trainer_module.train_one_epoch = train_one_epoch
    loop_module.log_window = log_window
    cfg = load_config(config)
    with process_group(Rendezvous(rank, rank, 2, "127.0.0.1", port), "cpu", 60) as ctx:
        counts.install()
        trainer_module.fit(cfg, ctx, stop=threading.Event())  # as the train command passes its signal event
    windows = []
    for (_, begin), (step, end) in zip(marks, marks[1:]):
        window = counts.events[begin:end]
        windows.append({"step": step, "reads": sum(k == "read" for k, _, _ in window),
                        "collectives": sum(k == "collective" for k, _, _ in window),
                        "where": dict(Counter(f"{name} at {where}" for _, name, where in window))})
    Path(out, f"rank{rank}.json").write_text(json.dumps(windows))


def test_no_host_read_or_collective_between_log_points(tmp_path):
    # 160 train images, batch 2 per rank: one epoch of 40 steps, two log windows of 20
    data = tmp_path / "data"
    make_synthetic(data, classes=4, train_per_class=40, val_per_class=2, seed=0, min_side=32, max_side=40)
    config = helpers.write_config(tmp_path / "c.yaml", {
        "run": {"out_dir": str(tmp_path / "runs"), "name": "count", "device": "cpu", "log_every": 20,
                "checkpoint_every": 0, "speed_report": False},
        "model": {"name": "tiny_vgg", "dropout": 0.0, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(data), "backend": "torchvision", "batch_size": 2, "image_size": 32, "workers": 0},
        "optim": {"epochs": 1, "lr": 0.05, "skip_nonfinite_steps": 2},  # the skip path's BN copies are on too
    }, {})
    mp.spawn(_counted_rank, args=(free_port(), str(config), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        windows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [w["step"] for w in windows] == [20, 40], windows
        for window in windows:
            # run.stop_check_every is 10 (the default): sync points at steps 10 and 20 of the first
            # window, 30 and 40 of the second. Each sync point reads the device once (the stacked
            # flags and losses, .tolist()) and all-reduces once ([stop requested, a non-finite loss
            # in step i]). Nothing else: no read or collective in the 18 other steps.
            assert (window["reads"], window["collectives"]) == (2, 2), f"rank {rank}: {window}"
