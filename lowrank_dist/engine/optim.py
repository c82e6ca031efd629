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
    step:    max(m, gamma^n), n the number of milestones passed (epochs), or with step_every
             n = floor(epoch / step_every) (Caffe's "step": base_lr·gamma^floor(iter/stepsize)).
    linear_step: max(m, 1 − gamma·floor(epoch / step_every)). Our reading of "stepdecr", the policy
             of the authors' CaffeNet-BN solvers (gamma 0.04, stepsize 8,000, min_lr 0.001, 220,000
             iterations), which their Caffe fork defines but its public source does not show: a drop
             of 4% of base_lr every 8,000 iterations reaches min_lr at ~198,000, just before the end.
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
    if cfg.schedule == "linear_step":
        return max(cfg.min_lr / cfg.lr, 1.0 - cfg.gamma * math.floor(epoch / cfg.step_every + 1e-9))
    if cfg.step_every is not None:
        passed = math.floor(epoch / cfg.step_every + 1e-9)  # 1e-9: an exact multiple counts despite rounding
    else:
        passed = sum(epoch >= milestone for milestone in cfg.milestones)
    return max(cfg.min_lr / cfg.lr, cfg.gamma ** passed)


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: OptimConfig):
    """A LambdaLR stepped once per optimizer step; its state_dict makes resume exact."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))
