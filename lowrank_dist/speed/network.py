"""Gradient bytes all-reduced per optimizer step, counted from a model's parameters, and the time a
ring all-reduce of that many bytes implies at a given link rate: an estimate from counted bytes (no
latency, no overlap with backward, no contention), not a measured time.

The counts are the DDP comm hooks' (training/comm.py, which counts the same bytes as they are sent,
`comm/bytes_per_step`): fp32 gradients as they are, in bfloat16 (half), or, with PowerSGD, each
gradient matrix torch compresses as its P and Q factors and the others as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

BF16_BYTES = torch.tensor([], dtype=torch.bfloat16).element_size()


def factor_layout(shapes: dict[str, torch.Size], rank: int, min_compression_rate: float) -> dict[str, tuple[int, int]]:
    """The parameters PowerSGD compresses, in the order torch lays out their P and Q factors in a
    bucket (grouped by matrix shape, groups in order of first appearance), each with its P and Q
    lengths (n·r, m·r for its n×m matrix view, r = min(n, m, rank)); torch's own rule
    (powerSGD_hook._should_compress) decides which are worth compressing."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        n = shape[0] if len(shape) else 1
        m = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        r = min(n, m, rank)
        if powersgd._should_compress(n, m, r, min_compression_rate)[0]:
            groups.setdefault((n, m), []).append(name)
    return {name: (n * min(n, m, rank), m * min(n, m, rank)) for (n, m), names in groups.items() for name in names}


def expected_bytes_per_step(model: nn.Module, compression: str, rank: int = 1, min_compression_rate: float = 2.0) -> int:
    """Bytes all-reduced per optimizer step by the hook for `compression` (PowerSGD: once
    compressing), from the trainable parameters' shapes alone; fp32 gradients."""
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
    if compression == "none":
        return 4 * total
    if compression == "bf16":
        return BF16_BYTES * total
    factors = factor_layout(shapes, rank, min_compression_rate)
    compressed = sum(int(np.prod(shapes[name], dtype=np.int64)) for name in factors)
    return 4 * (total - compressed + sum(p + q for p, q in factors.values()))


def ring_allreduce_s(size: int, gpus: int, link_gbps: float) -> float:
    """Seconds a ring all-reduce of `size` bytes takes over `gpus` GPUs at `link_gbps` gigabits per
    second each: every GPU sends and receives 2·(N−1)/N of the bytes."""
    return 2 * (gpus - 1) / gpus * size / (link_gbps * 1e9 / 8) if gpus > 1 else 0.0


def network_table(models: dict[str, nn.Module], compressions: dict[str, tuple], link_gbps: float, nodes: int,
                  gpus_per_node: int) -> str:
    """Markdown: per model (label → module) and gradient compression (label → expected_bytes_per_step's
    arguments after the model), parameters, bytes per step and the ring all-reduce estimate."""
    gpus = nodes * gpus_per_node
    lines = [f"| model | gradients | parameters | bytes/step (counted) | ring all-reduce, {nodes} nodes × {gpus_per_node}"
             f" GPUs at {link_gbps:g} Gb/s (estimate from counted bytes) |", "|---|---|---:|---:|---:|"]
    for name, model in models.items():
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for label, arguments in compressions.items():
            size = expected_bytes_per_step(model, *arguments)
            lines.append(f"| {name} | {label} | {count / 1e6:.2f}M | {size / 1e6:.2f} MB |"
                         f" {ring_allreduce_s(size, gpus, link_gbps) * 1e3:.2f} ms |")
    return "\n".join(lines)
