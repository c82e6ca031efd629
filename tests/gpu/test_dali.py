"""The data back-ends feeding the GPU give the crops the CPU back-ends give (dali_compare.py measures).

Bounds, in grey levels of 0..255, on the mean |Δ| over every crop of one epoch and the val set:
- the same decoder, torchvision feeding the GPU against feeding the CPU: 0 (the same bytes, copied);
- DALI's GPU pipeline (nvJPEG, `jpeg_fancy_upsampling=True`) against DALI's CPU pipeline
  (libjpeg-turbo): 1.0. From bench/jpeg_upsampling.py, which emulates both pipelines on the CPU
  on these JPEGs (64–160 px, crops scaled to 64×64; 2-core CPU, 2026-12-05): with the same fancy
  upsampling they differ by 0.18 levels, all of it the resize (DALI's fn.resize against torch's
  antialiased bilinear); with nvJPEG's default upsampling (each chroma sample repeated) by 2.80.
  Left unemulated: nvJPEG's IDCT rounds differently from libjpeg-turbo's (±1 level at some
  pixels, less than 0.5 on the mean) and decodes only the window. 0.18 + 0.5 < 1.0 < 2.80: the
  bound passes the fancy decoder and fails the default one, so it also shows the flag in effect;
- DALI's CPU pipeline against torchvision (PIL; the same libjpeg-turbo, bit-identical decodes, only
  the resizes differ): 0.5; measured 0.026 (32×32 crops, this machine).
Single pixels at colour edges differ by tens of levels between upsampling filters, so the maximum
and the 99th percentile are recorded, not bounded. A wrong window or mirror moves the mean by tens
of levels: the control (other windows, measured 40–48) must stay far outside each bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_dist.data.dali import dali_available

from .common import REPO
from .dali_compare import compare

BOUND = {"same decoder": 0.0, "nvjpeg (fancy upsampling) vs libjpeg-turbo": 1.0, "libjpeg-turbo, DALI vs PIL": 0.5}


def _check(result: dict, bound: float, device: torch.device) -> None:
    assert result["same_samples"] and result["same_bytes"] and result["same_labels"], result
    assert result["mean_abs_levels"] <= bound, result
    assert result["other_window_mean_levels"] > max(4 * bound, 1.0), f"the control could not see a wrong window: {result}"
    assert result["batch_device"].startswith(device.type) and result["batch_channels_last"], result


def test_torchvision_feeds_the_device_the_crops_it_feeds_the_cpu(jpegs, sizes, device):
    """What the trainer uses without DALI: torchvision decoding on the CPU, the batches on the device."""
    result = compare(jpegs, {"backend": "torchvision", "device": "cpu"}, {"backend": "torchvision", "device": str(device)},
                     sizes["compare_batch"], sizes["compare_size"], sizes["threads"])
    _check(result, BOUND["same decoder"], device)


def test_dali_crops_match_the_cpu_back_ends(jpegs, sizes, device, record_property):
    """On the GPU: DALI's GPU pipeline against its CPU pipeline; on the CPU: DALI's CPU pipeline
    against torchvision. In a child process: a crashing decoder fails this test alone."""
    if not dali_available():
        pytest.skip("nvidia.dali is not installed (optional; bench/gpu.py's phase 2 carries it to the GPU machine)")
    if device.type == "cuda":
        reference = {"backend": "dali", "dali_device": "cpu", "device": "cpu"}
        candidate = {"backend": "dali", "dali_device": "gpu", "device": "cuda"}
        bound = BOUND["nvjpeg (fancy upsampling) vs libjpeg-turbo"]
    else:
        reference = {"backend": "torchvision", "device": "cpu"}
        candidate = {"backend": "dali", "dali_device": "cpu", "device": "cpu"}
        bound = BOUND["libjpeg-turbo, DALI vs PIL"]
    command = [sys.executable, str(Path(__file__).with_name("dali_compare.py")), str(jpegs), json.dumps(reference),
               json.dumps(candidate), "--batch", str(sizes["compare_batch"]), "--size", str(sizes["compare_size"]),
               "--threads", str(sizes["threads"])]
    child = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert child.returncode == 0, f"exit {child.returncode} (negative: killed by that signal)\n{child.stderr[-3000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    record_property("measured", json.dumps(result))  # into the junit XML the device run brings back
    _check(result, bound, device)
