"""Weighted kNN on L2-normalised raw features (InstDisc / DINO), with a deterministic tie rule.

The k most similar train points vote for their label with weight exp(sim / temperature).
Neighbours tied at the k-th place: the lower train index wins; classes with equal score: the
lower class index (argmax keeps the first maximum). `knn_classify` holds the train features in
memory; `eval.blocked` reads them block by block and merges each block's top k with
`merge_topk`, which keeps exactly the same neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_lab.eval.common import check_splits


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


def merge_topk(vals: Tensor, idx: Tensor, new_vals: Tensor, new_idx: Tensor, k: int
               ) -> tuple[Tensor, Tensor]:
    """The top k (lowest index at a tie) of two candidate sets of the same rows, e.g. the top k
    so far and a later bank block's. Candidates are put in train-index order first, which is
    the order the tie rule needs; the result is sorted by value, descending."""
    cand_vals, cand_idx = torch.cat([vals, new_vals], 1), torch.cat([idx, new_idx], 1)
    order = cand_idx.argsort(dim=1)
    cand_vals, cand_idx = cand_vals.gather(1, order), cand_idx.gather(1, order)
    top_vals, pos = _topk_lowest_index_ties(cand_vals, min(k, cand_vals.shape[1]))
    return top_vals, cand_idx.gather(1, pos)


def vote(sim: Tensor, idx: Tensor, labels: Tensor, num_classes: int, temperature: float
         ) -> Tensor:
    """Predicted classes from the neighbours' similarities (sorted, descending) and indices."""
    scores = sim.new_zeros(len(sim), num_classes)
    scores.scatter_add_(1, labels[idx], (sim / temperature).exp())
    return scores.argmax(1)


def knn_classify(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, num_classes: int,
    k: int = 200, temperature: float = 0.1, chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 with the train features in memory (module docstring).

    k is clipped to the train size. The (test, train) similarity matrix is built `chunk` test
    rows at a time.
    """
    check_splits(num_classes, train=(train_x, train_y), test=(test_x, test_y))
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
        pred = vote(sim, idx, labels, num_classes, temperature)
        target = test_y[start:start + chunk].to(train.device)
        correct += int((pred == target).sum())
    return correct / len(test_x) if len(test_x) else float("nan")
