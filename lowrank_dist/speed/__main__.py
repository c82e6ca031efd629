"""Measured speed of a low-rank model beside its dense twin, per conv layer and whole model.

    python -m lowrank_dist.speed --config configs/vgg16_lr.yaml [--device cuda] [--dtype bf16] [--batch 64] [--execution auto]
    python -m lowrank_dist.speed --model vgg16 --preset tai2016 --device cpu --batch 2 --image-size 64
    python -m lowrank_dist.speed --model vgg16 --speed-aware --search 2,3,4 --write-config vgg16_fast.yaml
    python -m lowrank_dist.speed --model caffenet --preset tai2016_fc256 --link-gbps 400 --nodes 4 --gpus-per-node 8

Writes speed.md, speed.csv, speed.json, speed.png and tensorboard/ into --out (default
runs/speed/<model>-<device>-<dtype>-b<batch>) and prints the table. With --speed-aware it first
chooses per-layer ranks by measured speed (speed.speed_aware), writes them into a YAML config
(--write-config) and then reports the chosen model against dense. After the report it prints the
gradient bytes each model all-reduces per optimizer step (fp32, bf16 and the config's PowerSGD)
and the ring all-reduce time they imply over --nodes × --gpus-per-node GPUs at --link-gbps: an
estimate from counted bytes, not a measurement. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..runtime import DTYPES, select_device
from .costs import default_lowrank
from .execution import lowrank_layers
from .network import network_table
from .report import speed_report


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from ..models import MODELS

    parser = _Parser(prog="python -m lowrank_dist.speed", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a training config: model, batch size and image size from it")
    source.add_argument("--model", choices=sorted(MODELS), help="a model by name (no config needed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --config)")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--preset", help="with --model: a named rank preset, e.g. tai2016")
    policy.add_argument("--speedup", type=float, help="with --model: per-layer theoretical speedup target")
    parser.add_argument("--batch-norm", action="store_true", help="with --model: the BN variant")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto, cuda if available")
    parser.add_argument("--dtype", choices=["fp32", "bf16"],
                        help="default: on cuda bf16 if the config's precision.amp is, else fp32; on the CPU fp32 (CPUs have"
                             " no fast bf16 convolutions, so bf16 times there say nothing about a GPU run)")
    parser.add_argument("--execution", choices=["auto", "factorized", "composed"],
                        help="the plan column: each layer's faster form measured here (auto), or one form for all;"
                             " default: the config's precision.execution, else auto")
    parser.add_argument("--channels-last", action="store_true", default=None,
                        help="default: the config's precision.channels_last")
    parser.add_argument("--batch", type=int,
                        help="images per batch; default: the config's data.batch_size, else 64 on cuda, 4 on cpu")
    parser.add_argument("--image-size", type=int, help="default: the config's data.image_size, else the model's (224)")
    parser.add_argument("--repeats", type=int, default=10, help="timed samples per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before measuring")
    parser.add_argument("--layers-only", action="store_true", help="skip the whole-model images/s")
    parser.add_argument("--out", type=Path, help="output folder")
    network = parser.add_argument_group("gradient all-reduce (an estimate from counted bytes, not timed)")
    network.add_argument("--link-gbps", type=float, default=400.0, help="per-GPU link rate between nodes, Gb/s (400)")
    network.add_argument("--nodes", type=int, default=4, help="nodes in the ring (4)")
    network.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (8)")
    aware = parser.add_argument_group("speed-aware ranks")
    aware.add_argument("--speed-aware", action="store_true", help="factorize only the layers measured faster")
    aware.add_argument("--search", help="extra theoretical speedups whose ranks are tried, e.g. 2,3,4")
    aware.add_argument("--target", type=float, default=1.0, help="measured per-layer speedup a rank must reach")
    aware.add_argument("--objective", choices=["train", "forward"], default="train", help="time forward+backward or forward")
    aware.add_argument("--write-config", type=Path, help="the YAML to write (default: <out>/speed_aware.yaml)")
    return parser


def _model_setup(args) -> tuple[dict, dict | None, dict]:
    """(build dict of the low-rank model, the parsed config tree or None, defaults from the config)."""
    if args.config is None:
        if args.set:
            raise ValueError("--set needs --config")
        lowrank = {k: getattr(args, k) for k in ("preset", "speedup") if getattr(args, k) is not None}
        build = {"name": args.model, "lowrank": lowrank or default_lowrank(args.model)}
        if args.batch_norm:
            build["batch_norm"] = True
        return build, None, {}
    if any(getattr(args, k) is not None for k in ("preset", "speedup")) or args.batch_norm:
        raise ValueError("--preset/--speedup/--batch-norm go with --model; with --config the config says it")
    import yaml

    from ..config import apply_override, load_config  # lazily: only the --config path needs pydantic

    cfg = load_config(args.config, overrides=args.set, check_paths=False)
    build = cfg.model.build_dict()
    if not build.get("lowrank"):
        raise ValueError(f"{args.config}: model.lowrank is not set; the report compares a low-rank model with its dense twin")
    tree = yaml.safe_load(args.config.read_text())
    for assignment in args.set:
        apply_override(tree, assignment)
    defaults = {
        "batch": cfg.data.batch_size, "image_size": cfg.data.image_size,
        "dtype": "bf16" if cfg.precision.amp == "bf16" else "fp32", "channels_last": cfg.precision.channels_last,
        "execution": cfg.precision.execution,
    }
    if cfg.distributed.grad_compression == "powersgd":
        psgd = cfg.distributed.powersgd
        defaults["powersgd"] = (f"PowerSGD rank {psgd.rank}", ("powersgd", psgd.rank, psgd.min_compression_rate))
    return build, tree, defaults


def run(args) -> int:
    from ..models import build_model, fc_policy, lowrank_policy, model_spec
    from .speed_aware import speed_aware_ranks

    build, tree, defaults = _model_setup(args)
    spec = model_spec(build["name"])
    device = select_device(args.device, key="--device")
    dtype_key = args.dtype or (defaults.get("dtype", "fp32") if device.type == "cuda" else "fp32")
    execution = args.execution or defaults.get("execution") or "auto"
    channels_last = args.channels_last if args.channels_last is not None else defaults.get("channels_last", False)
    batch = args.batch if args.batch is not None else defaults.get("batch", 64 if device.type == "cuda" else 4)
    size = args.image_size if args.image_size is not None else defaults.get("image_size", spec.input_size[1])
    for flag, value in (("--batch", batch), ("--image-size", size), ("--repeats", args.repeats), ("--nodes", args.nodes),
                        ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.link_gbps > 0:
        raise ValueError(f"--link-gbps must be > 0, got {args.link_gbps}")
    search = [float(s) for s in args.search.split(",")] if args.search else []
    if (search or args.write_config or args.target != 1.0) and not args.speed_aware:
        raise ValueError("--search, --target and --write-config go with --speed-aware")
    input_shape = (batch, spec.input_size[0], size, size)
    out = args.out or Path("runs/speed") / f"{spec.name}-{device.type}-{dtype_key}-b{batch}"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a tuned training run would: the best algorithm per shape
    timing = {"device": device, "dtype": DTYPES[dtype_key], "repeats": args.repeats, "warmup": args.warmup,
              "channels_last": channels_last}

    torch.manual_seed(0)
    lowrank_model = build_model(build)  # first: a bad rank policy fails before anything is timed
    dense = build_model(build, dense=True)
    if batch == 1 and any(isinstance(m, torch.nn.BatchNorm1d) for m in dense.modules()):
        # BN on fc6/fc7 normalises over the batch: one image has no batch statistics to train on
        raise ValueError(f"--batch 1: {spec.name} has BatchNorm after its fully-connected layers, which cannot train"
                         " on one image (the report times training steps too); use --batch 2 or more")
    if args.speed_aware:
        lowrank = build["lowrank"]
        chosen = speed_aware_ranks(
            dense, input_shape, lowrank_policy(spec, lowrank), search, args.target, lowrank.get("factorize_first"),
            bool(lowrank.get("bn_between", False)), objective=args.objective, model_name=spec.name, **timing,
        )
        print(chosen.to_markdown() + "\n")
        config_path = args.write_config or out / "speed_aware.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        fc = fc_policy(spec, lowrank)  # the search picks conv ranks; fc6/fc7 keep the policy given
        config_path.write_text(chosen.to_yaml(build, tree, fc=fc))
        print(f"wrote the speed-aware ranks to {config_path}\n")
        build = build | {"lowrank": {"ranks": chosen.ranks, "bn_between": bool(lowrank.get("bn_between", False))}
                                    | ({"fc": fc} if fc else {})}
        lowrank_model = build_model(build)
        title = f"{spec.name}, speed-aware ranks"
    else:
        policy = ", ".join(f"{k}={v}" for k, v in build["lowrank"].items() if v not in (None, False))
        title = f"{spec.name}, low-rank ({policy})"
    fixed = None if execution == "auto" else {name: execution for name, _ in lowrank_layers(lowrank_model)}
    report = speed_report(
        dense, lowrank_model, input_shape, out_dir=out, whole_model=not args.layers_only, title=title, plan=fixed,
        plan_source=None if fixed is None else f"--execution {execution}", **timing
    )
    print(report.to_markdown())
    compressions = {"fp32": ("none",), "bf16": ("bf16",)} | dict([defaults["powersgd"]] if "powersgd" in defaults else [])
    print("\nGradients all-reduced per optimizer step, counted from the parameters; the ring all-reduce time is an"
          " estimate from those bytes (no latency, no overlap with backward), not measured:\n")
    print(network_table({"dense": dense, "low-rank": lowrank_model}, compressions, args.link_gbps, args.nodes,
                        args.gpus_per_node))
    print(f"\nwrote {', '.join(str(p) for p in report.files.values())} and {out / 'tensorboard'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as error:  # bad config, model, rank or device: one line, exit 2
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
