"""Export a trained low-rank model for inference: ONNX and/or torch.export (.pt2), BatchNorm folded,
each factorized layer in its faster inference form, checked equal to the PyTorch model on real images.

    python -m lowrank_dist.export runs/vgg16_lr --out deploy/vgg16_lr
    python -m lowrank_dist.export runs/vgg16_lr/checkpoints/best.pt --out deploy/vgg16_lr --format onnx,pt2 --batch dynamic
    python -m lowrank_dist.export --from-state-dict vgg16-397923af.pth --model vgg16 --preset tai2016 \\
        --data /datasets/imagenet --out deploy/vgg16_tai2016

The model is the eval-mode one with every BatchNorm folded into the conv (or linear layer) before
it, dropout and auxiliary heads gone, a factorized fc6/fc7 as its two linear layers, and each
factorized conv in its inference form — two thin convs, the same with the rank padded to a multiple
of 16 channels, or one conv of its composed kernel (deploy.forms) — whichever is fastest on the target at the export batch (`--execution
auto`: timed here, on onnxruntime's CPU provider for ONNX (`--target` for another provider) and on
torch for .pt2; `factorized`, `padded` or `composed` sets every layer without timing).
The plan is written beside the model (plan.md, plan.json) and into model.json, with the model's
name, ranks per layer (the paper's names), classes, input size, the exact preprocessing, the
checkpoint's step and its val top-1/top-5 as the run logged them, and every file's SHA-256.

Before anything is called done, the exported files are run (onnxruntime's CPU provider, torch for
.pt2) on `--check-images` real val images of the run (evenly spread over the val set) and their
logits compared with the PyTorch eval model's: max relative difference ≤ 1e-4 (max |Δ| over an
image's logits / its largest |logit|) and the same top-1 on ≥ 99.9% of the images. Otherwise it
exits 1 with the numbers and leaves nothing: the files are written into a temporary folder beside
--out, which is renamed to --out only once everything passed.

`--from-state-dict` takes a plain (torchvision) state dict of a dense model instead of a run:
it is decomposed exactly (`--preset`, `--speedup` or `--energy`), each layer's relative error
printed beside its measured speedup; its check images come from `--data` (an ImageNet-layout
folder; preprocessed as torchvision's models expect), or, without it, are random inputs (said so).
Bad input: one line, exit 2. Needs the `export` extra (onnx, onnxscript, onnxruntime) for ONNX.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ConfigError
from .data import DataError
from .deploy.forms import inference_model, lowrank_layers, lowrank_linears
from .deploy.runtimes import FORMATS, INSTALL, PROVIDERS, export, load_runner, missing_packages
from .files import write_text_atomic
from .models import layer_names
from .speed.inference import InferencePlan, plan_inference
from .training.checkpoint import CheckpointError

MAX_RELATIVE_DIFFERENCE = 1e-4
MIN_TOP1_AGREEMENT = 0.999


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    from .models import MODELS

    parser = _Parser(prog="python -m lowrank_dist.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", help="a run folder or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist, or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--format", default="onnx", help="onnx, pt2 or both (comma-separated); default onnx")
    parser.add_argument("--batch", default="1",
                        help="the batch size fixed in the files, or 'dynamic' (planned at batch 1); default 1")
    parser.add_argument("--image-size", type=int, help="default: the run's data.image_size (the model's with --from-state-dict)")
    parser.add_argument("--execution", choices=["auto", "factorized", "padded", "composed"], default="auto",
                        help="each layer's form: the fastest timed on the target (auto), or one form for all")
    parser.add_argument("--target", choices=sorted(PROVIDERS), default="ort-cpu",
                        help="the onnxruntime provider the ONNX plan is timed on (default ort-cpu)")
    parser.add_argument("--check-images", type=int, default=256, help="val images the equality check runs on")
    parser.add_argument("--config", type=Path, help="use this config instead of the one the checkpoint carries")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/datasets/imagenet (repeatable)")
    plain = parser.add_argument_group("a plain state dict instead of a run")
    plain.add_argument("--from-state-dict", type=Path, metavar="FILE", help="a dense model's state dict (.pth)")
    plain.add_argument("--model", choices=sorted(MODELS), help="its architecture")
    policy = plain.add_mutually_exclusive_group()
    policy.add_argument("--preset", help="a named rank preset, e.g. tai2016")
    policy.add_argument("--speedup", type=float, help="per-layer theoretical speedup target")
    policy.add_argument("--energy", type=float, help="fraction of singular-value energy each layer keeps")
    plain.add_argument("--batch-norm", action="store_true", help="the BN variant (torchvision's vgg16_bn)")
    plain.add_argument("--num-classes", type=int, help="default: the model's (1000)")
    plain.add_argument("--data", type=Path, help="ImageNet-layout folder whose val images the check runs on")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# What is exported: the model, its description and the images it is checked on


@dataclass
class Source:
    model: nn.Module  # eval mode, fp32, CPU, with its LowRankConv2d layers
    name: str  # the registry's model name
    image_shape: tuple[int, int, int]
    info: dict  # model.json's description: classes, preprocessing, checkpoint, ...
    images: list[torch.Tensor]  # the check images, in batches
    labels: list[torch.Tensor] | None = None
    errors: dict[str, float] = field(default_factory=dict)  # module path → relative error (decomposed)


def _spread(count: int, total: int) -> np.ndarray:
    """`count` sample indices spread evenly over `total` (all of them if fewer)."""
    return np.unique(np.linspace(0, total - 1, num=min(count, total)).round().astype(np.int64))


def val_images(loaders, count: int, batch: int = 32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`count` val images evenly spread over the val set (a val set is listed class by class), read
    and normalised exactly as the run evaluated them: its back-end's crops, its loader's scaling.
    Images the data index knows to be bad are not among them."""
    val = loaders.val
    good = np.setdiff1d(np.arange(len(val.samples)), np.fromiter(val.samples.bad, dtype=np.int64))
    if not len(good):
        raise DataError("the val set has no image that can be decoded: nothing to check the export on")
    chosen = good[_spread(count, len(good))]
    batches = [chosen[i:i + batch] for i in range(0, len(chosen), batch)]
    images, labels = [], []
    for decoded in val.backend.images(batches, None, dict(val.samples.bad)):
        if decoded.bad:
            raise DataError(f"check image {val.samples.paths[decoded.bad[0][0]]!r} cannot be decoded: {decoded.bad[0][1]}")
        # a copy out of the loader's reused buffers, in NCHW order whatever precision.channels_last says
        images.append(val.normalise(decoded.images).clone(memory_format=torch.contiguous_format))
        labels.append(torch.from_numpy(val.samples.labels[decoded.indices]))
    return images, labels


def preprocessing(data, loaders, image_size: int) -> dict:
    """The exact input pipeline of the val images, as model.json states it."""
    from .data.augment import CAFFE_RESIZE

    # the float32 values the loader subtracts and divides by, in their shortest exact spelling
    mean, std = ([float(str(np.float32(v))) for v in t.flatten().tolist()]
                 for t in (loaders.val.normalise.mean, loaders.val.normalise.std))
    base = {"color": "RGB", "layout": "NCHW", "dtype": "float32",
            "normalize": {"mean": mean, "std": std, "formula": "(pixel - mean) / std, pixels in 0..255"}}
    if data.format == "cifar10":
        return base | {"resize": None, "crop": None, "note": "CIFAR-10 images used whole (32×32); mean and std are"
                                                             " the train set's own"}
    augment = data.augment or "inception"
    resize = data.val_resize or (CAFFE_RESIZE if augment == "caffe" else round(image_size * 256 / 224))
    caffe = " (Caffe-style: mean subtraction only, 0..255 scale)" if augment == "caffe" else ""
    return base | {
        "resize": {"shorter_side": resize, "interpolation": "bilinear, antialiased"},
        "crop": {"center": image_size},
        "caffe_mean": augment == "caffe",
        "note": f"resize the shorter side to {resize}, take the centre {image_size}×{image_size} square{caffe}",
    }


def from_checkpoint(args) -> Source:
    """The run's model at its checkpoint, with the run's val images and description."""
    from .training.distributed import DistContext
    from .training.restore import open_checkpoint, restore_model
    from .training.trainer import loaders_for

    overrides = list(args.overrides)
    if args.image_size is not None:
        overrides.append(f"data.image_size={args.image_size}")
    saved = open_checkpoint(args.checkpoint, args.config, overrides)
    cfg = saved.cfg
    loaders = loaders_for(cfg, DistContext(), torch.device("cpu"), train=False)
    model = restore_model(saved, len(loaders.classes)).eval()
    images, labels = val_images(loaders, args.check_images)
    metrics = saved.recorded_metrics()
    shape = tuple(images[0].shape[1:])
    info = {
        "classes": {"count": cfg.model.num_classes or len(loaders.classes), "names": loaders.classes},
        "preprocessing": preprocessing(cfg.data, loaders, cfg.data.image_size),
        "source": {"checkpoint": str(saved.path), "step": saved.step, "run": cfg.run.name,
                   "val_top1": metrics and metrics.get("top1"), "val_top5": metrics and metrics.get("top5"),
                   "val_note": "as the run logged them at this step (metrics.jsonl)" if metrics else
                   "this step was not evaluated by the run (python -m lowrank_dist.evaluate gives them)"},
        "check_images": f"{sum(len(b) for b in images)} val images of {cfg.data.root}, evenly spread",
    }
    return Source(model, cfg.model.name, shape, info, images, labels)


def _state_dict(path: Path) -> dict:
    from .training.checkpoint import load_checkpoint

    payload = load_checkpoint(path)  # weights only: someone else's file must not run code
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict) and "config" in payload:
        raise CheckpointError(f"{str(path)!r} is one of our run checkpoints: give it as the positional argument")
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"--from-state-dict {str(path)!r} is not a state dict (a mapping of names to tensors)")
    return payload


def from_state_dict(args) -> Source:
    """A dense torchvision-style state dict, decomposed exactly by the given policy."""
    from .models import build_model, decompose_model, fc_policy, lowrank_policy, model_spec

    if args.model is None:
        raise ValueError("--from-state-dict needs --model (e.g. --model vgg16)")
    given = {k: getattr(args, k) for k in ("preset", "speedup", "energy") if getattr(args, k) is not None}
    if not given:
        raise ValueError("--from-state-dict needs a rank policy: --preset, --speedup or --energy")
    spec = model_spec(args.model)
    build = {"name": spec.name, "num_classes": args.num_classes or spec.num_classes}
    if args.batch_norm:  # else the model's own default
        build["batch_norm"] = True
    dense = build_model(build)
    try:
        dense.load_state_dict(_state_dict(args.from_state_dict))
    except RuntimeError as error:
        raise CheckpointError(f"--from-state-dict {str(args.from_state_dict)!r} does not fit {spec.name}"
                              f"{' with BatchNorm' if args.batch_norm else ''} and {build['num_classes']} classes:"
                              f" {' '.join(str(error).split())[:300]}") from None
    model, errors = decompose_model(dense, lowrank_policy(spec, given), inplace=True, fc=fc_policy(spec, given))
    size = args.image_size or spec.input_size[1]
    images, labels, info = _plain_images(args, spec, size)
    info["source"] = {"state_dict": str(args.from_state_dict), "policy": given, "step": None,
                      "val_top1": None, "val_top5": None, "val_note": "a plain state dict: not evaluated here"}
    return Source(model.eval(), spec.name, (spec.input_size[0], size, size), info, images, labels,
                  {e.name: e.relative_error for e in errors})


def _plain_images(args, spec, size: int):
    """The check images of --from-state-dict: --data's val images with torchvision's preprocessing
    (what its models were trained with), else random inputs."""
    from .config import DataConfig
    from .data import build_loaders

    if args.data is None:
        generator = torch.Generator().manual_seed(0)
        count = args.check_images
        images = [torch.randn((min(32, count - i), spec.input_size[0], size, size), generator=generator)
                  for i in range(0, count, 32)]
        print(f"warning: no --data: the equality check runs on {count} random inputs, not real images", file=sys.stderr)
        info = {"classes": {"count": args.num_classes or spec.num_classes, "names": None},
                "preprocessing": {"note": "not known from a plain state dict; torchvision's ImageNet models expect"
                                          " resize 256, centre crop 224, mean/std (0.485, 0.456, 0.406)/(0.229, 0.224,"
                                          " 0.225) on 0..1 RGB"},
                "check_images": f"{count} random-normal inputs (no --data given)"}
        return images, None, info
    if not args.data.is_dir():
        raise DataError(f"--data: folder {str(args.data)!r} does not exist")
    data = DataConfig(root=args.data, backend="torchvision", batch_size=32, image_size=size, workers=2)
    loaders = build_loaders(data, train=False)
    images, labels = val_images(loaders, args.check_images)
    info = {"classes": {"count": args.num_classes or spec.num_classes, "names": loaders.classes},
            "preprocessing": preprocessing(data, loaders, size),
            "check_images": f"{sum(len(b) for b in images)} val images of {args.data}, evenly spread"}
    return images, labels, info


# ----------------------------------------------------------------------------------------------
# Export and check


def check_equal(reference: np.ndarray, images: list[torch.Tensor], run, batch: int | None) -> dict:
    """The exported model's logits against the reference logits, image by image: the worst relative
    difference and the fraction of images with the same top-1. `batch`: the batch fixed in the
    file (the images are fed that many at a time, the last chunk padded with its first image), None
    if dynamic."""
    chunks = [b.numpy() for b in images]
    if batch is not None:
        flat = np.concatenate(chunks)
        chunks = [flat[start:start + batch] for start in range(0, len(flat), batch)]
        chunks[-1] = np.concatenate([chunks[-1], np.repeat(chunks[-1][:1], batch - len(chunks[-1]), axis=0)])
    got = np.concatenate([run(chunk) for chunk in chunks])[: len(reference)]
    scale = np.abs(reference).max(axis=1)
    relative = np.abs(got - reference).max(axis=1) / np.maximum(scale, np.finfo(np.float32).tiny)
    agree = float((got.argmax(axis=1) == reference.argmax(axis=1)).mean())
    worst = float(relative.max())
    return {"images": len(reference), "max_relative_difference": worst, "top1_agreement": agree,
            "passed": bool(worst <= MAX_RELATIVE_DIFFERENCE and agree >= MIN_TOP1_AGREEMENT)}


def plan_for(source: Source, fmt: str, args, batch: int) -> InferencePlan:
    runtime = args.target if fmt == "onnx" else "torch"
    return plan_inference(source.model, source.image_shape, batch, runtime, args.execution)


def export_format(source: Source, fmt: str, args, folder: Path, reference: np.ndarray) -> dict:
    """Plan, build, write and check one format in `folder`; its part of model.json."""
    dynamic = args.batch == "dynamic"
    batch = 1 if dynamic else int(args.batch)
    started = time.perf_counter()
    plan = plan_for(source, fmt, args, batch)
    print(plan.to_markdown() if plan.mode == "auto" else plan.summary())
    deployed = inference_model(source.model, plan.forms)
    path = folder / FORMATS[fmt]
    export(deployed, fmt, path, torch.zeros((batch, *source.image_shape)), dynamic)
    check = check_equal(reference, source.images, load_runner(path, fmt), None if dynamic else batch)
    check["runtime"] = "ort-cpu" if fmt == "onnx" else "torch"
    if source.labels is not None:  # the PyTorch model's top-1 on the check images, for scale
        labels = torch.cat(source.labels).numpy()
        check["pytorch_top1_on_these_images"] = float((reference.argmax(axis=1) == labels).mean() * 100)
    print(f"{fmt}: {check['images']} images, max relative difference {check['max_relative_difference']:.2e}"
          f" (≤ {MAX_RELATIVE_DIFFERENCE:g}), same top-1 on {100 * check['top1_agreement']:.2f}%"
          f" (≥ {100 * MIN_TOP1_AGREEMENT:g}%) — {'passed' if check['passed'] else 'FAILED'}"
          f" ({time.perf_counter() - started:.0f} s)")
    return {"file": path.name, "plan": plan, "check": check, "folded_batchnorm": deployed.folded_batchnorm,
            "unfolded_batchnorm": deployed.unfolded_batchnorm}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(source: Source, exported: dict[str, dict], args) -> dict:
    """model.json, less the file hashes."""
    names = layer_names(source.model)
    layers = [{"layer": names[path], "module": path, "rank": layer.rank,
               "kernel": [layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size],
               "groups": layer.groups, "forms": {fmt: part["plan"].forms.get(path) for fmt, part in exported.items()}}
              | ({"relative_error": source.errors[path]} if path in source.errors else {})
              for path, layer in lowrank_layers(source.model)]
    return {
        "model": source.name,
        "ranks": {names[path]: layer.rank for path, layer in lowrank_layers(source.model) + lowrank_linears(source.model)},
        "layers": layers,
        "fc_layers": [{"layer": names[path], "module": path, "rank": layer.rank,
                       "shape": [layer.out_features, layer.in_features], "form": "factorized"}
                      | ({"relative_error": source.errors[path]} if path in source.errors else {})
                      for path, layer in lowrank_linears(source.model)],
        "input": {"name": "images", "shape": ["batch" if args.batch == "dynamic" else int(args.batch),
                                              *source.image_shape]},
        "output": {"name": "logits", "shape": ["batch" if args.batch == "dynamic" else int(args.batch),
                                               source.info["classes"]["count"]]},
        **source.info,
        "formats": {fmt: {"file": part["file"], "plan": part["plan"].as_dict(), "check": part["check"],
                          "folded_batchnorm": part["folded_batchnorm"], "unfolded_batchnorm": part["unfolded_batchnorm"]}
                    for fmt, part in exported.items()},
        "exported_by": {"torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }


def write_export(source: Source, args, folder: Path) -> dict[str, InferencePlan] | None:
    """Everything into `folder`; the plan of each format, or None (the numbers printed) if a format
    fails its check."""
    with torch.no_grad():
        reference = np.concatenate([source.model(images).numpy() for images in source.images])
    exported, passed = {}, True
    for fmt in args.formats:
        exported[fmt] = export_format(source, fmt, args, folder, reference)
        passed = passed and exported[fmt]["check"]["passed"]
    if not passed:
        return None
    plans = {fmt: part["plan"] for fmt, part in exported.items()}
    write_text_atomic(folder / "plan.md", "\n\n".join(plan.to_markdown() for plan in plans.values()) + "\n")
    write_text_atomic(folder / "plan.json", json.dumps({fmt: plan.as_dict() for fmt, plan in plans.items()}, indent=1) + "\n")
    description = describe(source, exported, args)
    description["files"] = {path.name: {"sha256": sha256(path), "bytes": path.stat().st_size}
                            for path in sorted(folder.iterdir())}
    write_text_atomic(folder / "model.json", json.dumps(description, indent=1) + "\n")
    return plans


def print_errors(source: Source, plans: dict[str, InferencePlan]) -> None:
    """--from-state-dict: each layer's relative error beside its measured speedup on each target."""
    if not source.errors:
        return
    timed = {fmt: {layer.module: layer for layer in plan.layers} for fmt, plan in plans.items()}
    names = layer_names(source.model)
    print("\n| layer | rank | relative error |" + "".join(f" {fmt}: form, measured × |" for fmt in timed))
    print("|---|---:|---:|" + "---|" * len(timed))
    for path, layer in lowrank_layers(source.model) + lowrank_linears(source.model):
        cells = []
        for rows in timed.values():
            row = rows.get(path)
            speedup = row.speedup if row is not None else None
            cells.append(f" {row.form if row else '—'}, {f'{speedup:.2f}×' if speedup is not None else 'not timed'} |")
        print(f"| {names[path]} | {layer.rank} | {source.errors[path]:.4f} |" + "".join(cells))


def run(args) -> int:
    if (args.checkpoint is None) == (args.from_state_dict is None):
        raise ValueError("give a run folder or checkpoint, or --from-state-dict FILE (one of them)")
    args.formats = list(dict.fromkeys(f.strip() for f in args.format.split(",") if f.strip()))
    unknown = sorted(set(args.formats) - set(FORMATS)) or ([] if args.formats else ["(none)"])
    if unknown:
        raise ValueError(f"--format: unknown {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    if args.batch != "dynamic" and not (args.batch.isdigit() and int(args.batch) >= 1):
        raise ValueError(f"--batch must be a positive number or 'dynamic', got {args.batch!r}")
    if args.check_images < 1:
        raise ValueError(f"--check-images must be >= 1, got {args.check_images}")
    missing = sorted({p for fmt in args.formats for p in missing_packages(fmt)})
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)}: {INSTALL}")
    out = args.out
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists: choose another folder, or give --overwrite to replace it")
    started = time.perf_counter()
    source = from_checkpoint(args) if args.checkpoint is not None else from_state_dict(args)
    temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    temporary.mkdir(parents=True)
    try:
        plans = write_export(source, args, temporary)
        if plans is None:
            print(f"error: the exported model does not compute what the PyTorch model does (above); nothing written"
                  f" to {out}", file=sys.stderr)
            return 1
        _replace_folder(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    print_errors(source, plans)
    print(f"\nwrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))} ({time.perf_counter() - started:.0f} s)")
    return 0


def _replace_folder(new: Path, out: Path) -> None:
    """`new` renamed to `out`; an existing `out` (--overwrite) moved aside first and removed after."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
