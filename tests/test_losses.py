"""Tests for ssl_lab.losses against independent references.

The references below are written from the papers' formulas with explicit Python loops over
anchors, pairs, samples and dimensions on Python floats (float64); they share no code with the
vectorised losses. Losses run in float32 and must match to float32 precision.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.losses import (
    barlow_twins,
    byol,
    multiview_barlow,
    multiview_vicreg,
    simclr,
    supcon,
    vicreg,
)
from ssl_lab.losses.contrastive import _sample_negatives

SHAPES = [(2, 4, 3), (3, 5, 4), (4, 3, 5), (2, 7, 2)]
RTOL, ATOL = 1e-5, 1e-6


def rand(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    assert isinstance(actual, torch.Tensor) and actual.ndim == 0
    assert math.isclose(actual.item(), expected, rel_tol=rtol, abs_tol=atol), (
        actual.item(),
        expected,
    )


# ----------------------------------------------------------------------------------------------
# Pure-Python references (float64), one per paper formula.
# ----------------------------------------------------------------------------------------------
def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _unit(a):
    n = math.sqrt(_dot(a, a))
    return [x / n for x in a]


def _column(rows, i):
    return [r[i] for r in rows]


def _standardised(rows, eps=1e-5):
    """Per-dimension (x - mean)/sqrt(biased var + eps) over the rows (BatchNorm1d, train)."""
    n, d = len(rows), len(rows[0])
    out = [[0.0] * d for _ in range(n)]
    for i in range(d):
        col = _column(rows, i)
        m = sum(col) / n
        var = sum((x - m) ** 2 for x in col) / n
        for b in range(n):
            out[b][i] = (rows[b][i] - m) / math.sqrt(var + eps)
    return out


def ref_outside(z, labels, tau, keep=None):
    """SupCon L_out over the V*N rows (row r = v*N + n); keep[i][a] restricts the denominator."""
    V, N = len(z), len(z[0])
    e = [_unit(z[v][n]) for v in range(V) for n in range(N)]
    lab = [labels[n] for v in range(V) for n in range(N)]
    M = V * N
    total = 0.0
    for i in range(M):
        denom = sum(
            math.exp(_dot(e[i], e[a]) / tau)
            for a in range(M)
            if a != i and (keep is None or keep[i][a])
        )
        positives = [p for p in range(M) if p != i and lab[p] == lab[i]]
        total += -sum(math.log(math.exp(_dot(e[i], e[p]) / tau) / denom) for p in positives) / len(
            positives
        )
    return total / M


def ref_simclr(z, tau, keep=None):
    return ref_outside(z, list(range(len(z[0]))), tau, keep)


def ref_keep_from_draw(V, N, k, seed):
    """The documented sampling contract: per anchor row, the k candidates (rows of other
    samples) with the largest torch.rand(M, M, generator=seed) scores, plus its positives."""
    M = V * N
    scores = torch.rand(M, M, generator=torch.Generator().manual_seed(seed)).tolist()
    sample = [n for v in range(V) for n in range(N)]
    keep = []
    for i in range(M):
        cands = [a for a in range(M) if sample[a] != sample[i]]
        chosen = set(sorted(cands, key=lambda a: -scores[i][a])[:k])
        keep.append([a != i and (sample[a] == sample[i] or a in chosen) for a in range(M)])
    return keep


def ref_barlow_pair(x, y, lambd):
    xs, ys = _standardised(x), _standardised(y)
    N, D = len(x), len(x[0])
    loss = 0.0
    for i in range(D):
        for j in range(D):
            c = sum(xs[b][i] * ys[b][j] for b in range(N)) / N
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def _ref_vicreg_view_terms(x):
    """(mean_i relu(1 - sqrt(var_i + 1e-4)), Σ_{i≠j} cov_ij² / D) for one view."""
    N, D = len(x), len(x[0])
    means = [sum(_column(x, i)) / N for i in range(D)]
    xc = [[x[b][i] - means[i] for i in range(D)] for b in range(N)]
    std = 0.0
    for i in range(D):
        var = sum(xc[b][i] ** 2 for b in range(N)) / (N - 1)
        std += max(0.0, 1 - math.sqrt(var + 1e-4)) / D
    cov = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                cov += (sum(xc[b][i] * xc[b][j] for b in range(N)) / (N - 1)) ** 2 / D
    return std, cov


def _mse(x, y):
    N, D = len(x), len(x[0])
    return sum((x[b][i] - y[b][i]) ** 2 for b in range(N) for i in range(D)) / (N * D)


def ref_vicreg_pair(x, y, s, v, c):
    std_x, cov_x = _ref_vicreg_view_terms(x)
    std_y, cov_y = _ref_vicreg_view_terms(y)
    return s * _mse(x, y) + v * (std_x / 2 + std_y / 2) + c * (cov_x + cov_y)


def ref_mean_over_pairs(z, pair_loss):
    pairs = list(itertools.combinations(range(len(z)), 2))
    return sum(pair_loss(z[a], z[b]) for a, b in pairs) / len(pairs)


def ref_byol(p, t):
    V, N = len(p), len(p[0])
    total = 0.0
    for i in range(V):
        for j in range(V):
            if i != j:
                total += sum(2 - 2 * _dot(_unit(p[i][n]), _unit(t[j][n])) for n in range(N)) / N
    return total / (V - 1)


def ref_multiview_barlow(z, beta):
    V, N, D = len(z), len(z[0]), len(z[0][0])
    flat = _standardised([z[a][b] for a in range(V) for b in range(N)])
    zs = [flat[a * N : (a + 1) * N] for a in range(V)]
    zbar = [[sum(zs[a][b][i] for a in range(V)) / V for i in range(D)] for b in range(N)]
    inv = 0.0
    for a in range(V):
        for i in range(D):
            inv += (sum(zs[a][b][i] * zbar[b][i] for b in range(N)) / N - 1) ** 2 / V
    off = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                off += (sum(zbar[b][i] * zbar[b][j] for b in range(N)) / N) ** 2
    return inv + beta * off


def ref_multiview_vicreg(z, s, v, c):
    V, N, D = len(z), len(z[0]), len(z[0][0])
    inv = std = cov = 0.0
    for a in range(V):
        others = [
            [sum(z[o][b][i] for o in range(V) if o != a) / (V - 1) for i in range(D)]
            for b in range(N)
        ]
        inv += _mse(z[a], others) / V
        std_a, cov_a = _ref_vicreg_view_terms(z[a])
        std += std_a / V
        cov += 2 * cov_a / V
    return s * inv + v * std + c * cov


# ----------------------------------------------------------------------------------------------
# Transcriptions of the authors' code (torch, float64).
# ----------------------------------------------------------------------------------------------
def classic_ntxent(z1, z2, tau):
    """SimCLR NT-Xent with the usual 2N x 2N mask and cross-entropy over logits."""
    n = z1.shape[0]
    out = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (out @ out.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n) + n, torch.arange(n)])
    return F.cross_entropy(sim, targets)


def _authors_off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def main_vicreg_forward(x, y, batch_size, num_features, sim=25.0, std=25.0, cov=1.0):
    """facebookresearch/vicreg main_vicreg.py, VICReg.forward after the projector."""
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss_x = _authors_off_diagonal(cov_x).pow_(2).sum().div(num_features)
    cov_loss = cov_loss_x + _authors_off_diagonal(cov_y).pow_(2).sum().div(num_features)
    return sim * repr_loss + std * std_loss + cov * cov_loss


def barlowtwins_forward(z1, z2, lambd):
    """facebookresearch/barlowtwins main.py, BarlowTwins.forward after the projector."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2)
    c.div_(z1.shape[0])
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = _authors_off_diagonal(c).pow_(2).sum()
    return on_diag + lambd * off_diag


# ----------------------------------------------------------------------------------------------
# Agreement with the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_simclr_matches_reference(shape, tau):
    z = rand(shape, seed=1)
    close(simclr(z, temperature=tau), ref_simclr(z.double().tolist(), tau))


@pytest.mark.parametrize("tau", [0.15, 0.5])
def test_simclr_two_views_is_classic_ntxent(tau):
    z = rand((2, 6, 5), seed=2)
    expected = classic_ntxent(z[0].double(), z[1].double(), tau).item()
    close(simclr(z, temperature=tau), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_supcon_matches_reference(shape):
    z = rand(shape, seed=3)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0][: shape[1]])
    close(supcon(z, labels), ref_outside(z.double().tolist(), labels.tolist(), 0.1))
    close(supcon(z, labels, 0.5), ref_outside(z.double().tolist(), labels.tolist(), 0.5))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_with_distinct_labels_equals_simclr(shape, tau):
    z = rand(shape, seed=4)
    labels = torch.randperm(shape[1]) * 7  # distinct, not 0..N-1
    torch.testing.assert_close(supcon(z, labels, tau), simclr(z, tau), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_vicreg_matches_reference(shape):
    z = rand(shape, seed=5) * 0.7  # some dimensions under the std hinge, some over
    zl = z.double().tolist()
    for w in [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)]:
        expected = ref_mean_over_pairs(zl, lambda x, y, w=w: ref_vicreg_pair(x, y, *w))
        close(vicreg(z, *w), expected)


@pytest.mark.parametrize("n,d", [(4, 3), (8, 6), (16, 5)])
def test_vicreg_two_views_is_main_vicreg(n, d):
    z = rand((2, n, d), seed=6) * 0.8
    expected = main_vicreg_forward(z[0].double(), z[1].double(), n, d).item()
    close(vicreg(z), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_barlow_matches_reference(shape, lambd):
    z = rand(shape, seed=7)
    expected = ref_mean_over_pairs(z.double().tolist(), lambda x, y: ref_barlow_pair(x, y, lambd))
    close(barlow_twins(z, lambd), expected)


def test_barlow_two_views_is_authors_batchnorm_code():
    z = rand((2, 9, 6), seed=8) * 3 + 1
    close(barlow_twins(z), barlowtwins_forward(z[0].double(), z[1].double(), 0.0051).item())


@pytest.mark.parametrize("shape", SHAPES)
def test_byol_matches_reference(shape):
    p, t = rand(shape, seed=9), rand(shape, seed=10)
    close(byol(p, t), ref_byol(p.double().tolist(), t.double().tolist()))


def test_byol_two_views_is_symmetrised_grill_loss():
    p, t = rand((2, 5, 4), seed=11), rand((2, 5, 4), seed=12)

    def regression(x, y):  # BYOL's loss_fn, mean over the batch
        return (2 - 2 * (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1)).mean()

    expected = regression(p[0].double(), t[1].double()) + regression(p[1].double(), t[0].double())
    close(byol(p, t), expected.item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0051, 0.3])
def test_multiview_barlow_matches_reference(shape, beta):
    z = rand(shape, seed=13) * 2 - 0.5
    close(multiview_barlow(z, beta), ref_multiview_barlow(z.double().tolist(), beta))


@pytest.mark.parametrize("shape", SHAPES)
def test_multiview_vicreg_matches_reference(shape):
    z = rand(shape, seed=14) * 0.7
    for w in [(25.0, 25.0, 1.0), (1.0, 2.0, 3.0)]:
        close(multiview_vicreg(z, *w), ref_multiview_vicreg(z.double().tolist(), *w))


# ----------------------------------------------------------------------------------------------
# Multi-view vs pairwise relations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [2, 3, 4])
def test_multiview_vicreg_relation_to_vicreg(V):
    z = rand((V, 6, 4), seed=15, dtype=torch.float64) * 0.7
    # variance and covariance terms are identical ...
    torch.testing.assert_close(multiview_vicreg(z, 0.0, 2.0, 3.0), vicreg(z, 0.0, 2.0, 3.0))
    # ... and the mean-of-others invariance is the pairwise one scaled by V / (2(V-1)).
    scale = V / (2 * (V - 1))
    torch.testing.assert_close(multiview_vicreg(z, 1.0, 0.0, 0.0), scale * vicreg(z, 1.0, 0.0, 0.0))
    if V == 2:
        torch.testing.assert_close(multiview_vicreg(z), vicreg(z))


def _standardise_each_view(z):
    return (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, unbiased=False, keepdim=True)


def test_multiview_barlow_relation_to_barlow_at_two_views():
    eps = 1e-5
    z = _standardise_each_view(rand((2, 8, 5), seed=16, dtype=torch.float64))
    # Views already standardised on their own: joint and per-view standardisation coincide,
    # and the invariance term is (1/4)·Σ_i (1 - c_ii + ε/(1+ε))² with c Barlow's matrix.
    zs = z / math.sqrt(1 + eps)
    c = zs[0].T @ zs[1] / z.shape[1]
    expected = 0.25 * (1 - c.diagonal() + eps / (1 + eps)).pow(2).sum()
    torch.testing.assert_close(multiview_barlow(z, beta=0.0), expected)
    approx = barlow_twins(z, 0.0) / 4  # ε → 0: a quarter of Barlow's on-diagonal term
    torch.testing.assert_close(multiview_barlow(z, 0.0), approx, rtol=1e-4, atol=0)
    # In general (views not standardised, off-diagonal on): different losses.
    z = rand((2, 8, 5), seed=17) * 2 + 1
    assert not torch.isclose(multiview_barlow(z), barlow_twins(z), rtol=0.1)


@pytest.mark.parametrize("views", [2, 3])
def test_multiview_barlow_method_switches_to_barlow_at_two_views(views):
    """The method follows the authors' code: 2 views train plain Barlow Twins with β as λ, more
    views the mean-embedding form; β is the effective (here 1/d-scaled) one either way."""
    from ssl_lab.config import MethodConfig
    from ssl_lab.methods import get_method

    z = rand((views, 8, 4), seed=30 + views)
    mc = MethodConfig(name="multiview_barlow", beta=0.08, beta_scaling="inverse_dim",
                      beta_ref_dim=2)
    loss = get_method("multiview_barlow").loss({"z": z}, None, mc, None)
    beta = 0.08 * 2 / 4
    zl = z.double().tolist()
    expected = ref_barlow_pair(zl[0], zl[1], beta) if views == 2 else ref_multiview_barlow(zl, beta)
    close(loss, expected)


# ----------------------------------------------------------------------------------------------
# k sampled negatives
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [2, 3])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_negatives_closed_form(V, k):
    # Every view of sample n is the unit vector e_n: positives have s = 1/τ, every negative
    # s = 0, so each anchor's loss is -log(e^{1/τ} / ((V-1)·e^{1/τ} + k)) whichever negatives are
    # drawn. Any other number of negatives in the denominator changes the value.
    N, tau = 6, 0.5
    z = torch.eye(N).expand(V, N, N).clone()
    expected = -math.log(math.exp(1 / tau) / ((V - 1) * math.exp(1 / tau) + k))
    g = torch.Generator().manual_seed(0)
    close(simclr(z, temperature=tau, negatives=k, generator=g), expected)


@pytest.mark.parametrize("shape", [(2, 5, 3), (3, 4, 4)])
@pytest.mark.parametrize("k", [1, 3])
def test_k_negatives_match_reference_with_same_draw(shape, k):
    V, N, _ = shape
    z = rand(shape, seed=18)
    keep = ref_keep_from_draw(V, N, k, seed=123)
    out = simclr(z, 0.2, negatives=k, generator=torch.Generator().manual_seed(123))
    close(out, ref_simclr(z.double().tolist(), 0.2, keep))


def test_k_negatives_reproducible_and_seed_dependent():
    z = rand((2, 8, 4), seed=19)

    def run(seed):
        return simclr(z, negatives=1, generator=torch.Generator().manual_seed(seed)).item()

    assert run(5) == run(5)
    assert len({run(s) for s in range(6)}) > 1


@pytest.mark.parametrize("V", [2, 3])
def test_k_equal_to_all_available_is_all(V):
    N = 5
    z = rand((V, N, 4), seed=20)
    out = simclr(z, negatives=V * (N - 1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, simclr(z), rtol=1e-6, atol=1e-6)


def test_sampled_negatives_are_k_uniform_candidates():
    rows, k = 6000, 2
    cand = torch.tensor([True, False, True, True, False, True, True, False]).expand(rows, 8)
    mask = _sample_negatives(cand.clone(), k, torch.Generator().manual_seed(0))
    assert (mask.sum(1) == k).all() and not (mask & ~cand).any()
    freq = mask.float().mean(0)[cand[0]]  # each of the 5 candidates: k/5 = 0.4
    torch.testing.assert_close(freq, torch.full_like(freq, k / 5), rtol=0, atol=0.03)


# ----------------------------------------------------------------------------------------------
# Invariances, gradients, dtypes
# ----------------------------------------------------------------------------------------------
LABELS = torch.tensor([0, 1, 1, 0, 2, 1])

VIEW_LOSSES = {
    "simclr": lambda z: simclr(z),
    "simclr_t0.1": lambda z: simclr(z, temperature=0.1),
    "supcon": lambda z: supcon(z, LABELS[: z.shape[1]]),
    "vicreg": lambda z: vicreg(z),
    "barlow": lambda z: barlow_twins(z),
    "mv_barlow": lambda z: multiview_barlow(z),
    "mv_vicreg": lambda z: multiview_vicreg(z),
    "byol": lambda z: byol(z, z.roll(1, dims=-1)),  # targets tied to z, view by view
}


@pytest.mark.parametrize("name", VIEW_LOSSES)
@pytest.mark.parametrize("V", [2, 3, 4])
def test_view_permutation_invariance(name, V):
    z = rand((V, 6, 5), seed=21)
    loss = VIEW_LOSSES[name]
    for perm in itertools.permutations(range(V)):
        torch.testing.assert_close(loss(z[list(perm)]), loss(z), rtol=1e-5, atol=1e-6)


def test_byol_is_symmetric_in_joint_view_swap_only():
    p, t = rand((3, 6, 5), seed=22), rand((3, 6, 5), seed=23)
    perm = [2, 0, 1]
    torch.testing.assert_close(byol(p[perm], t[perm]), byol(p, t), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("V", [2, 3])
def test_sample_order_invariance(V):
    N = 6
    z, t = rand((V, N, 5), seed=24), rand((V, N, 5), seed=25)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    pairs = [
        (simclr(z), simclr(z[:, perm])),
        (supcon(z, LABELS), supcon(z[:, perm], LABELS[perm])),
        (vicreg(z), vicreg(z[:, perm])),
        (barlow_twins(z), barlow_twins(z[:, perm])),
        (multiview_barlow(z), multiview_barlow(z[:, perm])),
        (multiview_vicreg(z), multiview_vicreg(z[:, perm])),
        (byol(z, t), byol(z[:, perm], t[:, perm])),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


GRAD_LOSSES = {
    "simclr": lambda z: simclr(z, temperature=0.3),
    "simclr_k1": lambda z: simclr(z, negatives=1, generator=torch.Generator().manual_seed(0)),
    "supcon": lambda z: supcon(z, LABELS[: z.shape[1]], 0.3),
    "vicreg": lambda z: vicreg(z),
    "barlow": lambda z: barlow_twins(z, 0.3),
    "mv_barlow": lambda z: multiview_barlow(z, 0.3),
    "mv_vicreg": lambda z: multiview_vicreg(z),
}


@pytest.mark.parametrize("name", GRAD_LOSSES)
@pytest.mark.parametrize("shape", [(2, 4, 3), (3, 3, 2)])
def test_gradcheck(name, shape):
    z = rand(shape, seed=26, dtype=torch.float64).mul(0.8).requires_grad_()
    assert torch.autograd.gradcheck(GRAD_LOSSES[name], (z,))


def test_byol_gradcheck_and_stop_gradient():
    p = rand((3, 4, 3), seed=27, dtype=torch.float64).requires_grad_()
    t = rand((3, 4, 3), seed=28, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: byol(x, t), (p,))
    byol(p, t).backward()
    assert t.grad is None and p.grad is not None


ALL_LOSSES = {**VIEW_LOSSES, "simclr_k2": GRAD_LOSSES["simclr_k1"]}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_float32_under_bf16_autocast(name):
    zb = rand((3, 6, 8), seed=29).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ALL_LOSSES[name](zb)
    assert out.dtype == torch.float32 and out.ndim == 0 and torch.isfinite(out)
    # Same value as float32 compute on the same (bf16-rounded) numbers: nothing ran in bf16.
    torch.testing.assert_close(out, ALL_LOSSES[name](zb.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_returns_0dim_float32(name):
    out = ALL_LOSSES[name](rand((2, 5, 4), seed=30))
    assert out.dtype == torch.float32 and out.shape == ()


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
Z_FUNCS = [simclr, vicreg, barlow_twins, multiview_barlow, multiview_vicreg]


@pytest.mark.parametrize(
    "fn", Z_FUNCS + [lambda z: supcon(z, torch.zeros(z.shape[1])), lambda z: byol(z, z)]
)
@pytest.mark.parametrize("shape", [(6, 4), (1, 6, 4), (2, 1, 4), (2, 3, 4, 5)])
def test_bad_shapes_raise(fn, shape):
    with pytest.raises(ValueError, match="shape|views|samples"):
        fn(torch.randn(shape))


def test_bad_arguments_raise():
    z = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="labels"):
        supcon(z, torch.zeros(5))
    with pytest.raises(ValueError, match="labels"):
        supcon(z, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="same"):
        byol(z, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="views"):
        byol(torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="only 6 negatives"):
        simclr(z, negatives=7)  # V * (N - 1) = 6 available
    for bad in (0, -1, True, 1.5, "some"):
        with pytest.raises(ValueError, match="negatives"):
            simclr(z, negatives=bad)
    with pytest.raises(ValueError, match="temperature"):
        simclr(z, temperature=0.0)


# ----------------------------------------------------------------------------------------------
# SimSiam, MoCo v3, DINO: references from the papers' pseudo-code (explicit loops, float64),
# transcriptions of the authors' code, and properties.
# ----------------------------------------------------------------------------------------------
from ssl_lab.losses import dino, mocov3, simsiam  # noqa: E402


def _cos(a, b):
    return _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b))


def _log_softmax(row, tau):
    scaled = [x / tau for x in row]
    top = max(scaled)
    lse = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - lse for x in scaled]


def ref_simsiam(p, z):
    """SimSiam Algorithm 1, D(p, z) = -cos(p, z) batch-averaged, over the ordered view pairs."""
    V, N = len(p), len(p[0])
    pairs = [(i, j) for i in range(V) for j in range(V) if i != j]
    return sum(sum(-_cos(p[i][n], z[j][n]) for n in range(N)) / N for i, j in pairs) / len(pairs)


def ref_mocov3(q, k, tau):
    """MoCo v3 Algorithm 1: ctr(q, k) = CE(q·kᵀ/τ on unit vectors, labels = arange N) · 2τ."""
    V, N = len(q), len(q[0])

    def ctr(a, b):
        ce = 0.0
        for n in range(N):
            logits = [_cos(a[n], b[m]) / tau for m in range(N)]
            ce -= _log_softmax(logits, 1.0)[n]
        return ce / N * 2 * tau

    return sum(ctr(q[i], k[j]) for i in range(V) for j in range(V) if i != j) / (V - 1)


def ref_dino(student, teacher, center, ts, tt):
    """DINO Algorithm 1 with multi-crop: H(t, s) = -Σ_k softmax((t - c)/τt)_k log softmax(s/τs)_k,
    averaged over the batch and over every (teacher crop, other student crop) pair."""
    Vs, Vt, N = len(student), len(teacher), len(student[0])
    total, terms = 0.0, 0
    for t in range(Vt):
        for s in range(Vs):
            if s == t:
                continue
            h = 0.0
            for n in range(N):
                q = [math.exp(x) for x in _log_softmax(
                    [a - c for a, c in zip(teacher[t][n], center, strict=True)], tt)]
                h -= _dot(q, _log_softmax(student[s][n], ts))
            total += h / N
            terms += 1
    return total / terms


@pytest.mark.parametrize("shape", SHAPES)
def test_simsiam_matches_reference(shape):
    p, z = rand(shape, seed=40), rand(shape, seed=41)
    close(simsiam(p, z), ref_simsiam(p.double().tolist(), z.double().tolist()))


def test_simsiam_two_views_is_the_papers_symmetric_form():
    p, z = rand((2, 6, 5), seed=42), rand((2, 6, 5), seed=43)
    crit = nn.CosineSimilarity(dim=1)  # main_simsiam.py's criterion
    p1, p2, z1, z2 = p[0].double(), p[1].double(), z[0].double(), z[1].double()
    expected = -(crit(p1, z2).mean() + crit(p2, z1).mean()) * 0.5
    close(simsiam(p, z), expected.item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_mocov3_matches_reference(shape, tau):
    q, k = rand(shape, seed=44), rand(shape, seed=45)
    close(mocov3(q, k, tau), ref_mocov3(q.double().tolist(), k.double().tolist(), tau))


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_mocov3_two_views_is_the_authors_two_term_form(tau):
    """moco/builder.py: ctr_loss(q1, k2) + ctr_loss(q2, k1), CrossEntropyLoss × 2τ."""
    q, k = rand((2, 7, 5), seed=46), rand((2, 7, 5), seed=47)

    def ctr_loss(a, b):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        logits = torch.einsum("nc,mc->nm", [a, b]) / tau
        return nn.CrossEntropyLoss()(logits, torch.arange(a.shape[0])) * (2 * tau)

    q1, q2, k1, k2 = q[0].double(), q[1].double(), k[0].double(), k[1].double()
    close(mocov3(q, k, tau), (ctr_loss(q1, k2) + ctr_loss(q2, k1)).item())


DINO_SHAPES = [(2, 2, 4, 6), (3, 3, 3, 5), (6, 2, 4, 7), (4, 1, 3, 4)]  # (Vs, Vt, N, K)


@pytest.mark.parametrize("vs,vt,n,k", DINO_SHAPES)
@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.5, 0.3)])
def test_dino_matches_reference(vs, vt, n, k, ts, tt):
    s, t, c = rand((vs, n, k), seed=48), rand((vt, n, k), seed=49), rand((k,), seed=50) * 0.3
    expected = ref_dino(s.double().tolist(), t.double().tolist(), c.double().tolist(), ts, tt)
    close(dino(s, t, c, ts, tt), expected)


def test_dino_multi_crop_is_the_authors_dino_loss():
    """main_dino.py DINOLoss.forward (chunks of the crop-major batch), 2 global + 4 local crops."""
    s, t, c = rand((6, 5, 8), seed=51), rand((2, 5, 8), seed=52), rand((8,), seed=53)
    student_out = (s.double().flatten(0, 1) / 0.1).chunk(6)
    teacher_out = F.softmax((t.double().flatten(0, 1) - c.double()[None]) / 0.04, dim=-1).chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    assert n_loss_terms == 2 * 6 - 2
    close(dino(s, t, c), (total_loss / n_loss_terms).item())


def test_dino_with_a_uniform_teacher_is_the_students_mean_entropy_term():
    """Constant teacher rows give q = 1/K: each pair's term is -(1/K) Σ_k log p_s,k."""
    s, c = rand((5, 4, 6), seed=54), rand((6,), seed=55)
    t = c.expand(2, 4, 6) + 3.0  # teacher - center is constant along K
    log_p = F.log_softmax(s.double() / 0.1, dim=-1)
    per_crop = -log_p.mean(dim=-1).mean(dim=-1)  # (Vs,): batch mean of -(1/K) Σ_k log p
    expected = sum(per_crop[j] for i in range(2) for j in range(5) if j != i) / (2 * 5 - 2)
    close(dino(s, t, c), expected.item())


def test_new_losses_send_no_gradient_to_their_targets():
    p = rand((3, 4, 3), seed=56, dtype=torch.float64).requires_grad_()
    z = rand((3, 4, 3), seed=57, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: simsiam(x, z), (p,))
    assert torch.autograd.gradcheck(lambda x: mocov3(x, z, 0.3), (p,))
    for loss in (simsiam(p, z), mocov3(p, z)):
        loss.backward()
        assert z.grad is None and p.grad is not None
    s = rand((4, 3, 5), seed=58, dtype=torch.float64).requires_grad_()
    t = rand((2, 3, 5), seed=59, dtype=torch.float64).requires_grad_()
    c = rand((5,), seed=60, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: dino(x, t, c, 0.3, 0.2), (s,))
    dino(s, t, c).backward()
    assert t.grad is None and c.grad is None and s.grad is not None


NEW_LOSSES = {
    "simsiam": lambda z: simsiam(z, z.roll(1, dims=-1)),
    "mocov3": lambda z: mocov3(z, z.roll(1, dims=-1)),
    "dino": lambda z: dino(z, z[:2].roll(1, dims=-1), z[0, 0]),
}


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_losses_are_float32_0dim_under_bf16_autocast(name):
    zb = rand((3, 6, 8), seed=61).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NEW_LOSSES[name](zb)
    assert out.dtype == torch.float32 and out.shape == () and torch.isfinite(out)
    torch.testing.assert_close(out, NEW_LOSSES[name](zb.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("V", [2, 3])
def test_new_losses_sample_order_invariance(V):
    z, t = rand((V, 6, 5), seed=62), rand((V, 6, 5), seed=63)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    c = rand((5,), seed=64)
    pairs = [(simsiam(z, t), simsiam(z[:, perm], t[:, perm])),
             (mocov3(z, t), mocov3(z[:, perm], t[:, perm])),
             (dino(z, t[:1], c), dino(z[:, perm], t[:1, perm], c))]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_new_losses_bad_inputs_raise():
    z = torch.randn(2, 4, 3)
    for fn in (simsiam, mocov3):
        with pytest.raises(ValueError, match="same"):
            fn(z, torch.randn(2, 4, 5))
        with pytest.raises(ValueError, match="views"):
            fn(torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="temperature"):
        mocov3(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="teacher"):
        dino(z, torch.randn(3, 4, 3), torch.zeros(3))  # more teacher crops than student crops
    with pytest.raises(ValueError, match="teacher"):
        dino(z, torch.randn(1, 5, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="center"):
        dino(z, z[:1], torch.zeros(1, 3))
    with pytest.raises(ValueError, match="teacher_temp"):
        dino(z, z[:1], torch.zeros(3), teacher_temp=0.0)


def test_dino_takes_the_teacher_temperature_as_a_0dim_tensor():
    """What ssl_lab.methods passes (a buffer, so torch.compile does not recompile per value)."""
    s, t, c = rand((4, 5, 6), seed=65), rand((2, 5, 6), seed=66), rand((6,), seed=67)
    torch.testing.assert_close(dino(s, t, c, 0.1, torch.tensor(0.05)), dino(s, t, c, 0.1, 0.05),
                               rtol=0, atol=0)
