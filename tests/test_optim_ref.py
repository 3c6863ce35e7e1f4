"""Optimisation pieces numbers depend on, each against a reference written from its paper or
its formula (not from our implementation): the lr schedule and scaling rule, which parameters
are decayed, LARS, BYOL's target EMA and momentum schedule, and β ∝ 1/d."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ssl_lab.config import MethodConfig, OptimConfig
from ssl_lab.methods import byol_momentum, effective_beta
from ssl_lab.optim import build_optimizer, lr_at, param_groups, scaled_lr


def test_linear_scaling_rule():
    # Goyal et al. 2017 as SimCLR states it: lr = base_lr x batch / 256
    assert scaled_lr(OptimConfig(lr=0.3, batch_size=4096)) == pytest.approx(4.8)
    assert scaled_lr(OptimConfig(lr=8e-3, batch_size=128)) == pytest.approx(4e-3)


@pytest.mark.parametrize("final", [0.0, 0.001, 0.1])
def test_warmup_then_cosine_matches_the_formula(final):
    peak, warmup, total = 2.0, 10, 110
    # warm-up: linear, reaching the peak on the last warm-up step
    assert lr_at(0, total, warmup, peak, final) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, total, warmup, peak, final) == pytest.approx(peak)
    for step in (warmup, 35, 60, 85, total - 1, total):
        t = (step - warmup) / (total - warmup)  # SGDR's cosine from peak to final·peak
        expected = final * peak + (peak - final * peak) * 0.5 * (1 + math.cos(math.pi * t))
        assert lr_at(step, total, warmup, peak, final) == pytest.approx(expected)
    assert lr_at(total, total, warmup, peak, final) == pytest.approx(final * peak)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))


def test_norm_weights_and_biases_are_not_decayed():
    net = _net()
    net(torch.zeros(2, 3, 6, 6))  # materialise the lazy layer
    decay, no_decay = param_groups([net], 0.5)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight",
                                                               "3.bias"]
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.5


def test_adamw_with_zero_gradients_only_shrinks_decayed_weights():
    """AdamW's decoupled decay (Loshchilov & Hutter): w <- w - lr*wd*w when the gradient is 0."""
    net = _net()
    net(torch.zeros(2, 3, 6, 6))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer([net], OptimConfig(name="adamw", weight_decay=0.1), lr=0.5)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in net.named_parameters():
        factor = 1 - 0.5 * 0.1 if name.endswith("weight") and p.ndim > 1 else 1.0
        assert torch.allclose(p, before[name] * factor, atol=1e-7), name


def _lars_reference(params, grads, bufs, lr, momentum, wd, eta, excluded):
    """You et al. 2017, Algorithm 1 with the SimCLR/BYOL convention: decay and trust ratio
    eta*||w|| / ||g + wd*w|| skipped for biases and norm parameters."""
    out = []
    for w, g, v, skip in zip(params, grads, bufs, excluded, strict=True):
        d = g if skip else g + wd * w
        if not skip:
            wn, dn = w.norm().item(), d.norm().item()
            d = d * (eta * wn / dn if wn > 0 and dn > 0 else 1.0)
        v = momentum * v + d
        out.append((w - lr * v, v))
    return out


def test_lars_equals_the_reference_over_three_steps():
    net = _net()
    net(torch.zeros(2, 3, 6, 6))
    cfg = OptimConfig(name="lars", weight_decay=1e-3, momentum=0.9)
    opt = build_optimizer([net], cfg, lr=0.2)
    params = [p.detach().clone() for p in net.parameters()]
    bufs = [torch.zeros_like(p) for p in params]
    excluded = [p.ndim <= 1 for p in params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        stepped = _lars_reference(params, grads, bufs, 0.2, 0.9, 1e-3, 0.02, excluded)
        params, bufs = [w for w, _ in stepped], [v for _, v in stepped]
        for p, ref in zip(net.parameters(), params, strict=True):
            assert torch.allclose(p, ref, atol=1e-6)


def test_byol_momentum_schedule():
    """Grill et al. 2020: tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2."""
    base, total = 0.996, 1000
    for k in (0, 1, 250, 500, 999, 1000):
        expected = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        assert byol_momentum(base, k, total) == pytest.approx(expected, abs=1e-12)
    assert byol_momentum(base, 0, total) == pytest.approx(base)
    assert byol_momentum(base, total, total) == pytest.approx(1.0)


def test_byol_target_is_an_ema_of_the_online_weights_and_copies_buffers():
    from ssl_lab.config import ModelConfig
    from ssl_lab.methods import SSLModel, get_method
    from ssl_lab.models.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(ModelConfig(backbone="resnet18", width=0.125, last_width=None,
                              projector="16-8"), 1, 16, [0.5], [0.25])
    model = SSLModel(enc, get_method("byol"), MethodConfig(name="byol", predictor="16"), 10)
    target0 = {n: p.detach().clone() for n, p in model.target.named_parameters()}
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)  # the online network moved
        for b in enc.buffers():
            if b.dtype.is_floating_point:
                b.add_(3.0)
    online = dict(enc.named_parameters())
    model.update_target(0.9)
    for name, p in model.target.named_parameters():
        assert torch.allclose(p, 0.9 * target0[name] + 0.1 * online[name], atol=1e-6), name
    for (_, t), (_, o) in zip(model.target.named_buffers(), enc.named_buffers(), strict=True):
        assert torch.equal(t, o)


@pytest.mark.parametrize("dim", [16, 128, 256, 1024])
def test_inverse_dim_beta_scaling(dim):
    """Ghosh et al. 2024 anchor: beta(d) = beta_ref * d_ref / d; 'none' keeps beta."""
    mc = MethodConfig(beta=0.005, beta_scaling="inverse_dim", beta_ref_dim=128)
    assert effective_beta(mc, dim) == pytest.approx(0.005 * 128 / dim)
    assert effective_beta(MethodConfig(beta=0.005), dim) == 0.005
