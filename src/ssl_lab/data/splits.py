"""Split containers and the seeded index arithmetic shared by every data source.

Kept apart from `sources.py` so the format readers can build splits without importing the
source registry (which imports them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.seeding import numpy_rng


@dataclass
class Split:
    """One split: uint8 images (N, H, W, C) and int64 labels (N,) or (N, F).

    `images` is an array, or a packed store's lazy rows (data/store.py: same shape, dtype and
    indexing), whose `select` keeps a subset without reading pixels.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: np.ndarray) -> Split:
        select = getattr(self.images, "select", None)
        return Split(select(idx) if select else self.images[idx], self.labels[idx])


UNLABELLED = -1  # the label of an image that has none (cross-entropy's ignore_index)


def _in_ram(images) -> bool:
    return isinstance(images, np.ndarray) and not isinstance(images, np.memmap)


class ConcatImages:
    """Image arrays (or stores' lazy rows) end to end, read a batch of rows at a time.

    The loader streams it like a memory map: indexing with an int, a slice or an integer array
    reads just those rows; `np.asarray(x)` reads every row.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, parts: list):
        self._parts = parts
        self._ends = np.cumsum([len(p) for p in parts])
        self.shape = (int(self._ends[-1]), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = np.arange(len(self))[key].astype(np.int64)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        part = np.searchsorted(self._ends, rows, side="right")
        for k, images in enumerate(self._parts):
            mask = part == k
            if mask.any():
                out[mask] = images[rows[mask] - (self._ends[k] - len(images))]
        return out

    def reshape(self, *shape: int) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass
class DatasetSplits:
    """A dataset's train/val/test splits and the names of its label factors.

    train/val/test hold labelled images (any of them may be empty); `unlabelled` holds images
    without labels that SSL trains on too (STL-10's 100,000, a folder without class
    sub-folders, arrays passed with labels=None). SSL trains on `ssl_train` (both); probes use
    the labelled splits only.
    """

    name: str
    train: Split
    val: Split
    test: Split
    factor_names: list[str]
    num_classes: list[int]
    class_names: list[list[str]] | None = None
    # The factor `select_target(None)` picks; None means the first one.
    default_target: str | None = field(default=None, repr=False)
    unlabelled: Split | None = None  # labels all UNLABELLED; SSL-only images

    @property
    def has_labels(self) -> bool:
        """Whether the probes have labelled train and test images to use."""
        return len(self.train) > 0 and len(self.test) > 0

    def probe_gap(self) -> str:
        """Why the probes cannot run on these splits ('' when they can)."""
        if self.has_labels:
            return ""
        if len(self.train) == 0:
            return "has no labelled training images" if len(self.test) else \
                "has no labelled images"
        return "has an empty test split (too few labelled images to hold some out)"

    @functools.cached_property
    def ssl_train(self) -> Split:
        """What SSL trains on: the labelled train split followed by the unlabelled images."""
        if self.unlabelled is None or len(self.unlabelled) == 0:
            return self.train
        if len(self.train) == 0:
            return self.unlabelled
        labels = np.concatenate([self.train.labels.reshape(len(self.train), -1)[:, 0],
                                 self.unlabelled.labels.reshape(len(self.unlabelled), -1)[:, 0]])
        parts = [self.train.images, self.unlabelled.images]
        if all(_in_ram(p) for p in parts):
            return Split(np.concatenate(parts), labels)
        # a memory map or store (STL-10's 100,000 unlabelled images): never copied into RAM
        return Split(ConcatImages(parts), labels)

    @property
    def _any_images(self):
        return self.train.images if len(self.train) or self.unlabelled is None \
            else self.unlabelled.images

    @property
    def in_chans(self) -> int:
        return int(self._any_images.shape[-1])

    @property
    def image_size(self) -> int:
        return int(self._any_images.shape[1])

    def select_target(self, target: str | None) -> DatasetSplits:
        """Keep one label column (N,) for `target`; None picks the default factor."""
        if target is None:
            target = self.default_target or self.factor_names[0]
        if target not in self.factor_names:
            raise UserError(
                f"data.target={short(target)} is not a factor of {self.name}: "
                f"choose one of {', '.join(self.factor_names)}"
            )
        if self.train.labels.ndim == 1:
            return self
        k = self.factor_names.index(target)

        def column(s: Split) -> Split:
            return Split(s.images, np.ascontiguousarray(s.labels[:, k]))

        return replace(
            self,
            train=column(self.train),
            val=column(self.val),
            test=column(self.test),
            factor_names=[target],
            num_classes=[self.num_classes[k]],
            class_names=None if self.class_names is None else [self.class_names[k]],
            default_target=None,
        )


@dataclass
class Loaded:
    """What a source reader returns before the val carve and the fraction subset."""

    train: Split
    test: Split
    val: Split | None = None  # only sources with their own validation split set it
    factor_names: list[str] = field(default_factory=lambda: ["label"])
    num_classes: list[int] | None = None  # None: max label + 1 per factor over all splits
    class_names: list[list[str]] | None = None
    default_target: str | None = None
    # the dataset kind that seeds the val carve and fraction subset (None: the name's own);
    # a packed store names its source so that it splits exactly like the source
    split_key: str | None = None
    unlabelled: Split | None = None  # SSL-only images (labels all UNLABELLED)


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (keep, held_out) index arrays; stratified per class for single-label data.

    Stratifying keeps small test sets (digits, a few-image imagefolder) balanced.
    """
    rng = numpy_rng(seed, 0x7E57)
    if labels.ndim != 1:
        perm = rng.permutation(len(labels))
        n_out = round(fraction * len(labels))
        return np.sort(perm[n_out:]), np.sort(perm[:n_out])
    out = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        out.append(idx[: round(fraction * len(idx))])
    held = np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
    return keep, held


def carve_val(train: Split, val_fraction: float, rng: np.random.Generator) -> tuple[Split, Split]:
    """Split `train` into (train, val) with a seeded permutation; both keep file order."""
    perm = rng.permutation(len(train))
    n_val = round(val_fraction * len(train))
    return train.take(np.sort(perm[n_val:])), train.take(np.sort(perm[:n_val]))


def subset(train: Split, fraction: float, rng: np.random.Generator) -> Split:
    """A prefix of one seeded permutation, so smaller fractions are nested in larger ones."""
    if fraction >= 1.0:
        return train
    n = max(1, math.ceil(fraction * len(train)))
    return train.take(np.sort(rng.permutation(len(train))[:n]))


def count_classes(loaded: Loaded) -> list[int]:
    """Max label + 1 per factor over every split (for sources without a fixed class list)."""
    # an empty split (a test carve too small to hold an image) has no labels to count, and
    # reshape(0, -1) cannot infer its width: it is skipped
    parts = [s.labels for s in (loaded.train, loaded.val, loaded.test)
             if s is not None and len(s.labels)]
    if not parts:
        return [0] * len(loaded.factor_names)
    labels = np.concatenate([p.reshape(len(p), -1) for p in parts])
    return [int(v) + 1 for v in labels.max(axis=0)]
