"""Every offline metric of one layer, from its feature `Rows`: in RAM when they fit the budget,
streamed block by block otherwise.

In RAM (the layer's probes fit `eval.ram_budget_mb`): the splits are read whole and
`metrics.evaluate_layer` runs on tensors, exactly as on features that never touched a file.
Beyond it: `eval.blocked`, the same protocols with every pass made of blocks, so a number does
not depend on the budget beyond float rounding. eval.json records which path ran (`solver`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_lab.errors import UserError
from ssl_lab.eval import blocked, metrics
from ssl_lab.eval.features import Rows

QUERY_CHUNK = 1024  # kNN queries per similarity matrix, as knn_classify's chunk


def in_memory_bytes(n_train: int, n_eval: int, dim: int, num_classes: int) -> int:
    """RAM the in-memory probes of one layer need at their peak, estimated (float32): the raw
    splits and their binarised copies, the probe's standardised transposed train copy and its
    (K, n_train) logits / softmax / gradient, and the kNN's (chunk, n_train) similarities."""
    return 4 * (dim * (3 * n_train + 2 * n_eval) + (QUERY_CHUNK + 3 * num_classes) * n_train)


def block_rows(budget: int, dim: int, num_classes: int) -> int:
    """Rows per streamed block: a block of the layer, its standardised copy and its (rows, K)
    logits stay within an eighth of the budget, whatever the number of images."""
    return max(256, budget // (8 * 4 * (2 * dim + 2 * num_classes)))


def evaluate_layer_rows(train: Rows, train_y: Tensor, val: Rows, val_y: Tensor, test: Rows,
                        test_y: Tensor, *, num_classes: int, budget_bytes: int,
                        device: torch.device, mlp: bool = False, seed: int = 0,
                        knn_k: int = 200, knn_temperature: float = 0.1) -> dict:
    """`metrics.evaluate_layer`'s keys plus `solver`: "in-memory" or "blocked"."""
    need = in_memory_bytes(train.n, val.n + test.n, train.dim, num_classes)
    if need <= budget_bytes:
        x = [rows.materialize().to(device) for rows in (train, val, test)]
        out = metrics.evaluate_layer(x[0], train_y, x[1], val_y, x[2], test_y,
                                     num_classes=num_classes, mlp=mlp, seed=seed, knn_k=knn_k,
                                     knn_temperature=knn_temperature)
        return out | {"solver": "in-memory"}
    if mlp:
        raise UserError(f"eval.mlp=true needs a layer's features in RAM: this one needs "
                        f"~{need >> 20} MB; raise eval.ram_budget_mb or drop eval.mlp")
    return _blocked(train, train_y, val, val_y, test, test_y, num_classes, budget_bytes, device,
                    knn_k, knn_temperature) | {"solver": "blocked"}


def _blocked(train: Rows, train_y: Tensor, val: Rows, val_y: Tensor, test: Rows, test_y: Tensor,
             num_classes: int, budget: int, device: torch.device, knn_k: int,
             knn_temperature: float) -> dict:
    rows = block_rows(budget, train.dim, num_classes)
    lin = blocked.linear_probe_rows(train, train_y, val, val_y, test, test_y,
                                    num_classes=num_classes, block_rows=rows, device=device)
    # the kNN holds a bank block, its normalised copy and a (chunk, bank block) similarity
    # matrix; the running top k of a query block is small next to them
    bank = max(256, min(rows, budget // (8 * 4 * QUERY_CHUNK)))
    # a query block keeps its running top k (values, indices) and their merge temporaries
    queries = max(QUERY_CHUNK, min(rows, budget // (8 * 48 * max(1, knn_k))))
    knn = blocked.knn_rows(train, train_y, test, test_y, num_classes=num_classes, k=knn_k,
                           temperature=knn_temperature, bank_rows=bank, query_rows=queries,
                           device=device, chunk=QUERY_CHUNK)
    binary = blocked.linear_probe_rows(train.binarized(), train_y, val.binarized(), val_y,
                                       test.binarized(), test_y, num_classes=num_classes,
                                       block_rows=rows, device=device)
    return {"linear_val": lin["val"], "linear_test": lin["test"], "knn_test": knn,
            "zero_frac": blocked.zero_fraction_rows(test, rows),
            "binarized_test": binary["test"], "rankme": blocked.rankme_rows(test, rows, device)}
