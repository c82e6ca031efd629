"""Top-1, top-5 and loss over the validation set, each image counted exactly once at any world size."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import logits_of
from .distributed import DistContext


@torch.no_grad()
def evaluate(
    model: nn.Module, val_loader, dist_ctx: DistContext = DistContext(),
    autocast: AbstractContextManager | None = None, forward=None,
) -> dict[str, float]:
    """`val_loader` yields (images, labels, valid): padded duplicates have valid=False and are not
    counted. Sums are reduced over ranks, so every rank gets the same global numbers. `forward`
    (default: the model) is what runs the batch, e.g. a compiled or DeepSpeed-wrapped model."""
    forward = forward or model
    was_training = model.training
    model.eval()
    totals = None
    try:
        for images, labels, valid in val_loader:
            with autocast or nullcontext():
                logits = logits_of(forward(images)).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hits = top == labels[:, None]
            valid = valid.to(logits.dtype)
            batch = torch.stack([
                (F.cross_entropy(logits, labels, reduction="none") * valid).sum(),
                (hits[:, 0].to(logits.dtype) * valid).sum(),
                (hits.any(dim=1).to(logits.dtype) * valid).sum(),
                valid.sum(),
            ]).double()
            totals = batch if totals is None else totals + batch
    finally:
        model.train(was_training)
    if totals is None:
        totals = torch.zeros(4, dtype=torch.float64)
    totals = dist_ctx.all_reduce_sum(totals)
    loss, correct1, correct5, count = totals.tolist()
    if count == 0:
        raise ValueError("the validation set is empty: nothing to evaluate")
    return {"loss": loss / count, "top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "count": int(count)}
