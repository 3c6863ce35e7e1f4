"""Optimizers (SGD, AdamW, LARS) with no weight decay on norm/bias parameters, and the lr schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ssl_lab.config import OptimConfig


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Norm weights and biases (all ≤1-D parameters) get no decay and no LARS adaptation, as in
    the SimCLR/BYOL/VICReg recipes: decaying a BN scale fights the normalisation itself.

    A module with a true `fixed_lr` attribute (SimSiam's predictor with
    method.predictor_fixed_lr) gets its own two groups, marked `fix_lr`, after the usual two."""
    modules = list(modules)
    groups = []
    for fixed in (False, True):
        decay, no_decay = [], []
        for module in modules:
            if bool(getattr(module, "fixed_lr", False)) != fixed:
                continue
            for param in module.parameters():
                if param.requires_grad:
                    (no_decay if param.ndim <= 1 else decay).append(param)
        if fixed and not decay and not no_decay:
            continue
        mark = {"fix_lr": True} if fixed else {}
        groups += [{"params": decay, "weight_decay": weight_decay, **mark},
                   {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **mark}]
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio η·‖w‖/‖g + wd·w‖ (You et al. 2017)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta, "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.norm(p), torch.linalg.norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(modules: Iterable[nn.Module], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """`cfg.name`'s optimizer over `param_groups(modules)` at `lr`. Groups marked `fix_lr`
    remember `lr` as their `fixed_lr`, which `set_lr` keeps (SimSiam: the predictor's lr is
    the peak lr throughout, no warm-up and no decay)."""
    groups = param_groups(modules, cfg.weight_decay)
    for g in groups:
        if g.pop("fix_lr", False):
            g["fixed_lr"] = lr
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=lr)
    return LARS(groups, lr=lr, momentum=cfg.momentum)


def scaled_lr(cfg: OptimConfig) -> float:
    """Linear scaling rule: `optim.lr` is the lr of a batch of 256."""
    return cfg.lr * cfg.batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_frac: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `final_frac · peak`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cosine = (1 + math.cos(math.pi * min(progress, 1.0))) / 2
    return peak * (final_frac + (1 - final_frac) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr for every group, except groups with a `fixed_lr` (build_optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("fixed_lr", lr)
