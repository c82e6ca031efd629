"""SGD with the usual ImageNet exclusions, and per-step learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The lr the optimizer uses: lr · global_batch / lr_batch under the linear scaling rule."""
    return cfg.lr * global_batch / cfg.lr_batch if cfg.lr_scaling == "linear" else cfg.lr


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.SGD:
    """SGD (momentum, optional Nesterov) at scaled_lr(cfg, global_batch) (cfg.lr if no batch is
    given). Weight decay applies to conv and linear weights only: decaying BN scales/shifts and
    biases only fights the normalisation (Goyal et al. 2017)."""
    lr = cfg.lr if global_batch is None else scaled_lr(cfg, global_batch)
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(step: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    warm-up: linear from 1/W to 1 over W = warmup_epochs·steps_per_epoch steps;
    cosine:  m + (1 − m)·½(1 + cos(π·t/T)) after warm-up, m = min_lr/lr, t/T the remaining fraction;
    step:    gamma^(number of milestones passed), milestones in epochs.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "cosine":
        floor = cfg.min_lr / cfg.lr
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / steps_per_epoch
    return cfg.gamma ** sum(epoch >= milestone for milestone in cfg.milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: OptimConfig):
    """A LambdaLR stepped once per optimizer step; its state_dict makes resume exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
