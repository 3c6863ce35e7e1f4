"""The offline probes on features too large for RAM, streamed block by block from `Rows`.

Same protocols as `eval.metrics` on tensors, with every pass over the train features made of
blocks read from the feature file:
- linear probe: the same L-BFGS and weight-decay path (`eval.linear`), its loss and gradient
  accumulated over train blocks, standardised with train statistics gathered in one streaming
  pass (float64 Chan/Welford merge); val and test predicted block by block. The iterations are
  the in-memory probe's, so the two agree to float rounding (tested);
- kNN: blocks of queries against blocks of the bank; each bank block's top k is merged into the
  running top k with the same tie rule (`knn.merge_topk`), so the neighbours are the same;
- zero_frac and RankMe of the test features: a count and a float64 Gram matrix summed over
  blocks.
Work happens on `device` (the GPU when there is one); blocks are copied there as they are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lab.eval.common import STD_EPS, check_finite, check_labels
from ssl_lab.eval.features import Rows
from ssl_lab.eval.knn import _topk_lowest_index_ties, merge_topk, vote
from ssl_lab.eval.linear import (
    _COV_ROWS,
    MAX_ITER,
    WEIGHT_DECAYS,
    Columns,
    best_weight_decay,
    grid,
    softmax_pass,
    weight_decay_path,
)


class Standardizer:
    """Train column means and stds (std <= eps -> 1, as in memory), the exactly constant
    columns, and the rows H0 is estimated from (every max(1, n // _COV_ROWS)-th, as in memory),
    from one pass over the train blocks."""

    def __init__(self, train: Rows, block_rows: int, device: torch.device):
        count, mean, m2 = 0, torch.zeros(train.dim, dtype=torch.float64), None
        lo = hi = None
        step = max(1, train.n // _COV_ROWS)
        cov_rows = []
        for start, x in train.blocks(block_rows):
            check_finite("train", x)
            xd = x.double()
            b_mean = xd.mean(0)
            b_m2 = xd.sub_(b_mean).square_().sum(0)  # in place: one float64 copy of the block
            delta, total = b_mean - mean, count + len(x)
            m2 = b_m2 if m2 is None else m2 + b_m2 + delta**2 * count * len(x) / total
            mean, count = mean + delta * len(x) / total, total
            lo = x.amin(0) if lo is None else torch.minimum(lo, x.amin(0))
            hi = x.amax(0) if hi is None else torch.maximum(hi, x.amax(0))
            cov_rows.append(x[(-start) % step::step].clone())  # blocks are reused
        std = (m2 / max(1, count)).sqrt().float() if m2 is not None else torch.ones(train.dim)
        self.mean, self.std = mean.float().to(device), torch.where(
            std > STD_EPS, std, torch.ones_like(std)).to(device)
        # exactly constant columns standardise to exactly 0 (their float64 mean is exact)
        live = (hi > lo) if hi is not None else torch.zeros(train.dim, dtype=torch.bool)
        self.live = live.nonzero().flatten().to(device)
        self.device = device
        self.cov_rows = self(torch.cat(cov_rows) if cov_rows else torch.zeros(0, train.dim))

    def __call__(self, x: Tensor) -> Tensor:
        """Standardised live columns of a block, on the device."""
        x = x.to(self.device, non_blocking=True)
        return ((x - self.mean) / self.std)[:, self.live]

    def centred(self, x: Tensor) -> Tensor:
        """A scratch block on the device, centred in place (a copy only when it moves)."""
        return x.to(self.device, non_blocking=True).sub_(self.mean)

    def fold(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Weights (dim, K) and bias acting on centred blocks as theta acts on standardised live
        columns: x_std @ W = (x - mean) @ (W / std) with zero rows for the columns left out.
        Dividing the small weight matrix instead of every block saves two copies of each block
        per pass, and the passes are what a streamed probe costs."""
        w = theta.new_zeros(len(self.mean), theta.shape[1])
        w[self.live] = theta[:-1] / self.std[self.live, None]
        return w, theta[-1]

    def unfold(self, grad_w: Tensor) -> Tensor:
        """The gradient w.r.t. the folded weights -> w.r.t. the standardised live-column ones."""
        return grad_w[self.live] / self.std[self.live, None]


# Rows per block of a loss-and-gradient pass on the CPU: ~8 MB, so that a block read from the
# file is still in the L3 cache for its two GEMMs and the softmax between them, and every pass
# fetches the features from DRAM once, in the read. Measured on 500k x 1024 float32 features
# here (2-core AMD EPYC, 32 MB L3): blocks of 2,048 and 8,192 rows (8 and 32 MB) cut the read
# from ~0.66 s to ~0.2 s per pass against 65,536-row ones. A GPU wants large blocks (fewer
# copies and launches).
_CPU_PASS_BYTES = 8 << 20


def pass_rows(block_rows: int, dim: int, device: torch.device) -> int:
    """Rows per block of the linear probe's passes: at most block_rows (the memory budget's)."""
    if device.type != "cpu":
        return block_rows
    return min(block_rows, max(256, _CPU_PASS_BYTES // (4 * max(1, dim))))


class _Streamed:
    """Loss-and-gradient passes (`linear.Problem`) over train blocks."""

    def __init__(self, train: Rows, y: Tensor, num_classes: int, scale: Standardizer,
                 block_rows: int):
        self.train, self.y, self.k, self.scale = train, y, num_classes, scale
        self.n, self.block_rows = train.n, pass_rows(block_rows, train.dim, scale.device)

    def loss_grad(self, theta: Tensor, wd: float) -> tuple[float, Tensor]:
        w, b = self.scale.fold(theta)
        w_t = w.T.contiguous()  # (K, dim)
        loss = torch.zeros((), dtype=torch.float64, device=theta.device)
        grad_wt, grad_b = torch.zeros_like(w_t), torch.zeros_like(b)
        for start, x in self.train.blocks(self.block_rows):
            cols = Columns.of_rows(self.scale.centred(x))
            part, part_wt, part_b = softmax_pass(cols, self.y[start:start + len(x)], w_t, b)
            loss += part.double()
            grad_wt += part_wt
            grad_b += part_b
        w = theta[:-1]
        grad = torch.cat([self.scale.unfold(grad_wt.T).div_(self.n).add_(w, alpha=wd),
                          grad_b.div_(self.n)[None]])
        return float(loss) / self.n + 0.5 * wd * float((w * w).sum()), grad


def _accuracy_rows(rows: Rows, y: Tensor, theta: Tensor, scale: Standardizer, block_rows: int,
                   name: str) -> float:
    correct, (w, b) = 0, scale.fold(theta)
    for start, x in rows.blocks(block_rows):
        check_finite(name, x)
        pred = torch.addmm(b, scale.centred(x), w).argmax(1)
        correct += int((pred == y[start:start + len(x)]).sum())
    # as common.accuracy: the mean of a float32 0/1 vector, so both paths print alike
    return float(torch.tensor(float(correct)) / rows.n) if rows.n else float("nan")


def linear_probe_rows(
    train: Rows, train_y: Tensor, val: Rows, val_y: Tensor, test: Rows, test_y: Tensor, *,
    num_classes: int, block_rows: int, device: torch.device,
    weight_decays: Sequence[float] = WEIGHT_DECAYS, max_iter: int = MAX_ITER,
) -> dict:
    """`linear.linear_probe` with the features streamed from `Rows` (same return value)."""
    for name, y, rows in (("train", train_y, train), ("val", val_y, val), ("test", test_y, test)):
        if len(y) != rows.n:
            raise ValueError(f"{name}: {rows.n} feature rows but {len(y)} labels")
        check_labels(name, y, num_classes)
    wds = grid(weight_decays)
    scale = Standardizer(train, block_rows, device)
    y = train_y.to(device, torch.long)
    val_y, test_y = val_y.to(device, torch.long), test_y.to(device, torch.long)
    problem = _Streamed(train, y, num_classes, scale, block_rows)
    val_by_wd, thetas = weight_decay_path(
        problem, scale.cov_rows, torch.bincount(y, minlength=num_classes), wds, max_iter,
        lambda th: _accuracy_rows(val, val_y, th, scale, block_rows, "val"))
    best = best_weight_decay(val_by_wd)
    test_acc = _accuracy_rows(test, test_y, thetas[best], scale, block_rows, "test")
    return {"val": val_by_wd[best], "test": test_acc, "weight_decay": best,
            "val_by_wd": val_by_wd}


def knn_rows(train: Rows, train_y: Tensor, test: Rows, test_y: Tensor, *, num_classes: int,
             k: int = 200, temperature: float = 0.1, bank_rows: int, query_rows: int,
             device: torch.device, chunk: int = 1024) -> float:
    """Weighted kNN top-1 (`knn.knn_classify`) with the bank read in blocks of `bank_rows`
    for every `query_rows` queries, `chunk` of them per similarity matrix."""
    check_labels("train", train_y, num_classes)
    labels = train_y.to(device, torch.long)
    k, correct = min(k, train.n), 0
    # one similarity buffer for every (chunk, bank block): fresh ones are page-faulted each time
    buffer = torch.empty(min(chunk, test.n) * min(bank_rows, train.n), device=device)
    for q_start, queries in test.blocks(query_rows):
        check_finite("test", queries)
        queries = F.normalize(queries.to(device), dim=1)
        vals = queries.new_empty(len(queries), 0)
        idx = torch.zeros(len(queries), 0, dtype=torch.long, device=device)
        for b_start, bank in train.blocks(bank_rows):
            check_finite("train", bank)
            bank = bank.to(device)  # a scratch block: normalised in place, as F.normalize does
            bank.div_(bank.norm(dim=1, keepdim=True).clamp_min_(1e-12))
            new_v, new_i = [], []
            for part in queries.split(chunk):
                sim = torch.mm(part, bank.T, out=buffer[:len(part) * len(bank)].view(
                    len(part), len(bank)))
                top_v, top_i = _topk_lowest_index_ties(sim, min(k, len(bank)))
                new_v.append(top_v)
                new_i.append(top_i + b_start)
            vals, idx = merge_topk(vals, idx, torch.cat(new_v), torch.cat(new_i), k)
        pred = vote(vals, idx, labels, num_classes, temperature)
        correct += int((pred == test_y[q_start:q_start + len(pred)].to(device)).sum())
    return correct / test.n if test.n else float("nan")


def zero_fraction_rows(rows: Rows, block_rows: int) -> float:
    zeros = sum(int((x == 0).sum()) for _, x in rows.blocks(block_rows))
    return zeros / (rows.n * rows.dim) if rows.n * rows.dim else float("nan")


def rankme_rows(rows: Rows, block_rows: int, device: torch.device, eps: float = 1e-7) -> float:
    """RankMe (`metrics.rankme`) from the float64 Gram matrix x^T x summed over blocks (or
    x x^T of the whole split when it has fewer rows than columns: then it is small)."""
    if rows.n < rows.dim:
        x = rows.materialize().to(device).double()
        gram = x @ x.T
    else:
        gram = torch.zeros(rows.dim, rows.dim, dtype=torch.float64, device=device)
        for _, x in rows.blocks(block_rows):
            x = x.to(device).double()
            gram.addmm_(x.T, x)
    sigma = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    if float(sigma.sum()) == 0.0:
        return 0.0
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
