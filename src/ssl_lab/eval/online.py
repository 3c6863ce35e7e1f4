"""Online linear probes on every named layer (Guillotine Regularization's protocol).

Each layer gets its own linear classifier trained on *detached* features of the training views,
with its own optimizer, so probing never changes what the encoder learns. Images without a label
(UNLABELLED = -1: STL-10's unlabelled split) are left out of the probes' loss and accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


class OnlineProbes(nn.Module):
    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__()
        # "." is not allowed in module names; layer names never contain it.
        self.heads = nn.ModuleDict({name: nn.Linear(dim, num_classes)
                                    for name, dim in feature_dims.items()})
        self.correct = {name: torch.zeros(()) for name in feature_dims}
        self.seen = torch.zeros(())

    @property
    def layer_names(self) -> list[str]:
        return list(self.heads)

    def loss(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum of per-layer cross-entropies; also accumulates accuracy without a device sync."""
        total = 0.0
        labelled = labels >= 0
        n = labelled.sum()
        for name, head in self.heads.items():
            logits = head(features[name].detach().float())
            # the mean over labelled rows (0 when none, without a device sync)
            ce = nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            total = total + (ce * labelled).sum() / n.clamp(min=1)
            hits = ((logits.argmax(1) == labels) & labelled).sum().detach()
            self.correct[name] = self.correct[name].to(hits.device) + hits
        self.seen = self.seen.to(labels.device) + n
        return total

    def pop_accuracy(self) -> dict[str, float]:
        """Accuracy on the training views since the last call (one sync, at log time)."""
        seen = max(float(self.seen), 1.0)
        acc = {name: float(c) / seen for name, c in self.correct.items()}
        self.correct = {name: torch.zeros(()) for name in self.heads}
        self.seen = torch.zeros(())
        return acc
