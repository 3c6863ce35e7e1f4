"""Redundancy-reduction losses: Barlow Twins, VICReg, and the multi-view (mean-embedding) forms
of Ghosh et al. 2024 (NeurIPS, arXiv 2312.10725). All take z (V, N, D) and return a 0-dim tensor computed in
float32 (float64 inputs stay float64) with autocast off.
"""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor

from ._common import check_views, compute_dtype, no_autocast, off_diagonal

BN_EPS = 1e-5  # BatchNorm1d's default eps: Barlow Twins normalises with BatchNorm1d(affine=False)
VICREG_EPS = 1e-4  # main_vicreg.py: std = sqrt(var + 0.0001)


def _standardise(x: Tensor) -> Tensor:
    """Per-dimension (x - mean) / sqrt(biased var + 1e-5) over dim 0 (BatchNorm1d, training)."""
    return (x - x.mean(dim=0)) / (x.var(dim=0, unbiased=False) + BN_EPS).sqrt()


def _barlow_pair(a: Tensor, b: Tensor, lambd: float) -> Tensor:
    """Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij², c = aᵀb / N, a and b already standardised."""
    c = a.T @ b / a.shape[0]
    return (c.diagonal() - 1).pow(2).sum() + lambd * off_diagonal(c).pow(2).sum()


def barlow_twins(z: Tensor, lambd: float = 0.0051) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021) on z (V, N, D).

    V = 2: each view is standardised per dimension over the batch with BIASED variance and
    eps 1e-5 inside the sqrt (= BatchNorm1d(affine=False) in training mode), c = z1ᵀz2 / N,
        L = Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij².
    V > 2: mean of the two-view loss over the V(V-1)/2 unordered view pairs (the loss is
    symmetric in its two views, so ordered pairs would give the same mean).
    """
    V, _, _ = check_views(z)
    with no_autocast(z):
        zs = [_standardise(v) for v in z.to(compute_dtype(z))]  # each view once, reused by pairs
        pairs = list(itertools.combinations(range(V), 2))
        # A Python loop over pairs (V is small) keeps memory at one D×D matrix at a time.
        return sum(_barlow_pair(zs[a], zs[b], lambd) for a, b in pairs) / len(pairs)


def _variance_term(x: Tensor) -> Tensor:
    """mean_i relu(1 - sqrt(unbiased var_i + 1e-4)) of one view (N, D)."""
    return F.relu(1 - (x.var(dim=0) + VICREG_EPS).sqrt()).mean()


def _covariance_term(x: Tensor) -> Tensor:
    """Σ_{i≠j} cov_ij² / D with cov = x̃ᵀx̃ / (N-1), x̃ centred, for one view (N, D)."""
    n, d = x.shape
    x = x - x.mean(dim=0)
    return off_diagonal(x.T @ x / (n - 1)).pow(2).sum() / d


def vicreg(
    z: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
) -> Tensor:
    """VICReg (Bardes et al. 2022) on z (V, N, D), as in the authors' main_vicreg.py.

    V = 2 (x, y): repr = mse(x, y); std_v = sqrt(unbiased var_v + 1e-4) per dimension;
    std = mean(relu(1 - std_x))/2 + mean(relu(1 - std_y))/2; cov_v = x̃ᵀx̃/(N-1) (x̃ centred);
    cov = Σ_{i≠j} cov_x,ij²/D + Σ_{i≠j} cov_y,ij²/D;
        L = sim_weight·repr + var_weight·std + cov_weight·cov.
    V > 2: mean of the two-view loss over the V(V-1)/2 unordered view pairs. Each view sits in
    V-1 pairs, so that mean is computed exactly (no per-pair recomputation) as
        sim·mean_{a<b} mse(z_a, z_b) + var·(1/V)Σ_a std_a + cov·(2/V)Σ_a cov_a.
    """
    V, _, _ = check_views(z)
    with no_autocast(z):
        z = z.to(compute_dtype(z))
        pairs = list(itertools.combinations(range(V), 2))
        inv = sum(F.mse_loss(z[a], z[b]) for a, b in pairs) / len(pairs)
        std = sum(_variance_term(v) for v in z) / V
        cov = 2 * sum(_covariance_term(v) for v in z) / V
        return sim_weight * inv + var_weight * std + cov_weight * cov


def multiview_barlow(z: Tensor, beta: float = 0.0051) -> Tensor:
    """Multi-view Barlow Twins with the mean embedding (Ghosh et al. 2024, the fastssl code).

    Standardise per dimension over ALL V·N rows together (biased var, eps 1e-5), z̄ = mean over
    views (N, D):
        L = (1/V)·Σ_a Σ_i (mean_b z_a[b,i]·z̄[b,i] − 1)² + β·Σ_{i≠j} (z̄ᵀz̄/N)²_ij.
    The formula is used for every V, V = 2 included; the authors' code switches to plain
    Barlow Twins at 2 views, and so does the `multiview_barlow` method (methods.py), which
    calls barlow_twins there. At V = 2 this function differs from barlow_twins
    in three ways: (1) the views are standardised jointly, not each on its own; (2) the
    invariance term compares each view with the mean z̄ = (z_1+z_2)/2, not with the other view:
    when each view is already standardised on its own, it equals
    (1/4)·Σ_i (1 − c_ii + ε/(1+ε))² with c the Barlow cross-correlation (ε = 1e-5), i.e.
    ≈ 1/4 of Barlow's on-diagonal term; (3) the redundancy term penalises the off-diagonal of
    z̄ᵀz̄/N = (A + B + C + Cᵀ)/4 (A, B within-view correlations, C the cross-correlation) instead
    of C alone.
    """
    V, N, D = check_views(z)
    with no_autocast(z):
        zs = _standardise(z.to(compute_dtype(z)).reshape(V * N, D)).reshape(V, N, D)
        zbar = zs.mean(dim=0)
        inv = ((zs * zbar).mean(dim=1) - 1).pow(2).sum(dim=1).mean()  # (V, D) -> Σ_i -> mean_a
        return inv + beta * off_diagonal(zbar.T @ zbar / N).pow(2).sum()


def multiview_vicreg(
    z: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
) -> Tensor:
    """Multi-view VICReg, each view against the mean of the others (Ghosh et al. 2024, §6).

    On the raw embeddings (no standardisation: it would make the variance hinge meaningless),
    with m_{-a} = mean of the views other than a and std_a, cov_a VICReg's per-view terms:
        inv = (1/V)·Σ_a mse(z_a, m_{-a})
        std = (1/V)·Σ_a mean_i relu(1 − sqrt(unbiased var_a,i + 1e-4))
        cov = (2/V)·Σ_a Σ_{i≠j} cov_a,ij² / D      (cov_a = z̃_aᵀz̃_a/(N−1), z̃_a centred)
        L = sim_weight·inv + var_weight·std + cov_weight·cov.
    The covariance is summed-then-averaged as 2 × the mean over views so that its scale is
    VICReg's (which adds the two views' terms), keeping the 25/25/1 weights meaningful.
    Relation to vicreg (exact, any V): since z_a − m_{-a} = V/(V−1)·(z_a − z̄),
    inv = V/(2(V−1)) · mean_{a<b} mse(z_a, z_b); std and cov equal vicreg's. Hence
    multiview_vicreg == vicreg at V = 2, and for V > 2 it is vicreg with the invariance weight
    scaled by V/(2(V−1)) (3/4 at V = 3, 2/3 at V = 4).
    """
    V, _, _ = check_views(z)
    with no_autocast(z):
        z = z.to(compute_dtype(z))
        others = (z.sum(dim=0, keepdim=True) - z) / (V - 1)  # (V, N, D): m_{-a} for each a
        inv = F.mse_loss(z, others)  # mean over (a, n, d) = (1/V)·Σ_a mse(z_a, m_{-a})
        std = sum(_variance_term(v) for v in z) / V
        cov = 2 * sum(_covariance_term(v) for v in z) / V
        return sim_weight * inv + var_weight * std + cov_weight * cov
