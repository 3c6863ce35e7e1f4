"""Offline evaluation metrics on frozen features (papers.md §1–§2, design.md "Offline evaluation").

Pure functions of feature tensors: no model, no data loading, no files. Every accuracy is a
fraction in [0, 1]. Inputs may live on any device; work happens on that device in float32.

Protocol (design.md):
- linear / MLP probes see features standardised with the *train* mean and std only;
- the linear probe is multinomial logistic regression fitted on train, its weight decay chosen
  on val from a grid, and test is reported at that choice (no refit on train + val; the test
  split never takes part in any choice);
- kNN is the weighted vote of DINO / InstDisc on L2-normalised *raw* features;
- `zero_frac` and `rankme` in `evaluate_layer` describe the test features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
# L-BFGS iterations per weight decay. On Fashion-MNIST pixels (54k x 784, ill-conditioned,
# strongly correlated features) the chosen probe's test top-1 is within 0.25 point
# of scikit-learn run to convergence at the same C, in ~85 loss+gradient passes for the grid.
MAX_ITER = 15


# ----------------------------------------------------------------------------- helpers
def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Standardise `train` and every tensor in `others` with the train mean and std.

    Returns float32 tensors in the order given (train first). A column whose train std is
    <= eps is only centred: dividing by ~0 would blow up its val/test values, which may
    differ from the constant seen in train.
    """
    _, mean, std = _train_stats(train, eps)
    return tuple((x.float() - mean) / std for x in (train, *others))


def _train_stats(train: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """train as float32 and transposed, (D, N) contiguous, its column means and its column
    stds (1 where <= eps). The std is taken over the rows of the transposed copy: the same
    bits as torch's std over dim 0 of the (N, D) matrix (tested), which is several times
    slower."""
    train = train.float()
    train_t = train.t().contiguous()  # torch's cache-blocked 2-D transpose copy
    std = train_t.std(1, correction=0)
    return train_t, train.mean(0), torch.where(std > eps, std, torch.ones_like(std))


def _accuracy(pred: Tensor, y: Tensor) -> float:
    return float((pred == y).float().mean()) if len(y) else float("nan")


def _check_splits(num_classes: int, **splits: tuple[Tensor, Tensor]) -> None:
    """Shapes, label range and finiteness, checked up front for a clear message."""
    for name, (x, y) in splits.items():
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{name}: expected features (N, D) and labels (N,), "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{name}: labels must lie in [0, {num_classes})")
        if len(x) and x.numel() and not all(map(math.isfinite, map(float, torch.aminmax(x)))):
            # min and max are finite iff every value is (NaN propagates): one pass and no
            # N x D bool temporary, which cost ~0.1 s per 54k x 512 check on 2 cores
            raise ValueError(f"{name}: features contain NaN or inf")


# ----------------------------------------------------------------------------- linear probe
# Why a hand-written L-BFGS: the probe runs on up to 54k x 784 features for ~20 layers within
# a few minutes on 2 cores, and one loss+gradient pass costs ~35 ms there, so passes are the
# budget. Two things cut them (measured against torch.optim.LBFGS + strong Wolfe, warm
# started, on Fashion-MNIST pixels):
#  1. H0 = the inverse of the softmax Hessian at W = 0, K (C + K wd)^-1 with C the feature
#     covariance: the first step is already a Newton step and correlated features (pixels)
#     stop being a problem (torch L-BFGS after 20 iterations at wd=1e-2: test 83.3% without
#     this preconditioner, 84.4% with it, 84.4% at convergence);
#  2. the curvature pairs (s, y) are kept along the weight-decay path: y is corrected exactly
#     when wd changes (y += Δwd s), so each warm-started fit starts with a good quasi-Newton
#     model (loss gap to the optimum at wd=1e-3 after 20 iterations: 0.014 with a fresh,
#     preconditioned torch L-BFGS per wd, 0.007 here).
_HISTORY = 20
_RIDGE_FLOOR = 1e-3  # keeps H0 bounded on near-zero-variance directions when wd = 0
_COV_ROWS = 8192  # rows used to estimate the feature covariance for H0


def _loss_grad(xt: Tensor, y: Tensor, theta: Tensor, wd: float) -> tuple[float, Tensor]:
    """Mean cross-entropy + wd/2·||W||² and its gradient, without autograd.

    theta is (D + 1, K): rows 0..D-1 are W, the last row is the (unregularised) bias. xt is
    the (D, N) transposed design matrix: in the (K, N) layout the softmax over classes and the
    gradient xt @ G are both memory friendly (~3x faster than the (N, K) layout here).
    """
    w, b = theta[:-1], theta[-1]
    n = xt.shape[1]
    cols = torch.arange(n, device=xt.device)
    logp = torch.addmm(b[:, None], w.T, xt).log_softmax(0)  # (K, N)
    loss = -logp[y, cols].mean() + 0.5 * wd * (w * w).sum()
    g = logp.exp_()
    g[y, cols] -= 1.0
    g /= n
    return float(loss), torch.cat([xt @ g.T + wd * w, g.sum(1)[None]])


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


def _direction(g: Tensor, pairs: list[tuple[Tensor, Tensor]], h0: Tensor) -> Tensor:
    """L-BFGS two-loop recursion: -H g with initial inverse Hessian γ·H0 on the W rows."""

    def apply_h0(q: Tensor) -> Tensor:
        # W rows through H0; the bias row has softmax curvature ~1/K at W = 0 -> K.
        return torch.cat([h0 @ q[:-1], q[-1:] * q.shape[1]])

    q, alphas = g.clone(), []
    for s, y in reversed(pairs):
        alphas.append(_dot(s, q) / _dot(s, y))
        q -= alphas[-1] * y
    r = apply_h0(q)
    if pairs:  # Shanno scaling of H0 from the newest pair
        s, y = pairs[-1]
        r *= _dot(s, y) / _dot(y, apply_h0(y))
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):
        r += (alpha - _dot(y, r) / _dot(s, y)) * s
    return -r


def _fit_logreg(
    xt: Tensor, y: Tensor, theta: Tensor, wd: float, h0: Tensor,
    pairs: list[tuple[Tensor, Tensor]], max_iter: int, tol: float = 1e-7,
) -> Tensor:
    """L-BFGS with Armijo backtracking from the warm start theta; updates `pairs` in place."""
    f, g = _loss_grad(xt, y, theta, wd)
    for _ in range(max_iter):
        d = _direction(g, pairs, h0)
        slope = _dot(g, d)
        if slope >= 0:  # not a descent direction: drop the memory
            pairs.clear()
            d = _direction(g, pairs, h0)
            slope = _dot(g, d)
        t = 1.0
        f_new, g_new = _loss_grad(xt, y, theta + d, wd)
        while not f_new <= f + 1e-4 * t * slope:  # `not <=` also rejects NaN
            t *= 0.5
            if t < 1e-8:
                return theta  # no decrease left at float32 precision
            f_new, g_new = _loss_grad(xt, y, theta + t * d, wd)
        s, dg = t * d, g_new - g
        if _dot(s, dg) > 1e-10:
            pairs.append((s, dg))
            del pairs[:-_HISTORY]
        theta = theta + s
        converged = f - f_new <= tol * max(1.0, abs(f)) or float(g_new.abs().max()) <= 1e-6
        f, g = f_new, g_new
        if converged:
            break
    return theta


def _standardize_transposed(train: Tensor, val: Tensor, test: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`standardize(train, val, test)` with train returned transposed, (D, N), plus the
    standardised train rows H0 is estimated from. The same values bit for bit, but neither the
    (N, D) standardised train matrix nor its temporary is allocated (~440 MB at 54k x 1024)."""
    xt, mean, std = _train_stats(train)
    rows = (train[:: max(1, len(train) // _COV_ROWS)].float() - mean) / std
    xt.sub_(mean[:, None]).div_(std[:, None])  # contiguous (D, N): the GEMMs' layout
    return xt, (val.float() - mean) / std, (test.float() - mean) / std, rows


def _inverse_hessian_at_zero(rows: Tensor, num_classes: int, wds: Sequence[float]) -> dict:
    """{wd: K (C + K·wd + floor)^-1}, C the (uncentred) covariance of the given (at most
    _COV_ROWS) standardised train rows."""
    cov = (rows.T @ rows / len(rows)).double()
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    out = {}
    for wd in wds:
        chol = torch.linalg.cholesky(cov + (num_classes * wd + _RIDGE_FLOOR) * eye)
        out[wd] = (num_classes * torch.cholesky_inverse(chol)).float()
    return out


def linear_probe(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
    test_y: Tensor, *, num_classes: int, weight_decays: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = MAX_ITER, seed: int = 0,
) -> dict:
    """Multinomial logistic regression on train-standardised features.

    Objective: mean cross-entropy + wd/2·||W||² with an unregularised bias, the same as
    scikit-learn's LogisticRegression(C = 1 / (wd · n_train)). One fit per wd (at most
    `max_iter` L-BFGS iterations each), from the largest wd to the smallest, each warm-started
    from the previous solution; the wd with the best val top-1 wins (ties go to the larger wd)
    and test is scored once, at that wd. `seed` is accepted for API symmetry: the fit is
    deterministic (full batch, fixed start).
    Returns {"val", "test", "weight_decay", "val_by_wd": {wd: val top-1}}.
    """
    del seed
    _check_splits(num_classes, train=(train_x, train_y), val=(val_x, val_y),
                  test=(test_x, test_y))
    wds = sorted({float(v) for v in weight_decays}, reverse=True)
    if not wds or wds[-1] < 0:
        raise ValueError(f"linear_probe: weight_decays must be >= 0, got {weight_decays}")
    xt, xva, xte, cov_rows = _standardize_transposed(train_x, val_x, test_x)
    y = train_y.to(xt.device, torch.long)
    h0 = _inverse_hessian_at_zero(cov_rows, num_classes, wds)
    # start from W = 0 and the bias of the class priors (the optimum at W = 0)
    theta = xt.new_zeros(xt.shape[0] + 1, num_classes)
    theta[-1] = (torch.bincount(y, minlength=num_classes).float() + 1).log()
    pairs: list[tuple[Tensor, Tensor]] = []
    val_by_wd: dict[float, float] = {}
    thetas: dict[float, Tensor] = {}
    for i, wd in enumerate(wds):
        if i:  # the data part of each y is unchanged, its penalty part is wd·s
            for s, dg in pairs:
                dg[:-1] += (wd - wds[i - 1]) * s[:-1]
            pairs[:] = [(s, dg) for s, dg in pairs if _dot(s, dg) > 1e-10]
        theta = thetas[wd] = _fit_logreg(xt, y, theta, wd, h0[wd], pairs, max_iter)
        val_by_wd[wd] = _accuracy(_predict(xva, theta), val_y.to(theta.device))
    # val_by_wd is ordered large -> small wd and max() keeps the first maximum: ties -> larger.
    best = max(val_by_wd, key=val_by_wd.__getitem__)
    test = _accuracy(_predict(xte, thetas[best]), test_y.to(xte.device))
    return {"val": val_by_wd[best], "test": test, "weight_decay": best, "val_by_wd": val_by_wd}


def _predict(x: Tensor, theta: Tensor) -> Tensor:
    return torch.addmm(theta[-1], x, theta[:-1]).argmax(1)


# ----------------------------------------------------------------------------- kNN
def _topk_lowest_index_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k of `sim`; among equal values at the k-th place, lower indices win.

    torch.topk does not promise which of several equal values it returns, so the rows with a
    tie across the k-th place are redone exactly. Such rows are not rare: low-dimensional or
    untrained features tie in float32 (a random-init projector output: 36% of Fashion-MNIST's
    test rows), which is why they are not re-sorted whole. Wide rows are first cut down to
    the few blocks that can hold a top-k value (`_block_candidates`).
    """
    if k >= sim.shape[1]:
        return sim.sort(dim=1, descending=True, stable=True)
    pruned = _block_candidates(sim, k)
    if pruned is None:
        return _plain_topk_lowest_index_ties(sim, k)
    cand, cand_idx, left_out_max = pruned
    vals, pos = _plain_topk_lowest_index_ties(cand, k)
    idx = cand_idx.gather(1, pos)
    # Complete when nothing left out reaches the k-th kept value (a tie would have to be
    # resolved by index against the left-out columns too). Otherwise the kept k-th value is
    # still a lower bound of the row's k-th, which is all `_stable_top` needs.
    redo = (vals[:, k - 1] <= left_out_max).nonzero().flatten()
    if len(redo):
        vals[redo], idx[redo] = _stable_top(sim[redo], vals[redo, k - 1], k)
    return vals, idx


_BLOCK = 16  # columns per block: ~k*16 candidates per row instead of all N
_SPARE_BLOCKS = 8  # blocks kept beyond k, so that a few tied block maxima stay inside


def _block_candidates(sim: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Candidates (R, (k+S)*B + tail) for each row's top k, their column indices (ascending,
    so that lower-index tie-breaking carries over) and the largest value left out of them;
    None when rows are too short for blocks to pay off.

    Column j < B*nb belongs to block j mod nb (strided blocks: the block maxima are an
    elementwise max of B contiguous slices, which vectorises). The k+S blocks with the largest
    maxima are kept; every left-out value is at most the largest left-out block maximum.
    """
    rows, n = sim.shape
    nb = n // _BLOCK
    keep = k + _SPARE_BLOCKS
    if nb < 4 * keep or not sim.is_contiguous():
        return None
    head = sim[:, :nb * _BLOCK].view(rows, _BLOCK, nb)
    block_max, blocks = head.amax(1).topk(keep + 1, dim=1)
    blocks = blocks[:, :keep].sort(dim=1).values
    cand = head.gather(2, blocks[:, None, :].expand(rows, _BLOCK, keep)).view(rows, -1)
    offsets = torch.arange(0, nb * _BLOCK, nb, device=sim.device)
    cand_idx = (offsets[None, :, None] + blocks[:, None, :]).view(rows, -1)
    if n > nb * _BLOCK:  # the last n mod B columns are always candidates
        tail = torch.arange(nb * _BLOCK, n, device=sim.device)
        cand = torch.cat([cand, sim[:, nb * _BLOCK:]], 1)
        cand_idx = torch.cat([cand_idx, tail.expand(rows, len(tail))], 1)
    return cand, cand_idx, block_max[:, keep]


def _plain_topk_lowest_index_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, idx = sim.topk(k + 1, dim=1)
    tied = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
    vals, idx = vals[:, :k].clone(), idx[:, :k].clone()
    if len(tied):
        vals[tied], idx[tied] = _stable_top(sim[tied], vals[tied, k - 1], k)
    return vals, idx


def _stable_top(sim: Tensor, kth: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """What a stable descending sort of each row keeps in its first k places, given each row's
    k-th largest value or a lower bound of it, `kth`: only the entries >= kth (at least k) are
    sorted, in a (rows, max count) matrix padded with -inf and filled in index order, so that
    the stable sort puts lower indices first among equal values."""
    keep = sim >= kth[:, None]
    counts = keep.sum(1)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: ascending column within a row
    slot = torch.arange(len(cols), device=sim.device) - (counts.cumsum(0) - counts
                                                          ).repeat_interleave(counts)
    cand = sim.new_full((len(sim), int(counts.max())), float("-inf"))
    cand_idx = torch.zeros(cand.shape, dtype=torch.long, device=sim.device)
    cand[rows, slot] = sim[rows, cols]
    cand_idx[rows, slot] = cols
    vals, order = cand.sort(dim=1, descending=True, stable=True)
    return vals[:, :k], cand_idx.gather(1, order[:, :k])


def knn_classify(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, num_classes: int,
    k: int = 200, temperature: float = 0.1, chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 (InstDisc / DINO): cosine similarity of L2-normalised raw features,
    the k most similar train points vote for their label with weight exp(sim / temperature).

    k is clipped to the train size. The (test, train) similarity matrix is built `chunk` test
    rows at a time. Ties: neighbours tied at the k-th place -> lower train index; classes with
    equal score -> lower class index (argmax keeps the first maximum).
    """
    _check_splits(num_classes, train=(train_x, train_y), test=(test_x, test_y))
    train = F.normalize(train_x.float(), dim=1)
    labels = train_y.to(train.device, torch.long)
    k = min(k, len(train))
    correct = 0
    # One (chunk, N) similarity buffer for all chunks: a fresh 200 MB tensor per chunk is
    # page-faulted in again each time, which cost as much as the matmul itself at small D.
    buffer = train.new_empty(min(chunk, len(test_x)), len(train))
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start:start + chunk].float().to(train.device), dim=1)
        sim = torch.mm(query, train.T, out=buffer[:len(query)])
        sim, idx = _topk_lowest_index_ties(sim, k)
        scores = sim.new_zeros(len(query), num_classes)
        scores.scatter_add_(1, labels[idx], (sim / temperature).exp())
        target = test_y[start:start + chunk].to(train.device)
        correct += int((scores.argmax(1) == target).sum())
    return correct / len(test_x) if len(test_x) else float("nan")


# ----------------------------------------------------------------------------- MLP probe
def mlp_probe(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
    test_y: Tensor, *, num_classes: int, hidden: int = 512, epochs: int = 10,
    batch_size: int = 512, lr: float = 1e-3, seed: int = 0,
) -> dict:
    """One-hidden-layer probe Linear-BN-ReLU-Linear on train-standardised features.

    Adam with a cosine learning-rate decay over `epochs` epochs of shuffled minibatches;
    after each epoch val top-1 is measured and test is scored only when val improves, so the
    reported test is the best-val epoch's. Returns {"val", "test", "epoch"} (epoch 1-based).
    """
    _check_splits(num_classes, train=(train_x, train_y), val=(val_x, val_y),
                  test=(test_x, test_y))
    xtr, xva, xte = standardize(train_x, val_x, test_x)
    device = xtr.device
    ytr = train_y.to(device, torch.long)
    gen = torch.Generator(device=device).manual_seed(seed)
    # Seed the initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(xtr.shape[1], hidden), torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes)).to(device)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    best = {"val": -1.0, "test": float("nan"), "epoch": 0}
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen, device=device).split(batch_size):
            if len(idx) < 2:  # BatchNorm cannot train on a single sample
                continue
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val = _predict_accuracy(model, xva, val_y)
        if val > best["val"]:
            best = {"val": val, "test": _predict_accuracy(model, xte, test_y), "epoch": epoch}
    return best


@torch.no_grad()
def _predict_accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, chunk: int = 8192) -> float:
    model.eval()
    pred = torch.cat([model(part).argmax(1) for part in x.split(chunk)]) if len(x) else y
    return _accuracy(pred, y.to(pred.device))


# ----------------------------------------------------------------------------- statistics
def zero_fraction(x: Tensor) -> float:
    """Fraction of entries that are exactly zero (dead ReLU outputs, papers.md §2)."""
    return float((x == 0).sum()) / x.numel() if x.numel() else float("nan")


def rankme(x: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of p_k = σ_k / ||σ||₁ + eps, the
    singular values σ of the (uncentred) feature matrix x (N, D).

    σ² are the eigenvalues of the smaller Gram matrix, computed in float64: much cheaper than
    an SVD of a tall matrix, and the small σ it loses precision on barely move the entropy.
    """
    x = x.double().flatten(1)
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    if float(sigma.sum()) == 0.0:
        return 0.0
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


# ----------------------------------------------------------------------------- one layer
def evaluate_layer(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
    test_y: Tensor, *, num_classes: int, mlp: bool = False, seed: int = 0, knn_k: int = 200,
    knn_temperature: float = 0.1,
) -> dict:
    """Every offline metric of one layer's features (the per-layer entry of eval.json).

    Keys: linear_val, linear_test (linear probe), knn_test (weighted kNN on raw features with
    `knn_k` neighbours at `knn_temperature`),
    mlp_test (only if `mlp`), zero_frac and rankme (of the *test* features), binarized_test
    (the same linear-probe protocol on (x > 0) features).
    """
    splits = (train_x, train_y, val_x, val_y, test_x, test_y)
    lin = linear_probe(*splits, num_classes=num_classes, seed=seed)
    out = {"linear_val": lin["val"], "linear_test": lin["test"],
           "knn_test": knn_classify(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                    k=knn_k, temperature=knn_temperature)}
    if mlp:
        out["mlp_test"] = mlp_probe(*splits, num_classes=num_classes, seed=seed)["test"]
    out["zero_frac"] = zero_fraction(test_x)
    binary = ((train_x > 0).float(), train_y, (val_x > 0).float(), val_y,
              (test_x > 0).float(), test_y)
    out["binarized_test"] = linear_probe(*binary, num_classes=num_classes, seed=seed)["test"]
    out["rankme"] = rankme(test_x)
    return out
