"""What DDP sends between ranks: the gradient all-reduce hook, its bytes counted, and PowerSGD's
state as plain tensors for checkpoints.

    hook = CommHook.register(ddp, model, cfg.distributed, start_iter)   # plain, bf16 or PowerSGD
    ... backward (DDP calls the hook once per bucket) ...
    hook.end_step()            # after the optimizer step: hook.bytes_last_step is that step's count
    shared, own = hook.state_dict()   # PowerSGD: what every rank agrees on / this rank's error feedback

The hooks are torch's own (default_hooks.allreduce_hook, bf16_compress_hook, powerSGD_hook); the
wrapper only counts, per bucket, the bytes the hook hands to all-reduce: the bucket in fp32
(plain), the bucket cast to bfloat16 (bf16), and during PowerSGD's compression torch's own count
of the elements it all-reduces (the P and Q factors of each compressed gradient, and the
gradients too small to compress), or the whole bucket in its first `start_iter` plain steps.

PowerSGD's state is keyed by DDP bucket index, and DDP rebuilds its buckets (in the order the
gradients became ready) after the first step of every process — a resumed one too. So the state is
saved per parameter name (`state_dict`) and re-assembled per bucket when the hook next sees that
bucket (`load_state_dict`); after a process's first step the live state goes through the same
per-parameter form once, so a rebuild cannot misplace it. The error feedback differs per rank (the
local gradient minus the all-reduced approximation): it is this rank's own state, saved by each
rank; the Q factors (warm start), the iteration and the RNG are the same on every rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

from ..speed.network import BF16_BYTES, factor_layout

def _numpy_rng_state(rng: np.random.RandomState) -> dict:
    _, keys, pos, has_gauss, gaussian = rng.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(gaussian)}


def _set_numpy_rng_state(rng: np.random.RandomState, state: dict) -> None:
    rng.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                   state["cached_gaussian"]))


class CommHook:
    """The active DDP comm hook behind a counter; for PowerSGD, its state to and from plain tensors."""

    def __init__(self, model: nn.Module, compression: str, powersgd_state: powersgd.PowerSGDState | None = None):
        self.compression = compression
        self.state = powersgd_state
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        self.bytes_this_step = 0
        self.bytes_last_step = 0
        self.steps = 0  # optimizer steps this process has taken
        self.layout: dict[int, tuple[str, ...]] = {}  # bucket index → its parameters, as last seen
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # per-parameter PowerSGD state not yet in a bucket

    @classmethod
    def register(cls, ddp: nn.parallel.DistributedDataParallel, model: nn.Module, options, start_iter: int) -> CommHook:
        """Wrap and register the hook `options.grad_compression` names (distributed section)."""
        state = None
        if options.grad_compression == "powersgd":
            psgd = options.powersgd
            state = powersgd.PowerSGDState(
                process_group=None, matrix_approximation_rank=psgd.rank, start_powerSGD_iter=start_iter,
                use_error_feedback=psgd.error_feedback, warm_start=psgd.warm_start,
                min_compression_rate=psgd.min_compression_rate, random_seed=0)
        hook = cls(model, options.grad_compression, state)
        ddp.register_comm_hook(hook, _counted)
        return hook

    def __call__(self, bucket: torch.distributed.GradBucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        if self.compression == "none":
            self.bytes_this_step += buffer.numel() * buffer.element_size()
            return default_hooks.allreduce_hook(None, bucket)
        if self.compression == "bf16":
            self.bytes_this_step += buffer.numel() * BF16_BYTES
            return default_hooks.bf16_compress_hook(None, bucket)
        state, index = self.state, bucket.index()
        self.layout[index] = tuple(self.names[id(p)] for p in bucket.parameters())
        if self.pending:
            self._assemble(index, bucket)
        compressing = state.iter >= state.start_powerSGD_iter
        sent_before = state.total_numel_after_compression
        future = powersgd.powerSGD_hook(state, bucket)
        elements = state.total_numel_after_compression - sent_before if compressing else buffer.numel()
        self.bytes_this_step += elements * buffer.element_size()
        return future

    def end_step(self) -> None:
        """After the optimizer step (DDP has waited for every bucket's future)."""
        self.bytes_last_step, self.bytes_this_step = self.bytes_this_step, 0
        self.steps += 1
        if self.steps == 1 and self.state is not None:  # DDP rebuilds its buckets before the next step
            live = [self._per_parameter(own=True), self._per_parameter(own=False)]
            self._clear_buckets()
            for pieces in live:
                self._merge(pieces)

    # -- PowerSGD's state as plain tensors --------------------------------------------------------

    def state_dict(self) -> tuple[dict | None, dict | None]:
        """(shared, own): the state every rank holds alike (iteration, RNG, statistics, P and Q
        factors per parameter), and this rank's error feedback per parameter; (None, None) without
        PowerSGD."""
        if self.state is None:
            return None, None
        s = self.state
        shared = {"iter": s.iter, "rng": _numpy_rng_state(s.rng), "numel_before": s.total_numel_before_compression,
                  "numel_after": s.total_numel_after_compression, "next_stats_report": s.next_stats_report,
                  "factors": self._per_parameter(own=False)}
        return shared, {"error": self._per_parameter(own=True)}

    def load_state_dict(self, shared: dict, own: dict | None) -> None:
        """Restore what `state_dict` returned (`own` None: no error feedback, e.g. another world size)."""
        s = self.state
        s.iter, s.next_stats_report = shared["iter"], shared["next_stats_report"]
        s.total_numel_before_compression, s.total_numel_after_compression = shared["numel_before"], shared["numel_after"]
        _set_numpy_rng_state(s.rng, shared["rng"])
        self._clear_buckets()
        self.pending = {}
        self._merge(shared["factors"])
        self._merge((own or {}).get("error", {}))

    def _merge(self, per_parameter: dict) -> None:
        for name, tensors in per_parameter.items():
            self.pending.setdefault(name, {}).update(tensors)

    def _clear_buckets(self) -> None:
        for memory in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict):
            memory.clear()

    def _factor_layout(self, bucket_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, int]]:
        return factor_layout(bucket_shapes, self.state.matrix_approximation_rank, self.state.min_compression_rate)

    def _per_parameter(self, own: bool) -> dict[str, dict[str, torch.Tensor]]:
        """The bucket-keyed state cut into each parameter's piece (own: the error feedback; else P, Q)."""
        keys = ("error",) if own else ("p", "q")
        out = {name: {k: t for k, t in pieces.items() if k in keys} for name, pieces in self.pending.items()}
        out = {name: pieces for name, pieces in out.items() if pieces}  # restored, not yet in a bucket
        shapes = self.shapes
        for index, names in self.layout.items():
            if own and index in self.state.error_dict:
                offset = 0
                for name in names:
                    size = int(np.prod(shapes[name], dtype=np.int64))
                    out.setdefault(name, {})["error"] = self.state.error_dict[index][offset:offset + size].clone()
                    offset += size
            if not own and index in self.state.q_memory_dict:
                p_at = q_at = 0
                for name, (p_len, q_len) in self._factor_layout({n: shapes[n] for n in names}).items():
                    out.setdefault(name, {})["p"] = self.state.p_memory_dict[index][p_at:p_at + p_len].clone()
                    out[name]["q"] = self.state.q_memory_dict[index][q_at:q_at + q_len].clone()
                    p_at, q_at = p_at + p_len, q_at + q_len
        return out

    def _assemble(self, index: int, bucket) -> None:
        """This bucket's flat error, P and Q from the pending per-parameter pieces, in its layout."""
        names = self.layout[index]
        params = dict(zip(names, bucket.parameters()))
        if all("error" in self.pending.get(n, {}) for n in names):
            self.state.error_dict[index] = torch.cat([self.pending[n].pop("error") for n in names])
        factors = self._factor_layout({n: params[n].shape for n in names})
        if factors and all("q" in self.pending.get(n, {}) for n in factors):
            self.state.p_memory_dict[index] = torch.cat([self.pending[n].pop("p") for n in factors])
            self.state.q_memory_dict[index] = torch.cat([self.pending[n].pop("q") for n in factors])
        self.pending = {n: t for n, t in self.pending.items() if t}


def _counted(hook, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP calls `hook(state, bucket)`; the CommHook is the state and does the work."""
    return hook(bucket)
