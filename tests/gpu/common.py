"""What the GPU tests share: where they run, their sizes, and skipping for a missing package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ON_CPU = os.environ.get("LOWRANK_GPU_TESTS_ON_CPU") == "1"
REPO = Path(__file__).resolve().parents[2]

SIZES = {
    "gpu": {"classes": 10, "train_per_class": 100, "val_per_class": 20, "sides": (64, 160), "compare_size": 64,
            "compare_batch": 32, "threads": 4, "train_steps": 50, "log_every": 10, "batch": None,
            "sync_steps": 30, "sync_log_every": 10, "nccl_steps": 20, "model_size": 224},
    # toy sizes: the whole folder runs in about a minute on a 2-core CPU
    "cpu": {"classes": 4, "train_per_class": 32, "val_per_class": 4, "sides": (48, 96), "compare_size": 32,
            "compare_batch": 8, "threads": 1, "train_steps": 16, "log_every": 4, "batch": 16,
            "sync_steps": 8, "sync_log_every": 4, "nccl_steps": 4, "model_size": 64},
}


def needs(*modules: str) -> None:
    """Skip the calling test, naming the first of `modules` that cannot be imported."""
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed (optional here; the test needs it)")
