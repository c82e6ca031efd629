"""How a model runs here — on which device, in which precision, which output is its logits — so
that training, evaluation, the execution plan and the speed reports run it the same way."""

from __future__ import annotations

from contextlib import nullcontext

import torch

# the dtypes a model runs in, by the names configs and command lines use (precision.amp says "none" for fp32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str) -> torch.dtype:
    """precision.amp ("none", "bf16", "fp16") → the dtype the convolutions compute in."""
    return torch.float32 if amp == "none" else DTYPES[amp]


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} as torch dtypes, got {dtype}")


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Mixed precision as the trainer runs it: fp32 weights, autocast to `dtype` (none for fp32)."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def logits_of(outputs) -> torch.Tensor:
    """The main logits: GoogLeNet with auxiliary heads returns (logits, aux2, aux1) in train mode."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def device_type_for(requested: str | torch.device | None) -> str:
    """'cuda' or 'cpu' for a device asked for as 'auto' (or None: a GPU if there is one), 'cpu',
    'cuda', 'cuda:N' or a torch.device, before any process group exists."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(requested).type
    except RuntimeError as error:
        raise ValueError(f"not a device: {requested!r} ({error})") from None


def select_device(requested: str | torch.device | None = "auto", local_rank: int = 0, key: str = "run.device") -> torch.device:
    """The device to run on: 'auto' (or None) is this process's GPU (its local rank) when there is
    one, else the CPU; 'cuda' is this process's GPU; 'cpu', 'cuda:N' or a torch.device as given.
    One that cannot run here is a ValueError naming `key` (the setting or flag it came from)."""
    device_type = device_type_for(requested)
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"{key}: must be cpu or cuda, got {requested}")
    if device_type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{key}: 'cuda' was asked for but no CUDA GPU is visible; use 'auto' or 'cpu'")
    device = torch.device(requested) if requested not in (None, "auto") else torch.device("cuda")
    if device.index is not None:
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


# ----------------------------------------------------------------------------------------------
# The two things torch does only through private functions. Each is used only through these
# wrappers, and tests/test_torch_internals.py fails by name if a torch release changes one.


def flag_non_finite(tensors: list[torch.Tensor], found: torch.Tensor) -> None:
    """found (a 0-dim float tensor on the tensors' device) ← 1.0 if any of `tensors` holds an inf or
    a NaN, else left as it is; the tensors are not changed. On the device, no host read: torch's
    fused check that GradScaler runs, here with a scale of 1 (public torch has no fused one; a
    per-tensor isfinite would launch two kernels per parameter)."""
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones((), device=found.device))


def storage_holders(tensor: torch.Tensor) -> int:
    """How many references the C++ side holds to `tensor`'s storage: every tensor and view sharing
    it, plus one for the temporary storage object this call makes. Public torch cannot tell whether
    a buffer is still referenced by a view a consumer kept; the data loaders' buffer rings need it."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)
