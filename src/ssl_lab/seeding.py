"""Every seed ssl-lab derives, in one place.

A run is a pure function of `seed`: the data order of each epoch, the views of each step (per
rank), the loss's own sampling (shared by every rank), and the fixed seeds that carve held-out
sets (which must not move with the run seed, or two runs would be tested on different images).
Resume is exact because every generator is rebuilt from (seed, epoch) or (seed, step) instead of
being carried along.
"""

from __future__ import annotations

import numpy as np
import torch

# Fixed seeds: what they select must be the same for every run seed.
HOLDOUT_SEED = 0  # test sets carved from a training split (digits, shapes, image folders)
SELECT_SEED = 0  # the held-out images that `rcdm sample/score split=... n=...` show


def epoch_seed(seed: int, epoch: int) -> int:
    """The data order of one epoch."""
    return seed * 100_003 + epoch


def rank_generator_seed(seed: int, step: int, rank: int) -> int:
    """Seed of rank `rank`'s view generator at `step`.

    Rank 0 gets the single-process seed, so world size 1 is bit-identical to a run without
    torchrun; rank r adds r·2³² (no run reaches 2³² steps, so no (step, rank) pairs collide).
    """
    return seed * 1_000_003 + step + 1 + (rank << 32)


def shared_generator_seed(seed: int, step: int) -> int:
    """Seed of the loss generator at `step`, the SAME on every rank (simclr negatives=k must
    draw the same negatives for a given global anchor everywhere); disjoint from the view
    seeds (2⁵⁰ is above any rank's offset)."""
    return seed * 1_000_003 + step + 1 + (1 << 50)


def step_generator(device: torch.device | str, seed: int, step: int, rank: int = 0
                   ) -> torch.Generator:
    """The random draws of one step on one rank (views, diffusion noise)."""
    return torch.Generator(device=device).manual_seed(rank_generator_seed(seed, step, rank))


def shared_generator(device: torch.device | str, seed: int, step: int) -> torch.Generator:
    """The loss's draws at `step`, identical on every rank."""
    return torch.Generator(device=device).manual_seed(shared_generator_seed(seed, step))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits n items (CPU int64)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def numpy_rng(*keys: int) -> np.random.Generator:
    """A numpy generator keyed by several integers (e.g. seed, purpose). Modulo 2**64:
    SeedSequence rejects negative integers, and a seed of -1 is legitimate."""
    return np.random.default_rng([int(k) % 2**64 for k in keys])
