"""The training loop's batches: seeded per-epoch shuffling, rank sharding, background prefetch.

Which samples make global step `step` is a pure function of (seed, epoch, step in epoch, rank):
epoch `e` shuffles with `seeding.epoch_permutation(n, seed, e)` and rank r takes its block of the
global batch (`dist.shard_indices`). So a run resumed mid-epoch gets the very batches the
uninterrupted run would have had, whatever the source.

Two sources of pixels:
- an in-memory array (every built-in source): copied to the device once and indexed there,
  exactly what the loop did before the loader existed (no thread: indexing costs microseconds);
- a packed store's memory map (`packed:PATH`, data/store.py) or any np.memmap: each batch is read
  from the map (-> uint8 tensor -> pinned -> non_blocking copy on CUDA) in a background thread,
  `prefetch` batches ahead, while the device makes views of and trains on the current one.
  Only the batches in flight are ever in RAM.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ssl_lab import dist
from ssl_lab.seeding import epoch_permutation

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (n, H, W, C), int64 labels (n,...)


def in_memory(images: Any) -> bool:
    """True for arrays in RAM (put on the device); False for memory maps and stores (streamed)."""
    return isinstance(images, np.ndarray) and not isinstance(images, np.memmap)


class BatchLoader:
    """Rank `rank`'s share (`batch` samples) of every global batch of `batch * world_size`.

    `batches(start, stop)` yields steps start .. stop-1 (steps past one epoch wrap into the next
    epoch's permutation); the last incomplete global batch of an epoch is dropped, as before.
    """

    def __init__(self, images: Any, labels: np.ndarray, batch: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", prefetch: int = 2):
        self.n, self.batch, self.seed = len(images), batch, seed
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.device = torch.device(device)
        if batch * world_size > self.n:
            raise ValueError(f"global batch {batch * world_size} > {self.n} samples")
        self.steps_per_epoch = self.n // (batch * world_size)
        self.streamed = not in_memory(images)
        if self.streamed:
            self._images, self._labels = images, torch.from_numpy(np.asarray(labels))
        else:
            self._images = torch.from_numpy(images).to(self.device)
            self._labels = torch.from_numpy(labels).to(self.device)
        cuda = self.streamed and self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        # in-memory data is indexed on the device with the permutation moved there once per
        # epoch: a per-step host-to-device copy of indices would synchronise every CUDA step
        self._index_device = torch.device("cpu") if self.streamed else self.device
        self._perm_epoch, self._perm = -1, torch.zeros(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """Sample indices (int64; on the device for in-memory data, else on the CPU) of this
        rank's share of global step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            perm = epoch_permutation(self.n, self.seed, epoch)
            self._perm, self._perm_epoch = perm.to(self._index_device), epoch
        return dist.shard_indices(self._perm, self.rank, self.world_size, self.batch, i)

    def fetch(self, step: int) -> Batch:
        """The batch of `step`, synchronously, ready to use on the device."""
        return self._ready(self._read(step))

    def batches(self, start: int, stop: int) -> Iterator[Batch]:
        """Steps start .. stop-1. A store's batches are read `prefetch` steps ahead in one
        background thread (one thread keeps the order, and the reads are I/O or PIL/numpy
        copies that release the GIL); closing the iterator (or breaking out of the loop that
        drives it) cancels what is still queued."""
        if not self.streamed or self.prefetch < 1:
            for step in range(start, stop):
                yield self.fetch(step)
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="ssl-lab-loader")
        pending: deque[Future] = deque()
        try:
            for step in range(start, stop):
                while len(pending) < self.prefetch and step + len(pending) < stop:
                    pending.append(pool.submit(self._read, step + len(pending)))
                yield self._ready(pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
        idx = self.indices(step)
        if not self.streamed:
            return self._images[idx], self._labels[idx], None
        rows = idx.numpy()
        if self._stream is None:
            return _read_rows(self._images, rows, self.device), self._labels[idx], None
        with torch.cuda.stream(self._stream):  # copies overlap the compute stream's work
            x = _read_rows(self._images, rows, self.device)
            if x.device.type == "cpu":
                x = x.pin_memory().to(self.device, non_blocking=True)
            y = self._labels[idx].pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return x, y, done

    def _ready(self, item: tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]) -> Batch:
        x, y, done = item
        if done is not None:  # the compute stream waits for the copy, and owns the memory after
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)
            y.record_stream(stream)
        return x, y


def _read_rows(images: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (n, H, W, C) tensor of `rows`: a store decodes where it can (the GPU for JPEG with
    torchvision), a plain memory map copies the rows out."""
    fetch = getattr(images, "fetch", None)
    return fetch(rows, device) if fetch else torch.from_numpy(np.ascontiguousarray(images[rows]))
