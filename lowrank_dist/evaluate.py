"""Evaluate a trained model: top-1, top-5 and loss on a validation set, every image counted once.

    python -m lowrank_dist.evaluate runs/vgg16_lr                     # the run's best.pt (else its latest)
    python -m lowrank_dist.evaluate runs/vgg16_lr/checkpoints/step_000012000.pt --set data.root=/other/imagenet
    python -m lowrank_dist.evaluate runs/proj/exported_lowrank.pt --json results.json
    torchrun --standalone --nproc-per-node 8 -m lowrank_dist.evaluate runs/vgg16_lr   # split over 8 GPUs

The checkpoint carries its run's resolved config: the model is rebuilt from it and the val set,
image size, back-end and precision come from its data and precision sections. `--config` replaces
that config, `--set key=value` overrides it (a checkpoint trained on another machine usually
needs `--set data.root=...`). What is evaluated must fit the model exactly: a checkpoint whose
weights do not match the config's model is refused with the keys that differ. Bad input: one line,
exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, config_errors
from .files import exit_code_for, reason, write_text_atomic


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint (step_*.pt, best.pt, exported_lowrank.pt) or a run folder")
    parser.add_argument("--config", type=Path, help="use this config instead of the one the checkpoint carries")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/datasets/imagenet (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON to this file")
    return parser.parse_args(argv)


def evaluate_checkpoint(checkpoint: Path, config: Path | None = None, overrides=(), rdv=None) -> dict:
    """Load, rebuild, evaluate; every rank returns the same global numbers."""
    import torch

    from .runtime import amp_dtype, autocast_for, device_type_for, select_device
    from .training.distributed import process_group, rendezvous
    from .training.evaluate import evaluate
    from .training.restore import open_checkpoint, restore_model
    from .training.trainer import loaders_for

    saved = open_checkpoint(checkpoint, config, overrides)
    cfg = saved.cfg
    rdv = rdv or rendezvous()
    with process_group(rdv, device_type_for(cfg.run.device), cfg.distributed.timeout_s) as dist_ctx:
        with config_errors():
            device = select_device(cfg.run.device, dist_ctx.local_rank)
        loaders = loaders_for(cfg, dist_ctx, device, train=False)  # the train images are never listed
        model = restore_model(saved, len(loaders.classes)).to(device)
        if cfg.precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        metrics = evaluate(model, loaders.val, dist_ctx, autocast_for(device, amp_dtype(cfg.precision.amp)))
    return metrics | {"checkpoint": str(saved.path), "model": cfg.model.name, "data": str(cfg.data.root),
                      "step": saved.step, "world_size": rdv.world_size}


def main(argv=None) -> int:
    args = parse_args(argv)
    from .data import DataError
    from .training.checkpoint import CheckpointError
    from .training.distributed import rendezvous

    rdv = rendezvous()
    try:
        result = evaluate_checkpoint(args.checkpoint, args.config, args.overrides, rdv)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rdv.rank == 0:
        print(f"{result['checkpoint']}: val top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
              f"  loss {result['loss']:.4f}  ({result['count']} images of {result['data']})")
        if args.json is not None:
            try:
                write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
            except OSError as error:
                print(f"error: --json: could not write {str(args.json)!r} ({reason(error)}); the result is the line"
                      " above", file=sys.stderr)
                return exit_code_for(error)
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
