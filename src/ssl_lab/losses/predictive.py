"""Predictive (non-contrastive) loss: BYOL's normalised regression onto a stop-gradient target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_views, compute_dtype, no_autocast


def byol(p: Tensor, z_target: Tensor) -> Tensor:
    """BYOL loss (Grill et al. 2020): online predictions p vs target projections, both (V, N, D).

    For every ordered view pair (i, j ≠ i):
        term_ij = mean_n ( 2 − 2·cos(p[i, n], sg(z_target[j, n])) )
    and L = Σ_{i≠j} term_ij / (V − 1). For V = 2 that is term_01 + term_10 = BYOL's symmetrised
    L + L̃; for V > 2 dividing by V − 1 keeps the scale of "one symmetrised pair per view".
    z_target is detached here (stop-gradient), so callers may pass the EMA output directly.
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V, _, _ = check_views(p, "p")
    check_views(z_target, "z_target")
    if p.shape != z_target.shape:
        raise ValueError(
            f"p and z_target must have the same (V, N, D) shape, got {tuple(p.shape)} "
            f"and {tuple(z_target.shape)}"
        )
    with no_autocast(p):
        dtype = compute_dtype(p, z_target)
        p = F.normalize(p.to(dtype), dim=-1)
        t = F.normalize(z_target.detach().to(dtype), dim=-1)
        cos = torch.einsum("ind,jnd->ij", p, t) / p.shape[1]  # (V, V): batch-mean cosine
        off = ~torch.eye(V, dtype=torch.bool, device=p.device)
        return (2 - 2 * cos)[off].sum() / (V - 1)
