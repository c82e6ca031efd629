"""Two data back-ends on the same JPEG folder, measured against each other: what test_dali.py asserts on.

`compare` builds both loaders and returns, for the train split of one epoch and the val split:
whether they chose the same samples, labels and byte counts, and how far their uint8 crops lie
apart (mean, 99th percentile, max |Δ| in grey levels), with a control: the candidate's crops of the
same samples at the next epoch's windows, which is what a wrong window or mirror would look like.

Run as a script it prints that dict as JSON, so a test can run DALI in a child process: a decoder
that crashes the process (DALI 2.4's CPU image_slice did, SIGSEGV) fails that one test, not the
test session and the tests after it.

    python tests/gpu/dali_compare.py ROOT '{"backend": "dali", "dali_device": "cpu", "device": "cpu"}' \
        '{"backend": "dali", "dali_device": "gpu", "device": "cuda"}' --batch 32 --size 64 --threads 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __name__ == "__main__":  # run as a script from anywhere: the repository's lowrank_dist
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lowrank_dist.config import DataConfig  # noqa: E402
from lowrank_dist.data import build_loaders  # noqa: E402
from lowrank_dist.data.sampling import split_batches  # noqa: E402

EPOCH = 3


def _decoded(loaders, epoch: int, crops_of: int | None = None) -> dict:
    """Everything a back-end returns for the train split of `epoch` and for the val split: uint8
    crops (on the CPU), the sample decoded into each slot and the bytes read for it. `crops_of`:
    take the crop windows of that epoch instead (the same samples, other windows: the control)."""
    train, val = loaders.train, loaders.val
    parts = [train.backend.images(split_batches(train.indices(epoch), train.batch_size),
                                  epoch if crops_of is None else crops_of, {}),
             val.backend.images(split_batches(val.indices, val.batch_size), None, {})]
    batches = [batch for part in parts for batch in part]
    return {"images": torch.cat([b.images.cpu() for b in batches]),
            "indices": np.concatenate([b.indices for b in batches]),
            "sizes": np.concatenate([b.sizes for b in batches]),
            "on": str(batches[0].images.device)}


def _labels(loaders, epoch: int) -> torch.Tensor:
    return torch.cat([labels.cpu() for _, labels in loaders.train.epoch(epoch)])


def _loaders(root: Path, options: dict, batch: int, size: int, threads: int):
    data = DataConfig(root=root, backend=options["backend"], dali_device=options.get("dali_device", "auto"),
                      batch_size=batch, image_size=size, workers=threads if options["backend"] == "dali" else 0)
    return build_loaders(data, device=torch.device(options["device"]), channels_last=True)


def compare(root: Path, reference: dict, candidate: dict, batch: int, size: int, threads: int) -> dict:
    """`candidate` against `reference` ({backend, dali_device?, device}) on the folder `root`."""
    ref, cand = _loaders(root, reference, batch, size, threads), _loaders(root, candidate, batch, size, threads)
    a, b = _decoded(ref, EPOCH), _decoded(cand, EPOCH)
    control = _decoded(cand, EPOCH, crops_of=EPOCH + 1)["images"]
    diff = (a["images"].float() - b["images"].float()).abs()
    images, _ = next(iter(cand.train.epoch(EPOCH)))  # a normalised batch, as the trainer gets it
    return {
        "reference": ref.backend, "candidate": cand.backend, "images_on": b["on"], "crops": len(diff),
        "crop_size": size, "same_samples": bool(np.array_equal(a["indices"], b["indices"])),
        "same_bytes": bool(np.array_equal(a["sizes"], b["sizes"])),
        "same_labels": bool(torch.equal(_labels(ref, EPOCH), _labels(cand, EPOCH))),
        "mean_abs_levels": float(diff.mean()), "p99_abs_levels": float(np.percentile(diff.numpy(), 99)),
        "max_abs_levels": float(diff.max()),
        "other_window_mean_levels": float((a["images"].float() - control.float()).abs().mean()),
        "batch_device": str(images.device),
        "batch_channels_last": bool(images.is_contiguous(memory_format=torch.channels_last)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("reference", type=json.loads)
    parser.add_argument("candidate", type=json.loads)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    result = compare(args.root, args.reference, args.candidate, args.batch, args.size, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
