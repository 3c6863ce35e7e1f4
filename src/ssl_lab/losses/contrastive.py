"""Contrastive losses: SimCLR's NT-Xent (any number of views, optional k sampled negatives)
and supervised contrastive (SupCon), both the SupCon "outside" average of log-softmaxes; and
MoCo v3's query-vs-key cross-entropy (queries and keys from two different networks).

Layout convention: z (V, N, D) is flattened to M = V*N rows, row r = v*N + n (view-major), so
for V = 2 the rows are cat([z[0], z[1]]) as in SimCLR's reference code.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_views, compute_dtype, no_autocast


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _cosine_logits(z: Tensor, temperature: float) -> Tensor:
    """(M, M) cosine similarities / temperature of the flattened, L2-normalised embeddings."""
    V, N, _ = z.shape
    zf = F.normalize(z.to(compute_dtype(z)).reshape(V * N, -1), dim=1)
    return zf @ zf.T / temperature


def _outside_loss(logits: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
    """mean_i  -(1/|P(i)|) Σ_{p∈P(i)} log( exp(l_ip) / Σ_{a∈keep(i)} exp(l_ia) ).

    pos, keep: bool (M, M), pos ⊆ keep, diagonal excluded from both, every row of pos non-empty.
    Masking with -inf before logsumexp gives those entries exactly zero weight and zero gradient.
    """
    lse = logits.masked_fill(~keep, float("-inf")).logsumexp(dim=1, keepdim=True)
    log_prob = torch.where(pos, logits - lse, torch.zeros_like(logits))
    return (-log_prob.sum(dim=1) / pos.sum(dim=1)).mean()


def _sample_negatives(candidates: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Bool (M, M) mask with exactly k True per row, a uniform k-subset of that row's candidates.

    The top-k of i.i.d. U(0,1) scores over a set is a uniformly random k-subset without
    replacement, and this needs no Python loop over anchors.
    """
    device = generator.device if generator is not None else candidates.device
    scores = torch.rand(candidates.shape, generator=generator, device=device)
    scores = scores.to(candidates.device).masked_fill(~candidates, -1.0)  # rand is in [0, 1)
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(candidates).scatter_(1, idx, True)


def _parse_negatives(negatives: int | str, V: int, N: int) -> int | None:
    """None for "all", else the validated number of negatives per anchor."""
    if isinstance(negatives, str):
        if negatives == "all":
            return None
        raise ValueError(f'negatives must be "all" or an int >= 1, got {negatives!r}')
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
        raise ValueError(f'negatives must be "all" or an int >= 1, got {negatives!r}')
    available = V * (N - 1)
    if negatives > available:
        raise ValueError(
            f"negatives={negatives} but each anchor has only {available} negatives "
            f"(V * (N - 1) with V={V}, N={N}); lower negatives or raise the batch size"
        )
    return negatives


def simclr(
    z: Tensor,
    temperature: float = 0.5,
    negatives: int | Literal["all"] = "all",
    generator: torch.Generator | None = None,
) -> Tensor:
    """NT-Xent (Chen et al. 2020, SimCLR) on L2-normalised embeddings z (V, N, D).

    s_ia = cos(z_i, z_a) / temperature over the M = V*N flattened rows. Positives P(i) = the
    other V-1 views of anchor i's sample; SupCon "outside" form (Khosla et al. 2020):
        L = (1/M) Σ_i -(1/|P(i)|) Σ_{p∈P(i)} log( exp(s_ip) / Σ_{a∈A(i)} exp(s_ia) ).
    negatives="all": A(i) = every a ≠ i, so for V = 2 this is exactly SimCLR's NT-Xent (the
    positive plus 2N-2 negatives, averaged over the 2N anchors). For V > 2 the other positives
    are also in the denominator, as in SupCon's L_out.
    negatives=k (int >= 1): A(i) = P(i) ∪ K(i), K(i) = k embeddings drawn uniformly without
    replacement from the V*(N-1) embeddings of OTHER samples (any view); k = 1 is the
    single-negative SimCLR of Bordes et al. 2023. k > V*(N-1) raises ValueError. `generator`
    makes the draw reproducible.
    Sampling contract (for a DDP version): the draw is the top-k, per row, of one
    torch.rand(M, M, generator=generator) score matrix restricted to the candidates, so the
    choice is a function of (anchor row, candidate row) indices only. A DDP version gathers z to
    the global (V, N_global, D), draws the global (M_g, M_g) scores from a generator seeded
    identically on every rank and keeps its local anchors' rows: the selection is then the
    one a single process would make on the global batch, independent of world size.
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V, N, _ = check_views(z)
    _check_temperature(temperature)
    k = _parse_negatives(negatives, V, N)
    with no_autocast(z):
        logits = _cosine_logits(z, temperature)
        sample = torch.arange(N, device=z.device).repeat(V)  # sample index of each row
        same = sample[:, None] == sample[None, :]
        not_self = ~torch.eye(V * N, dtype=torch.bool, device=z.device)
        pos = same & not_self
        keep = not_self if k is None else pos | _sample_negatives(~same, k, generator)
        return _outside_loss(logits, pos, keep)


def supcon(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss L^sup_out (Khosla et al. 2020, eq. 2) on z (V, N, D).

    labels (N,) give each sample's class; every view of sample n carries labels[n]. For anchor
    i (one of the M = V*N L2-normalised rows), P(i) = all other rows with the same label
    (including the anchor's own other views, so P(i) is never empty), s = cos / temperature:
        L = (1/M) Σ_i -(1/|P(i)|) Σ_{p∈P(i)} log( exp(s_ip) / Σ_{a≠i} exp(s_ia) ).
    No base_temperature rescaling (the authors' code multiplies by temperature/base_temperature,
    1 at their defaults): this keeps supcon(z, distinct labels, τ) == simclr(z, τ).
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V, N, _ = check_views(z)
    _check_temperature(temperature)
    labels = torch.as_tensor(labels, device=z.device)
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape (N,) = ({N},), got {tuple(labels.shape)}")
    with no_autocast(z):
        logits = _cosine_logits(z, temperature)
        row_labels = labels.repeat(V)
        not_self = ~torch.eye(V * N, dtype=torch.bool, device=z.device)
        pos = (row_labels[:, None] == row_labels[None, :]) & not_self
        return _outside_loss(logits, pos, not_self)


def mocov3(q: Tensor, k: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, Algorithm 1) on (V, N, D) tensors.

    q: the base encoder's predictor outputs; k: the momentum encoder's projector outputs,
    detached here. With L2-normalised rows and τ = temperature,
        ctr(a, b) = CrossEntropy(a·bᵀ / τ, targets = arange(N)) · 2τ,
    i.e. sample n of view a is classified among the N samples of view b (the other samples are
    the negatives: pass the global batch to get the paper's gathered negatives). The loss is
    Σ_{i≠j} ctr(q_i, k_j) / (V − 1): at V = 2, ctr(q₁, k₂) + ctr(q₂, k₁) as in the paper.
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    V, N, _ = check_views(q, "q")
    check_views(k, "k")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same (V, N, D) shape, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    _check_temperature(temperature)
    with no_autocast(q):
        dtype = compute_dtype(q, k)
        qn = F.normalize(q.to(dtype), dim=-1)
        kn = F.normalize(k.detach().to(dtype), dim=-1)
        targets = torch.arange(N, device=q.device)
        # one (N, N) logit matrix at a time: memory stays O(N²) for any number of views
        total = sum(F.cross_entropy(qn[i] @ kn[j].T / temperature, targets)
                    for i in range(V) for j in range(V) if i != j)
        return total * (2 * temperature) / (V - 1)
