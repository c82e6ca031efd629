"""SGD with the usual ImageNet exclusions, and the learning rate as a pure function of the position in the run."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from ..runtime import flag_non_finite


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The lr the optimizer uses: lr · global_batch / lr_batch under the linear scaling rule."""
    return cfg.lr * global_batch / cfg.lr_batch if cfg.lr_scaling == "linear" else cfg.lr


class SkippingSGD(torch.optim.SGD):
    """torch's fused SGD that leaves the weights and the momentum as they were, on the device,
    when any of its gradients is not finite — the way torch.amp.GradScaler skips an overflowing
    step, without the host ever reading the flag.

    Under DDP the gradients are the same on every rank after the all-reduce, so every rank takes
    the same decision without talking. `found_inf` (1.0 if the last update was skipped, a 0-dim
    device tensor) is what the trainer reads at its next sync point; a flag GradScaler set (fp16
    overflow) is honoured too. Fused SGD computes the same update as torch's default SGD to within
    rounding (it fuses multiply-adds: ~1 ulp per step), and is deterministic, so resumes stay exact."""

    def __init__(self, params, **options):
        super().__init__(params, fused=True, **options)
        self.skipped: torch.Tensor | None = None  # found_inf of the last step() call

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return super().step(closure)
        device = params[0].grad.device
        found = torch.zeros((), device=device)
        flag_non_finite([p.grad for p in params], found)  # found ← 1 if any gradient holds an inf or NaN
        scaler_found = getattr(self, "found_inf", None)  # set by GradScaler around this call (fp16)
        if scaler_found is not None:
            found = torch.maximum(found, scaler_found.to(device))
        for group in self.param_groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                # torch's fused first step allocates its momentum buffers uninitialised and, when that
                # step is skipped, leaves them so: start them at zero (m·0 + g = g, the same first step)
                state = self.state[p]
                if state.get("momentum_buffer") is None and p.grad is not None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.found_inf = found
        try:
            return super().step(closure)
        finally:
            if scaler_found is None:
                del self.found_inf
            else:
                self.found_inf = scaler_found
            self.skipped = found


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> SkippingSGD:
    """SGD (momentum, optional Nesterov; skipping non-finite updates on the device) at
    scaled_lr(cfg, global_batch) (cfg.lr if no batch is given). Weight decay applies to conv and linear weights only: decaying BN scales/shifts and
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
    return SkippingSGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


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


def learning_rate(cfg: OptimConfig, peak: float, steps_per_epoch: int, epoch: int, step_in_epoch: int) -> float:
    """The lr of the optimizer step `step_in_epoch` (0-based) of `epoch`: peak · lr_factor(position),
    position = epoch · steps_per_epoch + step_in_epoch. A pure function of where the run is (as
    nanoGPT's get_lr), so a resume needs no schedule state — also one at another world size, where
    the steps per epoch and the peak (the global batch, under linear scaling) change from that
    epoch on."""
    return peak * lr_factor(epoch * steps_per_epoch + step_in_epoch, steps_per_epoch, cfg)
