"""The training loop before and after "the step never waits": steps/s, host reads and collectives per step.

    python bench/loop_syncs.py [--old COMMIT] [--steps 60] [--rounds 3] [--batch 8]

The old loop is checked out into a temporary git worktree (default: the parent of the commit that
moved the loop to training/loop.py); both train the same tiny low-rank CNN on the same synthetic
JPEGs, 2 gloo processes on the CPU, in alternating rounds so that drift on a shared machine hits
both. In each process every host read of a tensor (.item, .tolist, .cpu, .numpy, bool, float, int,
printing; the data feed's own excluded, as in tests/test_host_syncs.py) and every
torch.distributed collective is counted, and the time of each optimizer step is taken at
`DDPEngine.step` — a method both loops call once per step — so start-up, evaluation and the final
checkpoint are not timed. Prints steps/s (median over rounds), the new/old ratio and the
per-step counts.

On a CPU a host read costs little (the CPU ran the kernels itself); on a GPU each one stalls the
queue, so the counts, not the CPU speed, are what carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside each training process, with PYTHONPATH at the tree under test.
RANK_SCRIPT = r'''
import functools, json, os, sys, threading, time, traceback
import torch, torch.distributed as dist
events, times, depth = [], [], [0]

def wrap(owner, name, kind):
    real = getattr(owner, name)
    @functools.wraps(real)
    def counted(*args, **kwargs):
        if depth[0] == 0:
            frames = [f.filename for f in traceback.extract_stack()[:-1] if "lowrank_dist" in f.filename]
            if not (frames and os.sep + "data" + os.sep in frames[-1]):
                events.append(kind)
        depth[0] += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth[0] -= 1
    setattr(owner, name, counted)

from lowrank_dist.config import load_config
from lowrank_dist.training import engines
from lowrank_dist.training.distributed import process_group, rendezvous
from lowrank_dist.training.trainer import fit

real_step = engines.DDPEngine.step
def step(self):
    result = real_step(self)
    times.append((time.perf_counter(), events.count("read"), events.count("collective")))
    return result
engines.DDPEngine.step = step

cfg = load_config(sys.argv[1])
with process_group(rendezvous(), "cpu", 120) as ctx:
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__repr__", "__format__"):
        wrap(torch.Tensor, name, "read")
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                 "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce", "gather", "scatter"):
        wrap(dist, name, "collective")
    fit(cfg, ctx, stop=threading.Event())
(t0, r0, c0), (t1, r1, c1) = times[0], times[-1]
n = len(times) - 1  # steps 2..N, after the first step's warm-up
print("RESULT " + json.dumps({"steps_per_s": n / (t1 - t0), "reads": (r1 - r0) / n, "collectives": (c1 - c0) / n}))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_old() -> str:
    found = subprocess.run(["git", "log", "--format=%H", "-n1", "--grep", "^The training step never waits"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if not found:
        sys.exit("error: cannot find the commit that introduced the new loop; pass --old COMMIT")
    return found + "^"


def train(tree: Path, config: Path, script: Path) -> dict:
    """2 gloo processes on `tree`'s code; rank 0's measurements."""
    env = dict(os.environ, PYTHONPATH=str(tree), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, str(script), str(config)], cwd=tree, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        if process.returncode != 0:
            sys.exit(f"error: a training process of {tree} failed:\n{err[-3000:]}")
    line = next(line for line in outputs[0][0].splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="commit of the old loop (default: the parent of the new loop's commit)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per process and step")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import yaml

    from lowrank_dist.data.synthetic import make_synthetic

    old = subprocess.run(["git", "rev-parse", args.old or default_old()], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp:
        work, old_tree = Path(tmp), Path(tmp) / "old-loop"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), old], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            images = args.steps * args.batch * 2  # one epoch of `steps` steps over 2 processes
            make_synthetic(work / "data", classes=4, train_per_class=images // 4, val_per_class=2, min_side=32,
                           max_side=40)
            script = work / "rank.py"
            script.write_text(RANK_SCRIPT)
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for round_ in range(args.rounds):
                for name in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
                    config = work / f"{name}{round_}.yaml"
                    config.write_text(yaml.safe_dump({
                        "run": {"out_dir": str(work / "runs"), "name": f"{name}{round_}", "device": "cpu",
                                "log_every": 20, "checkpoint_every": 0, "speed_report": False},
                        "model": {"name": "tiny_vgg", "dropout": 0.0, "lowrank": {"speedup": 2.0}},
                        "data": {"root": str(work / "data"), "backend": "torchvision", "batch_size": args.batch,
                                 "image_size": 32, "workers": 0},
                        "optim": {"epochs": 1, "lr": 0.05},
                    }))
                    results[name].append(train(old_tree if name == "old" else ROOT, config, script))
                    print(f"round {round_ + 1} {name}: {results[name][-1]}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)
    speed = {name: statistics.median(r["steps_per_s"] for r in runs) for name, runs in results.items()}
    print(f"\ntiny_vgg (low-rank, speedup 2) at 32 px, batch {args.batch} per process, 2 gloo processes on the CPU,"
          f" {args.steps} steps, log_every 20, {args.rounds} alternating rounds (old: {old[:10]})")
    print(f"{'loop':<5} {'steps/s (median)':>17} {'host reads/step':>16} {'collectives/step':>17}")
    for name in ("old", "new"):
        r = results[name][0]
        print(f"{name:<5} {speed[name]:>17.2f} {r['reads']:>16.2f} {r['collectives']:>17.2f}")
    print(f"new/old steps/s: {speed['new'] / speed['old']:.3f}")


if __name__ == "__main__":
    main()
