"""SGD with the usual ImageNet exclusions, and per-step learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD (momentum, optional Nesterov). Weight decay applies to conv and linear weights only:
    decaying BN scales/shifts and biases only fights the normalisation (Goyal et al. 2017)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


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
