"""Feature files: every selected layer's features of a split, written once, read in blocks.

`ssl-lab eval` writes DIR/<split>/<layer>.npy for each split in one forward pass over its
images: a standard .npy (N, D) array of float32 (`eval.feature_dtype=float16` halves the disk
and I/O, and rounds the features to 11 significant bits), so a kept folder opens with
`numpy.load(path, mmap_mode="r")`. The probes read them back through `Rows`: a block of rows
at a time with positioned reads, not through a memory map, because pages of a map that have
been read count in the process's RSS until it is unmapped, and the point is a peak RAM set by
the block size and the widest layer, not by the number of images.

`FeatureDir` owns the folder: a hidden `.eval-features-<pid>-...` folder (inside the run
directory, or `eval.feature_dir`) that is removed when the evaluation ends, normally or by an
error, unless `eval.keep_features=true` (then DIR = <run>/features/<dataset>/<encoder>).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ssl_lab.runtime import os_user_error, pid_alive

DTYPES = {"float32": np.float32, "float16": np.float16}
_STALE_PREFIX = ".eval-features-"


class Rows:
    """A split's features of one layer, (n, dim), read as float32 CPU tensors in blocks."""

    n: int
    dim: int

    def block(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def spans(self, block_rows: int) -> Iterator[tuple[int, int]]:
        """(start, stop) of consecutive blocks of at most block_rows, of near-equal sizes: no
        tiny last block, for which BLAS picks other kernels whose float rounding differs (a kNN
        tie must not depend on where a block ends)."""
        count = max(1, math.ceil(self.n / max(1, int(block_rows))))
        size = math.ceil(self.n / count) if self.n else 1
        for start in range(0, self.n, size):
            yield start, min(self.n, start + size)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """(start, rows start..stop-1) for the blocks of `spans`. A block is scratch: the caller
        may change it in place, and it is valid only until the next one is yielded (a file's
        blocks share one buffer), so a part kept longer must be copied."""
        for start, stop in self.spans(block_rows):
            yield start, self.block(start, stop)

    def materialize(self) -> Tensor:
        return self.block(0, self.n)

    def binarized(self) -> Rows:
        """(x > 0) as float: the binarised probe's input, made block by block."""
        return _Binarized(self)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole split as float32."""
        return 4 * self.n * self.dim


class TensorRows(Rows):
    def __init__(self, x: Tensor):
        self.x, (self.n, self.dim) = x, x.shape

    def block(self, start: int, stop: int) -> Tensor:
        return self.x[start:stop].to(torch.float32, copy=True)  # scratch: never the caller's x


def release_pages(images) -> None:
    """Pages of a packed store read through its memory map count in this process's RSS until
    released; stores that can release them (a `release_pages` method) do. The page cache
    keeps them, so reading them again costs no disk I/O."""
    release = getattr(images, "release_pages", None)
    if release is not None:
        release()


class ImageRows(Rows):
    """Raw pixels as features: uint8 images (N, H, W, C), an array or a packed store's rows,
    flattened to floats in [0, 1] (the pixel baseline; no file needed: the images are one)."""

    def __init__(self, images):
        self.images = images
        self.n, self.dim = int(images.shape[0]), int(np.prod(images.shape[1:]))

    def block(self, start: int, stop: int) -> Tensor:
        part = np.ascontiguousarray(self.images[start:stop])
        release_pages(self.images)
        return torch.from_numpy(part).flatten(1).float().div_(255)


class FileRows(Rows):
    """Rows of a .npy feature file, read with positioned reads."""

    def __init__(self, path: Path, n: int, dim: int, dtype: np.dtype, offset: int):
        self.path, self.n, self.dim, self.dtype = path, n, dim, np.dtype(dtype)
        self.offset = offset

    def _read(self, f, start: int, stop: int, into: np.ndarray) -> np.ndarray:
        count = (stop - start) * self.dim
        f.seek(self.offset + start * self.dim * self.dtype.itemsize)
        part = into[:count]
        if f.readinto(memoryview(part).cast("B")) != part.nbytes:
            raise OSError(f"{self.path} is shorter than its header says")
        return part.reshape(stop - start, self.dim)

    def block(self, start: int, stop: int) -> Tensor:
        with open(self.path, "rb") as f:
            data = self._read(f, start, stop, np.empty((stop - start) * self.dim, self.dtype))
        return torch.from_numpy(data).float()

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """One file handle and one buffer for every block: a fresh buffer per block would be
        page-faulted in again each time, which costs as much as the read itself."""
        spans = list(self.spans(block_rows))
        if not spans:
            return
        rows = max(stop - start for start, stop in spans)
        buffer = np.empty(rows * self.dim, self.dtype)
        as_float = None if self.dtype == np.float32 else torch.empty(rows, self.dim)
        with open(self.path, "rb") as f:
            for start, stop in spans:
                x = torch.from_numpy(self._read(f, start, stop, buffer))
                if as_float is not None:
                    x = as_float[:stop - start].copy_(x)
                yield start, x


class _Binarized(Rows):
    def __init__(self, rows: Rows):
        self.rows, self.n, self.dim = rows, rows.n, rows.dim

    def block(self, start: int, stop: int) -> Tensor:
        return (self.rows.block(start, stop) > 0).float()

    def blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        for start, x in self.rows.blocks(block_rows):
            yield start, x.gt_(0)  # a scratch block: binarised in place, no second buffer


# the fix that ends a feature file's OS error (the folder is removed either way)
_FIX = "set eval.feature_dir to a writable folder with free space"


class FeatureWriter:
    """Appends blocks of one layer's features to DIR/<split>/<layer>.npy (header first).

    An OS error (a full disk, a folder made read-only) is one line naming the file."""

    def __init__(self, path: Path, n: int, dim: int, dtype: str):
        self.path, self.n, self.dim, self.dtype = path, n, dim, np.dtype(DTYPES[dtype])
        self.rows = 0
        try:
            self.file = open(path, "wb")  # noqa: SIM115 (closed by finish)
        except OSError as exc:
            raise os_user_error("cannot write the feature file", path, exc, _FIX) from None
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (n, dim)}
        self._guard(lambda: np.lib.format.write_array_header_1_0(self.file, header))
        self.offset = self.file.tell()

    def _guard(self, act) -> None:
        """`act()`; on an OS error the file is closed and the error becomes one line."""
        try:
            act()
        except OSError as exc:
            self.file.close()
            raise os_user_error("cannot write the feature file", self.path, exc, _FIX) from None

    def write(self, block: Tensor) -> None:
        arr = block.detach().to("cpu", torch.float32).numpy()
        self._guard(lambda: np.ascontiguousarray(arr, dtype=self.dtype).tofile(self.file))
        self.rows += len(arr)

    def finish(self) -> FileRows:
        self._guard(self.file.close)  # the last buffered bytes reach the disk here
        if self.rows != self.n:
            raise RuntimeError(f"{self.path}: wrote {self.rows} rows, expected {self.n}")
        return FileRows(self.path, self.n, self.dim, self.dtype, self.offset)


class FeatureDir:
    """The folder of one encoder's feature files; removed on exit unless kept.

    Use as a context manager: the folder goes away after a normal run and after an error.
    """

    def __init__(self, base: Path, keep_as: Path | None = None):
        base = Path(base)
        where = base if keep_as is None else Path(keep_as)
        try:  # an unwritable or full eval.feature_dir is one line naming it
            if base.is_dir():
                remove_stale(base)
            if keep_as is not None:
                self.path, self.keep = Path(keep_as), True
                if self.path.exists():
                    shutil.rmtree(self.path)  # features of an earlier evaluation of that name
                self.path.mkdir(parents=True)
            else:
                base.mkdir(parents=True, exist_ok=True)
                self.path = Path(tempfile.mkdtemp(prefix=f"{_STALE_PREFIX}{os.getpid()}-",
                                                  dir=base))
                self.keep = False
        except OSError as exc:
            raise os_user_error("cannot make the feature folder", where, exc, _FIX) from None

    def writer(self, split: str, layer: str, n: int, dim: int, dtype: str) -> FeatureWriter:
        try:
            (self.path / split).mkdir(exist_ok=True)
        except OSError as exc:
            raise os_user_error("cannot make the feature folder", self.path / split, exc,
                                _FIX) from None
        return FeatureWriter(self.path / split / f"{layer}.npy", n, dim, dtype)

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> FeatureDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_stale(base: Path) -> None:
    """Remove feature folders left by evaluations that were killed (their process is gone)."""
    for folder in base.glob(f"{_STALE_PREFIX}*"):
        pid = folder.name[len(_STALE_PREFIX):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
