"""Predictive (non-contrastive) losses: BYOL's normalised regression onto a stop-gradient
target, and SimSiam's negative cosine (the same pairs, without a momentum encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_views, compute_dtype, no_autocast


def _check_pair(p: Tensor, z: Tensor, p_name: str, z_name: str) -> int:
    """V of two (V, N, D) tensors that must have the same shape."""
    V, _, _ = check_views(p, p_name)
    check_views(z, z_name)
    if p.shape != z.shape:
        raise ValueError(
            f"{p_name} and {z_name} must have the same (V, N, D) shape, got {tuple(p.shape)} "
            f"and {tuple(z.shape)}"
        )
    return V


def _view_pair_cosines(p: Tensor, target: Tensor) -> Tensor:
    """(V, V) matrix: entry (i, j) = mean_n cos(p[i, n], sg(target[j, n]))."""
    dtype = compute_dtype(p, target)
    p = F.normalize(p.to(dtype), dim=-1)
    t = F.normalize(target.detach().to(dtype), dim=-1)
    return torch.einsum("ind,jnd->ij", p, t) / p.shape[1]


def byol(p: Tensor, z_target: Tensor) -> Tensor:
    """BYOL loss (Grill et al. 2020): online predictions p vs target projections, both (V, N, D).

    For every ordered view pair (i, j ≠ i):
        term_ij = mean_n ( 2 − 2·cos(p[i, n], sg(z_target[j, n])) )
    and L = Σ_{i≠j} term_ij / (V − 1). For V = 2 that is term_01 + term_10 = BYOL's symmetrised
    L + L̃; for V > 2 dividing by V − 1 keeps the scale of "one symmetrised pair per view".
    z_target is detached here (stop-gradient), so callers may pass the EMA output directly.
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V = _check_pair(p, z_target, "p", "z_target")
    with no_autocast(p):
        cos = _view_pair_cosines(p, z_target)
        off = ~torch.eye(V, dtype=torch.bool, device=p.device)
        return (2 - 2 * cos)[off].sum() / (V - 1)


def simsiam(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam loss (Chen & He 2021): predictor outputs p vs projector outputs z, both (V, N, D).

    With D(p, z) = −cos(p, sg(z)) averaged over the batch, the loss is the mean of D(p_i, z_j)
    over the V(V − 1) ordered view pairs i ≠ j; at V = 2 it is SimSiam's symmetrised
    ½·D(p₁, z₂) + ½·D(p₂, z₁). z is detached here (the stop-gradient), so no gradient reaches
    the projector through the target side.
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V = _check_pair(p, z, "p", "z")
    with no_autocast(p):
        cos = _view_pair_cosines(p, z)
        off = ~torch.eye(V, dtype=torch.bool, device=p.device)
        return -cos[off].mean()
