"""The GPU path's correctness tests: skipped without CUDA.

On a CUDA machine every test here runs on the GPU at the sizes in SIZES["gpu"]; bench/gpu.py's
device plan runs them first in phase 1 (`python bench/gpu.py --plan` prints the call).
LOWRANK_GPU_TESTS_ON_CPU=1 runs them on the CPU instead, at toy sizes, in fp32 and with gloo for
NCCL: the same code paths, so a test broken by a change is found here, not in the device's
scarce minutes (tests/test_gpu_bench.py does that). The parts that only a GPU has (TF32, fp16
with GradScaler, NCCL, nvJPEG) are skipped then, each with its reason.

A missing optional package (pydantic and PyYAML for the config, TensorBoard for the trainer's
log, DALI) skips the tests that need it, naming it: a bare GPU machine lacks some of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .common import ON_CPU, SIZES


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not (torch.cuda.is_available() or ON_CPU):
        pytest.skip("needs a CUDA GPU (none is visible); LOWRANK_GPU_TESTS_ON_CPU=1 runs it on the CPU at toy sizes")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu" if ON_CPU or not torch.cuda.is_available() else "cuda")


@pytest.fixture(scope="session")
def sizes(device) -> dict:
    return SIZES[device.type if device.type == "cpu" else "gpu"]


@pytest.fixture(scope="session")
def jpegs(tmp_path_factory, sizes) -> Path:
    """The generated JPEG folder (ImageNet layout) the data and training tests read."""
    from lowrank_dist.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("gpu") / "jpegs"
    make_synthetic(root, sizes["classes"], sizes["train_per_class"], sizes["val_per_class"], seed=0,
                   min_side=sizes["sides"][0], max_side=sizes["sides"][1])
    return root
