"""Bytes of gradients all-reduced per optimizer step, measured, side by side: dense and low-rank
CaffeNet and VGG-16 (convs at the paper's tai2016 ranks; fc6/fc7 factorized by the config key
model.lowrank.fc), plain fp32, bf16 and PowerSGD.

    python bench/comm_bytes.py [--models caffenet,vgg16] [--rank 4] [--fc-rank 256] [--link-gbps 400] [--nodes 4] [--gpus-per-node 8]

Each variant trains 3 optimizer steps on 2 gloo processes on the CPU (batch 1 of random 64×64
images: how many bytes a step sends does not depend on the images), through the trainer's own
engine (training/engines.py) and its counting hook (training/comm.py); the table shows the bytes
the hook counted in the last step (PowerSGD compresses from step 3: start_iter 2), the count
expected from the parameters' shapes, the ratio to dense fp32, and the time a ring all-reduce of
that many bytes would take over nodes × gpus-per-node GPUs at --link-gbps per GPU:
2·(N−1)/N · bytes / rate. That time is an estimate from measured bytes, not a measured time (no
latency, no overlap with backward, no contention).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowrank_dist.config import config_from_dict  # noqa: E402
from lowrank_dist.models import build_model  # noqa: E402
from lowrank_dist.speed.network import expected_bytes_per_step, ring_allreduce_s  # noqa: E402
from lowrank_dist.training.distributed import Rendezvous, process_group  # noqa: E402
from lowrank_dist.training.engines import DDPEngine  # noqa: E402


def variants(models: list[str], rank: int, fc_rank: int) -> list[tuple[str, str, dict | None, dict]]:
    """(model, label, model.lowrank section, distributed section) in table order."""
    psgd = {"grad_compression": "powersgd", "powersgd": {"rank": rank, "start_iter": 2}}
    tai = {"preset": "tai2016"}
    fc = tai | {"fc": {"ranks": {"fc6": fc_rank, "fc7": fc_rank}}}
    label = f"tai2016 + fc6/fc7 rank {fc_rank}"
    rows = []
    for model in models:
        rows += [(model, "dense, fp32", None, {}),
                 (model, "dense, bf16", None, {"grad_compression": "bf16"}),
                 (model, f"dense, PowerSGD rank {rank}", None, psgd),
                 (model, "tai2016 (convs), fp32", tai, {}),
                 (model, f"{label}, fp32", fc, {}),
                 (model, f"{label}, PowerSGD rank {rank}", fc, psgd)]
    return rows


def _rank(rank: int, port: int, rows: list, out: str) -> None:
    results = []
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "bench"), "cpu", timeout_s=600) as ctx:
        for name, label, lowrank, options in rows:
            torch.manual_seed(0)
            cfg = config_from_dict({"model": {"name": name, "num_classes": 1000, "lowrank": lowrank},
                                    "data": {"root": out, "batch_size": 1}, "optim": {"lr": 0.01},
                                    "distributed": options}, "bench", check_paths=False)
            model = build_model(cfg.model.build_dict())
            engine = DDPEngine(model, cfg, ctx, torch.device("cpu"))
            model.train()
            for _ in range(3):
                with engine.micro_batch(boundary=True):
                    loss = nn.functional.cross_entropy(engine.forward(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
                    engine.backward(loss)
                engine.step()
            psgd = cfg.distributed.powersgd
            expected = expected_bytes_per_step(model, cfg.distributed.grad_compression,
                                               *((psgd.rank, psgd.min_compression_rate) if psgd else ()))
            results.append({"model": name, "variant": label, "parameters": sum(p.numel() for p in model.parameters()),
                            "measured": engine.comm.bytes_last_step, "expected": expected})
            del engine, model
    if rank == 0:
        Path(out, "bytes.json").write_text(json.dumps(results))


def table(results: list[dict], link_gbps: float, gpus: int) -> str:
    lines = [f"| model | gradients | parameters | bytes/step (measured) | expected | vs dense fp32 |"
             f" ring all-reduce at {link_gbps:g} Gb/s, {gpus} GPUs (estimate) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    dense = {r["model"]: r["measured"] for r in results if r["variant"] == "dense, fp32"}
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['measured'] / 1e6:.1f} MB |"
                     f" {r['expected'] / 1e6:.1f} MB | {dense[r['model']] / r['measured']:.1f}× fewer |"
                     f" {ring_allreduce_s(r['measured'], gpus, link_gbps) * 1e3:.2f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="caffenet,vgg16")
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD's rank")
    parser.add_argument("--fc-rank", type=int, default=256, help="fc6/fc7's rank in the low-rank FC rows")
    parser.add_argument("--link-gbps", type=float, default=400.0, help="per-GPU link rate between nodes, Gb/s")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    args = parser.parse_args()
    rows = variants(args.models.split(","), args.rank, args.fc_rank)
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_rank, args=(port, rows, out), nprocs=2)
        results = json.loads(Path(out, "bytes.json").read_text())
    print(table(results, args.link_gbps, args.nodes * args.gpus_per_node))


if __name__ == "__main__":
    main()
