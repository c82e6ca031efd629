"""Files a deployed model is shipped as, and the runtimes that run them.

- ONNX, written by torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`: torch.export
  then onnxscript). The older TorchScript exporter cannot export CaffeNet (its ceil-mode max-pool
  before an adaptive pool, and LRN); the dynamo one exports every model here.
- `.pt2`, a torch.export ExportedProgram (`torch.export.save`), run with torch.
A batch size is fixed in the file, or left dynamic ("batch" in both formats; traced at batch 2,
since torch.export specialises a dimension of size 1).

A runtime is a name and a way to run a file: "torch" (eager PyTorch, the model itself or a loaded
.pt2), "ort-cpu", "ort-cuda" and "ort-tensorrt" (onnxruntime with that execution provider).
`runtime_status()` says which of them can run here and, for the others, why not.
onnx, onnxscript and onnxruntime are the `export` extra (pip install 'lowrank-dist[export]').
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

FORMATS = {"onnx": "model.onnx", "pt2": "model.pt2"}
RUNTIMES = ("torch", "ort-cpu", "ort-cuda", "ort-tensorrt")
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-tensorrt": "TensorrtExecutionProvider"}
INSTALL = "pip install 'lowrank-dist[export]' (onnx, onnxscript, onnxruntime)"
INPUT, OUTPUT = "images", "logits"


def missing_packages(fmt: str = "onnx") -> list[str]:
    """The packages the ONNX format (export and check) needs and this Python lacks."""
    if fmt != "onnx":
        return []
    missing = []
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    return missing


def runtime_status(device: str = "cpu") -> dict[str, str | None]:
    """Runtime → None where it can run here, else the reason it cannot. `device` "cuda" asks for
    the GPU runtimes too (they are skipped, with that reason, on a CPU-only run)."""
    status: dict[str, str | None] = {"torch": None}
    try:
        import onnxruntime
    except ImportError:
        return status | {name: f"onnxruntime is not installed ({INSTALL})" for name in PROVIDERS}
    available = set(onnxruntime.get_available_providers())
    for name, provider in PROVIDERS.items():
        if name != "ort-cpu" and device != "cuda":
            status[name] = "a GPU runtime: not asked for on the CPU (--device cuda)"
        elif provider not in available:
            status[name] = f"onnxruntime {onnxruntime.__version__} here has no {provider} (it has {', '.join(sorted(available))})"
        elif name != "ort-cpu" and not torch.cuda.is_available():
            status[name] = "no CUDA device"
        else:
            status[name] = None
    return status


# ----------------------------------------------------------------------------------------------
# Writing


def _dynamic(example: torch.Tensor, dynamic_batch: bool):
    if not dynamic_batch:
        return example, None
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example, ({0: torch.export.Dim("batch", min=1)},)


def export_pt2(model: nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool = False) -> None:
    """torch.export of eval-mode `model` at `example`'s shape (batch dynamic if asked), saved to `path`."""
    example, shapes = _dynamic(example, dynamic_batch)
    program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool = False) -> None:
    """ONNX of eval-mode `model` by the dynamo exporter: one input "images" (N×C×H×W float32), one
    output "logits"; the weights inside the file. The exporter's progress lines are not printed."""
    example, shapes = _dynamic(example, dynamic_batch)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=shapes, external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def export(model: nn.Module, fmt: str, path: Path, example: torch.Tensor, dynamic_batch: bool = False) -> None:
    {"onnx": export_onnx, "pt2": export_pt2}[fmt](model, path, example, dynamic_batch)


# ----------------------------------------------------------------------------------------------
# Running


def ort_session(model: str | Path | bytes, runtime: str = "ort-cpu", threads: int | None = None):
    """An onnxruntime session of an ONNX file (or its bytes) on `runtime`'s provider, with every
    graph optimisation on and `threads` intra-op threads (default: torch's thread count, so that
    torch and onnxruntime are timed with the same cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no warnings about providers or unused initialisers
    providers = [PROVIDERS[runtime]] + (["CPUExecutionProvider"] if runtime != "ort-cpu" else [])
    source = model if isinstance(model, bytes) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=providers)
    if session.get_providers()[0] != PROVIDERS[runtime]:  # onnxruntime falls back to the CPU quietly
        raise RuntimeError(f"onnxruntime could not start {PROVIDERS[runtime]} here (it ran on"
                           f" {session.get_providers()[0]} instead)")
    return session


def ort_runner(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name

    def run(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: images})[0]

    return run


def torch_runner(module: nn.Module, device: torch.device | str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """Eager PyTorch: numpy batch in, numpy logits out (the module already on `device`, in eval mode)."""
    device = torch.device(device)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return run


def load_runner(path: Path, fmt: str, runtime: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A written file, ready to run: ONNX in onnxruntime (`runtime`, default its CPU provider),
    .pt2 in torch (torch.export.load)."""
    if fmt == "onnx":
        return ort_runner(ort_session(path, runtime or "ort-cpu"))
    if fmt == "pt2":
        return torch_runner(torch.export.load(str(path)).module())
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def conv_graph(module: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """A serialized ONNX model of just `module` — an nn.Conv2d, or an nn.Sequential of them (a
    factorized layer's inference form, BatchNorm folded) — for timing one layer in onnxruntime.
    Written node by node with onnx.helper: running the exporter for each of a model's layers would
    take seconds each, and a conv needs nothing it does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    convs = [module] if isinstance(module, nn.Conv2d) else [m for m in module if not isinstance(m, nn.Identity)]
    nodes, weights, current = [], [], INPUT
    for index, conv in enumerate(convs):
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv_graph takes zero-padded nn.Conv2d layers, got {conv}")
        names = [current, f"w{index}"] + ([f"b{index}"] if conv.bias is not None else [])
        weights.append(numpy_helper.from_array(conv.weight.detach().float().cpu().numpy(), f"w{index}"))
        if conv.bias is not None:
            weights.append(numpy_helper.from_array(conv.bias.detach().float().cpu().numpy(), f"b{index}"))
        current = OUTPUT if index == len(convs) - 1 else f"y{index}"
        ph, pw = conv.padding
        nodes.append(helper.make_node("Conv", names, [current], kernel_shape=list(conv.kernel_size),
                                      strides=list(conv.stride), pads=[ph, pw, ph, pw], dilations=list(conv.dilation),
                                      group=conv.groups))
    with torch.no_grad():
        output_shape = list(copy.deepcopy(module).to("meta")(torch.empty(input_shape, device="meta")).shape)
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, output_shape)], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime releases older than this onnx
    onnx.checker.check_model(model)
    return model.SerializeToString()
