"""Offline evaluation metrics on frozen features (papers.md §1–§2, design.md "Offline evaluation").

Pure functions of feature tensors: no model, no data loading, no files. Every accuracy is a
fraction in [0, 1]. Inputs may live on any device; work happens on that device in float32.
The linear probe lives in `eval.linear`, the kNN in `eval.knn` (both re-exported here); the
versions that stream features from files too large for RAM are in `eval.blocked`.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lab.eval.common import accuracy as _accuracy
from ssl_lab.eval.common import check_splits as _check_splits
from ssl_lab.eval.common import standardize
from ssl_lab.eval.common import train_stats as _train_stats
from ssl_lab.eval.knn import _block_candidates, _topk_lowest_index_ties, knn_classify
from ssl_lab.eval.linear import (
    _COV_ROWS,
    MAX_ITER,
    WEIGHT_DECAYS,
    _standardize_transposed,
    linear_probe,
)
from ssl_lab.eval.linear import predict as _predict

__all__ = ["MAX_ITER", "WEIGHT_DECAYS", "evaluate_layer", "knn_classify", "linear_probe",
           "mlp_probe", "rankme", "standardize", "zero_fraction", "_COV_ROWS", "_accuracy",
           "_block_candidates", "_check_splits", "_predict", "_standardize_transposed",
           "_topk_lowest_index_ties", "_train_stats"]


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
