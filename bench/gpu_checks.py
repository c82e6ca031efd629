"""The checks bench/gpu.py runs on the GPU before its speed tables, each one section of its results.

    dali        the DALI GPU pipeline ("mixed": nvJPEG) against DALI's CPU pipeline on a generated JPEG
                folder: the same samples, labels and byte counts, the same crop windows, images within
                the decoders' tolerance (DECODER_TOLERANCE). Without DALI: torchvision's back-end
                feeding the GPU against the same back-end feeding the CPU (bit-identical).
    train       the debug model (configs/debug.yaml) trained from those JPEGs through the real trainer
                (training.trainer.fit): every logged loss finite, the last window's below the first.
    layer       LowRankConv2d forward and backward on the device against the same layer in float64 on
                the CPU, both execution forms, at fp32 (TF32 off), TF32 and bf16 autocast (LAYER_TOLERANCE).
    executions  whole models run `factorized` and `composed`: the same logits and gradients.
    syncs       the trainer's step loop between sync points with torch.cuda.set_sync_debug_mode("warn")
                and every host read of a tensor counted: none expected.
    nccl        a process group of one through process_group(group_of_one=True), so the trainer runs
                DDP over NCCL and its sync points and evaluation all-reduce through it; then the
                evaluation's exactly-once counting over 3 shards of the val set on the device.

Each function takes the Checks context and returns a dict of what it measured; it raises CheckFailed
(with that dict) when a measurement is outside the bound it states, and Skip when it cannot run here.
On the CPU (bench/gpu.py --smoke) every section runs its CPU counterpart at toy sizes, and the parts
that need CUDA are recorded as "skipped: no CUDA" inside the section.
"""

from __future__ import annotations

import copy
import json
import math
import socket
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowrank_dist.config import DataConfig
from lowrank_dist.data import build_loaders
from lowrank_dist.data.dali import dali_available
from lowrank_dist.data.sampling import split_batches
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.lowrank.layers import LowRankConv2d
from lowrank_dist.models import build_model
from lowrank_dist.speed.costs import DEFAULT_LOWRANK
from lowrank_dist.speed.execution import set_execution
from lowrank_dist.runtime import logits_of

REPO = Path(__file__).resolve().parents[1]

# Mean absolute difference, in grey levels of 0..255, allowed between two decoders' crops of the same
# window. nvJPEG and libjpeg-turbo both follow the JPEG standard, which fixes the result only up to
# IDCT rounding (±1 level per pixel) and leaves chroma upsampling free (libjpeg-turbo's "fancy"
# triangular filter against nvJPEG's): single pixels at sharp colour edges can differ by tens of
# levels, so the maximum and the 99th percentile are recorded but not bounded; the mean over a crop
# stays within a level or two. A wrong crop window or mirror moves the mean by tens of levels (the
# `other_window` control measures that on the same images), far outside this bound.
DECODER_TOLERANCE = {"nvjpeg vs libjpeg-turbo": 2.0, "libjpeg-turbo, DALI vs PIL": 2.0, "same decoder": 0.0}

# max |device − float64 reference| / max |reference|, over the output and every gradient. fp32 with TF32
# off: a few float32 roundings per output, but cuDNN may choose Winograd or FFT algorithms, whose
# transforms lose up to ~1e-4 of the largest value; TF32 keeps 10 mantissa bits (2^-11 ≈ 5e-4 per
# product); bf16 autocast rounds the inputs and weights to 8 bits (2^-9 ≈ 2e-3), sums of many such
# terms reach about 1e-2.
LAYER_TOLERANCE = {"fp32": 2e-4, "tf32": 1e-2, "bf16": 3e-2}
# The two execution forms of a whole model in fp32: the composed kernel sums the same products in
# another order, and the difference grows through the depth of the network (VGG-16: 13 such layers).
EXECUTION_TOLERANCE = 1e-3

SIZES = {
    "gpu": {"classes": 10, "train_per_class": 100, "val_per_class": 20, "sides": (64, 160), "compare_size": 64,
            "compare_batch": 32, "threads": 4, "train_steps": 50, "log_every": 10, "batch": None,
            "sync_steps": 30, "sync_log_every": 10, "nccl_steps": 20, "models": ("alexnet", "vgg16", "googlenet"),
            "model_size": 224},
    # the smoke run: toy sizes, so the whole of bench/gpu.py --smoke stays near two minutes on a laptop
    "smoke": {"classes": 4, "train_per_class": 32, "val_per_class": 4, "sides": (48, 96), "compare_size": 32,
              "compare_batch": 8, "threads": 1, "train_steps": 16, "log_every": 4, "batch": 16,
              "sync_steps": 8, "sync_log_every": 4, "nccl_steps": 4, "models": ("tiny_vgg", "alexnet"),
              "model_size": 64},
}


class CheckFailed(AssertionError):
    """A measurement outside its stated bound; `measured` holds everything the section measured."""

    def __init__(self, message: str, measured: dict):
        super().__init__(message)
        self.measured = measured


class Skip(Exception):
    """The section cannot run here (no CUDA, no DALI, no time); the message says why."""


@dataclass
class Checks:
    device: torch.device
    smoke: bool
    work: Path  # a temporary folder: the JPEG folders and the training runs
    sizes: dict = field(init=False)
    _jpegs: Path | None = None

    def __post_init__(self):
        self.sizes = SIZES["smoke" if self.smoke else "gpu"]

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def jpegs(self) -> Path:
        """The generated JPEG folder every data and training check reads (made once)."""
        if self._jpegs is None:
            s = self.sizes
            self._jpegs = self.work / "jpegs"
            make_synthetic(self._jpegs, s["classes"], s["train_per_class"], s["val_per_class"], seed=0,
                           min_side=s["sides"][0], max_side=s["sides"][1])
        return self._jpegs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- dali ------------------------------------------------------------------------------------------


def _decoded(loaders, epoch: int, crops_of: int | None = None) -> dict[str, np.ndarray | torch.Tensor]:
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


def compare_backends(root: Path, reference: dict, candidate: dict, tolerance: str, batch: int, size: int,
                     threads: int) -> dict:
    """`candidate` ({backend, dali_device, device}) against `reference` on the same folder: the same
    samples, labels and byte counts exactly; the crops within DECODER_TOLERANCE[tolerance]."""
    def loaders(options: dict):
        data = DataConfig(root=root, batch_size=batch, image_size=size,
                          workers=threads if options["backend"] == "dali" else 0,
                          **{key: value for key, value in options.items() if key != "device"})
        return build_loaders(data, device=options["device"], channels_last=True)

    ref, cand = loaders(reference), loaders(candidate)
    epoch = 3
    a, b = _decoded(ref, epoch), _decoded(cand, epoch)
    control = _decoded(cand, epoch, crops_of=epoch + 1)["images"]
    diff = (a["images"].float() - b["images"].float()).abs()
    bound = DECODER_TOLERANCE[tolerance]
    result = {
        "reference": ref.backend, "candidate": cand.backend, "images_on": b["on"], "crops": len(diff),
        "crop_size": size, "same_samples": bool(np.array_equal(a["indices"], b["indices"])),
        "same_bytes": bool(np.array_equal(a["sizes"], b["sizes"])),
        "same_labels": bool(torch.equal(_labels(ref, epoch), _labels(cand, epoch))),
        "mean_abs_levels": float(diff.mean()), "p99_abs_levels": float(np.percentile(diff.numpy(), 99)),
        "max_abs_levels": float(diff.max()), "tolerance": f"mean ≤ {bound:g} levels ({tolerance})",
        # the same samples cropped at the next epoch's windows: what a wrong window would look like
        "other_window_mean_levels": float((a["images"].float() - control.float()).abs().mean()),
    }
    # the normalised batches the trainer gets: on the candidate's device, channels_last
    images, labels = next(iter(cand.train.epoch(epoch)))
    result["batch_device"] = str(images.device)
    result["batch_channels_last"] = bool(images.is_contiguous(memory_format=torch.channels_last))
    problems = [key for key in ("same_samples", "same_bytes", "same_labels") if not result[key]]
    if result["mean_abs_levels"] > bound:
        problems.append(f"mean |Δ| {result['mean_abs_levels']:.3f} > {bound:g} levels")
    if result["other_window_mean_levels"] <= max(4 * bound, 1.0):
        problems.append(f"the control (other windows) differs by only {result['other_window_mean_levels']:.2f}"
                        " levels: this check could not see a wrong window")
    if str(candidate["device"]) != "cpu" and not images.is_cuda:
        problems.append(f"the candidate's batches are on {images.device}, not the GPU")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result


def check_dali(checks: Checks) -> dict:
    """DALI on the GPU against DALI on the CPU (or, as far as this machine allows, the nearest pair)."""
    root, s = checks.jpegs(), checks.sizes
    sizes = {"batch": s["compare_batch"], "size": s["compare_size"], "threads": s["threads"]}
    cpu = torch.device("cpu")
    if not dali_available():
        # what the trainer would use instead: torchvision's loader, decoding on the CPU, feeding the device
        result = compare_backends(root, {"backend": "torchvision", "device": cpu},
                                  {"backend": "torchvision", "device": checks.device}, "same decoder", **sizes)
        return {"dali": "skipped: DALI not installed", "torchvision": result}
    if not checks.cuda:
        result = compare_backends(root, {"backend": "torchvision", "device": cpu},
                                  {"backend": "dali", "dali_device": "cpu", "device": cpu},
                                  "libjpeg-turbo, DALI vs PIL", **sizes)
        return {"dali_gpu": "skipped: no CUDA", "dali_cpu_vs_torchvision": result}
    result = compare_backends(root, {"backend": "dali", "dali_device": "cpu", "device": cpu},
                              {"backend": "dali", "dali_device": "gpu", "device": checks.device},
                              "nvjpeg vs libjpeg-turbo", **sizes)
    return {"dali_gpu_vs_dali_cpu": result}


# -- training through the real trainer ------------------------------------------------------------


def trainer_config(checks: Checks, name: str, steps: int, log_every: int):
    """configs/debug.yaml on the generated JPEGs, on this device, stopping after `steps` steps."""
    from lowrank_dist.config import load_config

    s = checks.sizes
    dali = dali_available()
    sets = [f"data.root={checks.jpegs()}", f"data.backend={'dali' if dali else 'torchvision'}",
            f"data.dali_device={'gpu' if checks.cuda else 'cpu'}",
            f"data.workers={s['threads'] if dali or checks.cuda else 0}",
            f"run.out_dir={checks.work / 'runs'}", f"run.name={name}", f"run.max_steps={steps}",
            f"run.log_every={log_every}", f"run.device={checks.device.type}", "run.checkpoint_every=0"]
    if checks.cuda:  # the GPU's training settings
        sets += ["precision.amp=bf16", "precision.channels_last=true"]
    if s["batch"]:
        sets.append(f"data.batch_size={s['batch']}")
    return load_config(REPO / "configs/debug.yaml", sets)


def logged_losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [record["train/loss"] for record in map(json.loads, lines) if "train/loss" in record]


def check_train(checks: Checks) -> dict:
    from lowrank_dist.training.trainer import fit

    s = checks.sizes
    cfg = trainer_config(checks, "train", s["train_steps"], s["log_every"])
    result = fit(cfg)
    losses = logged_losses(cfg.run.folder)
    measured = {"steps": result.step, "backend": cfg.data.backend, "dali_device": cfg.data.dali_device,
                "batch": cfg.data.batch_size, "image_size": cfg.data.image_size, "amp": cfg.precision.amp,
                "losses": losses, "val_top1": result.top1, "classes": s["classes"]}
    problems = []
    if result.step != s["train_steps"]:
        problems.append(f"trained {result.step} steps, asked for {s['train_steps']}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"a logged loss is not finite: {losses}")
    elif not losses[-1] < losses[0]:
        problems.append(f"the loss did not go down: first window {losses[0]:.4f}, last {losses[-1]:.4f}")
    if problems:
        raise CheckFailed("; ".join(problems), measured)
    return measured


# -- LowRankConv2d against float64 ----------------------------------------------------------------

LAYER_CASES = (
    {"in_channels": 16, "out_channels": 32, "kernel_size": 3, "rank": 8, "padding": 1},
    {"in_channels": 12, "out_channels": 20, "kernel_size": (5, 3), "rank": 6, "stride": 2, "padding": (2, 1),
     "groups": 2},
    {"in_channels": 8, "out_channels": 16, "kernel_size": 3, "rank": 4, "padding": 2, "dilation": 2},
)


@contextmanager
def tf32(enabled: bool):
    """TF32 in cuDNN convolutions and in matrix products (the composed kernel is one) on or off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest of max |got − want| / max |want| over the tensors."""
    return max(float((g.double().cpu() - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def _layer_pass(layer: LowRankConv2d, x: torch.Tensor, grad: torch.Tensor, autocast_dtype=None) -> list[torch.Tensor]:
    """Output, then the gradients of input, V, H and bias, for the output gradient `grad`."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.enable_grad():
        y = layer(x)
    y.backward(grad.to(y.dtype))
    return [y.detach(), x.grad, layer.vertical.weight.grad, layer.horizontal.weight.grad, layer.horizontal.bias.grad]


def check_layer(checks: Checks) -> dict:
    modes = {"fp32": (False, None), "tf32": (True, None), "bf16": (False, torch.bfloat16)}
    measured, problems = {"device": str(checks.device), "tolerance": LAYER_TOLERANCE, "cases": []}, []
    for number, case in enumerate(LAYER_CASES):
        torch.manual_seed(number)
        layer = LowRankConv2d(**case)
        x = torch.randn(4, case["in_channels"], 17, 19)
        reference = copy.deepcopy(layer).double()
        with torch.no_grad():
            grad = torch.randn(reference(x.double()).shape, dtype=torch.float64)  # one output gradient for all
        want = _layer_pass(reference, x.double(), grad)
        # the float64 reference is the definition: a dense conv with the composed kernel Ŵ
        with torch.no_grad():
            dense = F.conv2d(x.double(), reference.dense_weight(), reference.horizontal.bias, reference.stride,
                             reference.padding, reference.dilation, reference.groups)
        row = {"case": {k: v for k, v in case.items()}, "float64_vs_dense_conv": _relative([want[0]], [dense])}
        if row["float64_vs_dense_conv"] > 1e-12:
            problems.append(f"case {number}: the float64 layer is not the dense conv of its composed kernel")
        for execution in LowRankConv2d.EXECUTIONS:
            for mode, (allow_tf32, autocast_dtype) in modes.items():
                key = f"{execution} {mode}"
                if mode == "tf32" and not checks.cuda:
                    row[key] = "skipped: no CUDA (TF32 is a GPU format)"
                    continue
                on_device = copy.deepcopy(layer).to(checks.device)
                on_device.execution = execution
                with tf32(allow_tf32):
                    got = _layer_pass(on_device, x.to(checks.device), grad.float().to(checks.device), autocast_dtype)
                row[key] = error = _relative(got, want)
                if error > LAYER_TOLERANCE[mode]:
                    problems.append(f"case {number} {key}: relative error {error:.2e} > {LAYER_TOLERANCE[mode]:g}")
        measured["cases"].append(row)
    if problems:
        raise CheckFailed("; ".join(problems), measured)
    return measured


# -- the two execution forms of whole models -------------------------------------------------------


def check_executions(checks: Checks) -> dict:
    s = checks.sizes
    measured, problems = {"device": str(checks.device), "tolerance": EXECUTION_TOLERANCE, "models": {}}, []
    for name in s["models"]:
        torch.manual_seed(0)
        model = build_model({"name": name, "lowrank": DEFAULT_LOWRANK.get(name, {"speedup": 2.0})})
        model = model.to(checks.device).eval()  # eval: no dropout, the same BN statistics for both forms
        size = s["model_size"] if name != "tiny_vgg" else 32
        x = torch.randn(2, 3, size, size, device=checks.device)
        runs = {}
        for execution in LowRankConv2d.EXECUTIONS:
            set_execution(model, execution)
            model.zero_grad(set_to_none=True)
            with tf32(False):
                logits = logits_of(model(x))
                (logits * torch.linspace(-1, 1, logits.shape[1], device=checks.device)).sum().backward()
            runs[execution] = [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
        reference = [t.double().cpu() for t in runs["factorized"]]
        error = _relative(runs["composed"], reference)
        measured["models"][name] = {"image_size": size, "tensors": len(reference), "relative_error": error}
        if error > EXECUTION_TOLERANCE:
            problems.append(f"{name}: composed vs factorized relative error {error:.2e} > {EXECUTION_TOLERANCE:g}")
        del model, runs
    if problems:
        raise CheckFailed("; ".join(problems), measured)
    return measured


# -- no host syncs between sync points -------------------------------------------------------------

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__repr__", "__format__")


class StepWatch:
    """While on, each host read of a tensor (READS, outside the data feed, as tests/test_host_syncs.py
    counts them) and, on CUDA, each synchronizing operation torch.cuda.set_sync_debug_mode("warn")
    reports, with where it came from, in the window it happened (windows end at the loop's sync points)."""

    def __init__(self, cuda: bool):
        self.cuda, self.on, self.window, self.depth = cuda, False, 0, 0
        self.events: list[dict] = []
        self.restore: list[tuple[object, str, object]] = []

    def _where(self) -> str | None:
        """file:line of the innermost project frame; None for the data feed's own reads (host
        tensors that never were on the device)."""
        frames = [f for f in traceback.extract_stack()[:-2] if "lowrank_dist" in f.filename]
        if frames and "lowrank_dist/data/" in frames[-1].filename.replace("\\", "/"):
            return None
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "outside lowrank_dist"

    def _wrap(self, owner, name: str, wrapper) -> None:
        self.restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper(getattr(owner, name)))

    def _counted(self, name: str):
        def wrapper(real):
            def counted(*args, **kwargs):
                if self.on and self.depth == 0:
                    where = self._where()
                    if where is not None:
                        self.events.append({"kind": "read", "what": name, "where": where, "window": self.window})
                self.depth += 1
                try:
                    return real(*args, **kwargs)
                finally:
                    self.depth -= 1
            return counted
        return wrapper

    def _paused(self, real):
        """The sync point itself reads on purpose: not counted; the next window starts after it."""
        def paused(*args, **kwargs):
            self.switch(False)
            try:
                return real(*args, **kwargs)
            finally:
                self.window += 1
                self.switch(True)
        return paused

    def _epoch(self, real):
        def epoch(*args, **kwargs):
            self.switch(True)
            try:
                return real(*args, **kwargs)
            finally:
                self.switch(False)
        return epoch

    def switch(self, on: bool) -> None:
        self.on = on
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn" if on else "default")

    @contextmanager
    def watching(self):
        from lowrank_dist.training import loop as loop_module
        from lowrank_dist.training import trainer as trainer_module

        for name in READS:
            self._wrap(torch.Tensor, name, self._counted(name))
        self._wrap(loop_module, "sync", self._paused)
        self._wrap(trainer_module, "train_one_epoch", self._epoch)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        finally:
            self.switch(False)
            for owner, name, real in reversed(self.restore):
                setattr(owner, name, real)
        for warning in caught:
            if "synchroniz" in str(warning.message):
                self.events.append({"kind": "cuda sync", "what": str(warning.message).splitlines()[0],
                                    "where": f"{Path(warning.filename).name}:{warning.lineno}", "window": None})


def check_syncs(checks: Checks) -> dict:
    """The trainer's loop, sync_steps steps with a sync point every sync_log_every: the reads and
    syncs inside the windows between sync points, expected none. The sync-debug warnings carry no
    window (they arrive through the warnings module), so they count for the whole loop."""
    from lowrank_dist.training.trainer import fit

    s = checks.sizes
    cfg = trainer_config(checks, "syncs", s["sync_steps"], s["sync_log_every"])
    watch = StepWatch(checks.cuda)
    with watch.watching():
        fit(cfg)
    reads = [e for e in watch.events if e["kind"] == "read"]
    syncs = [e for e in watch.events if e["kind"] == "cuda sync"]
    measured = {
        "steps": s["sync_steps"], "sync_every": s["sync_log_every"], "windows": watch.window,
        "host_reads": len(reads), "cuda_syncs": len(syncs) if checks.cuda else "skipped: no CUDA",
        "where": sorted({f"{e['kind']} {e['what']} at {e['where']}" for e in watch.events}),
    }
    if reads or syncs:
        raise CheckFailed(f"{len(reads)} host reads and {len(syncs)} CUDA syncs between sync points", measured)
    return measured


# -- NCCL -------------------------------------------------------------------------------------------


def check_nccl(checks: Checks) -> dict:
    """A group of one (NCCL on the GPU, gloo on the CPU) through process_group, the trainer on it
    (DDP, the sync points' and the evaluation's all-reduces through the backend), then the
    evaluation over 3 shards of the val set: every image once."""
    import torch.distributed as dist

    from lowrank_dist.training import trainer as trainer_module
    from lowrank_dist.training.distributed import DistContext, Rendezvous, process_group
    from lowrank_dist.training.evaluate import evaluate

    s = checks.sizes
    cfg = trainer_config(checks, "nccl", s["nccl_steps"], s["nccl_steps"])
    engines = []
    real_build = trainer_module.build_engine

    def build_engine(*args, **kwargs):
        engines.append(real_build(*args, **kwargs))
        return engines[-1]

    trainer_module.build_engine = build_engine
    measured: dict = {"nccl": "skipped: no CUDA (gloo ran the same code path)"} if not checks.cuda else {}
    try:
        with process_group(Rendezvous(master_port=free_port()), checks.device.type, 120, group_of_one=True) as ctx:
            measured |= {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                         "context_distributed": ctx.distributed}
            result = trainer_module.fit(cfg, ctx)
            engine = engines[-1]
            measured |= {"steps": result.step, "wrapped_in": type(engine._ddp).__name__, "val_top1": result.top1}
            model = engine.module
            whole = evaluate(model, build_loaders(cfg.data, **_val_options(checks, cfg, 0, 1)).val, ctx)
    finally:
        trainer_module.build_engine = real_build
    shards = [evaluate(model, build_loaders(cfg.data, **_val_options(checks, cfg, rank, 3)).val, DistContext())
              for rank in range(3)]
    num_val = s["classes"] * s["val_per_class"]
    measured |= {"val_images": num_val, "counted_in_group": whole["count"], "counted_in_3_shards": [r["count"] for r in shards],
                 "top1_whole": whole["top1"],
                 "top1_from_shards": sum(r["top1"] * r["count"] for r in shards) / max(1, sum(r["count"] for r in shards))}
    problems = []
    if checks.cuda and measured["backend"] != "nccl":
        problems.append(f"the group's backend is {measured['backend']}, not nccl")
    if measured["wrapped_in"] != "DistributedDataParallel":
        problems.append(f"the engine wrapped the model in {measured['wrapped_in']}, not DistributedDataParallel")
    if whole["count"] != num_val or sum(measured["counted_in_3_shards"]) != num_val:
        problems.append(f"counted {whole['count']} (group) and {measured['counted_in_3_shards']} (shards) of {num_val}")
    # each image's verdict does not depend on the shard it is in, up to a near-tie flipped by another
    # batch composition (a different cuDNN algorithm): at most one image
    if abs(measured["top1_whole"] - measured["top1_from_shards"]) * num_val / 100 > 1.0 + 1e-9:
        problems.append(f"top-1 {measured['top1_whole']:.2f}% whole vs {measured['top1_from_shards']:.2f}% over shards")
    if problems:
        raise CheckFailed("; ".join(problems), measured)
    return measured


def _val_options(checks: Checks, cfg, rank: int, world_size: int) -> dict:
    """build_loaders' options besides the data section (cfg.data, whose root is checks.jpegs())."""
    return {"device": checks.device, "channels_last": cfg.precision.channels_last, "rank": rank,
            "world_size": world_size, "train": False}


CHECKS = {"dali": check_dali, "train": check_train, "layer": check_layer, "executions": check_executions,
          "syncs": check_syncs, "nccl": check_nccl}
# seconds each needs on the GPU at most, as far as known: a section is skipped when less of the budget is left
ESTIMATE_S = {"dali": 40, "train": 60, "layer": 10, "executions": 30, "syncs": 45, "nccl": 60}


def run_check(name: str, checks: Checks) -> dict:
    """One section: {"status": "ok" | "failed" | "skipped", "reason"?, ...measurements}."""
    try:
        measured = CHECKS[name](checks)
    except Skip as skip:
        return {"status": "skipped", "reason": str(skip)}
    except CheckFailed as failed:
        return {"status": "failed", "reason": str(failed), **failed.measured}
    except Exception as error:  # a crash is a finding too: recorded, and the next section runs
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}".splitlines()[0]}
    skipped = sorted(key for key, value in _flatten(measured) if isinstance(value, str) and value.startswith("skipped"))
    return {"status": "ok", **({"parts_skipped": skipped} if skipped else {}), **measured}


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _flatten(item, f"{prefix}{key}[{i}].")
        else:
            yield f"{prefix}{key}", value


