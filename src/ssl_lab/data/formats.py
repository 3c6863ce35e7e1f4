"""Byte-level readers for the standard on-disk formats (IDX, CIFAR/STL-10 binary, .npz).

Everything is parsed with `np.frombuffer` (`np.memmap` for STL-10's unlabelled file): no
torchvision, no pickle. Each reader checks magic numbers and byte counts so a truncated
download fails with a message naming the file instead of a reshape error deep in training.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ssl_lab.data.splits import UNLABELLED, Split
from ssl_lab.errors import UserError
from ssl_lab.runtime import path_kind


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix != ".gz":
        return raw
    try:
        # wbits=31: gzip container; one call is ~2x faster than gzip.open's chunked reads.
        return zlib.decompress(raw, 31)
    except zlib.error as e:
        raise UserError(f"{path} is not a valid gzip file ({e}): delete it and fetch it again") \
            from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080{ndim}) as a writable uint8 array."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(
            f"{path} is not an IDX uint8 file with {ndim} dims (bad magic number): "
            "delete it and fetch it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(dims)):
        raise UserError(
            f"{path} has {len(raw) - header} data bytes but its header {dims} needs "
            f"{int(np.prod(dims))} (truncated or corrupt): delete it and fetch it again"
        )
    # bytearray makes the array writable (torch.from_numpy warns on read-only buffers).
    return np.frombuffer(bytearray(raw), np.uint8, offset=header).reshape(dims)


def read_idx_split(images_path: Path, labels_path: Path) -> Split:
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            "labels: the files come from different releases, fetch both again"
        )
    return Split(images[..., None], labels.astype(np.int64))


def _records(path: Path, record: int, hint: str) -> np.ndarray:
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % record:
        raise UserError(
            f"{path} has {len(raw)} bytes, not a whole number of {record}-byte records "
            f"(truncated or wrong file): {hint}"
        )
    return np.frombuffer(raw, np.uint8).reshape(-1, record)


def read_cifar(paths: list[Path], n_label_bytes: int, num_classes: list[int], hint: str) -> Split:
    """CIFAR binary records: label byte(s), then 3072 bytes = R, G, B planes of 32x32."""
    recs = np.concatenate([_records(p, n_label_bytes + 3072, hint) for p in paths])
    labels = recs[:, :n_label_bytes].astype(np.int64)
    for k, n in enumerate(num_classes):
        if labels[:, k].max() >= n:
            raise UserError(f"{paths[0].parent} has label bytes >= {n}: {hint}")
    images = recs[:, n_label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if n_label_bytes == 1:
        labels = labels[:, 0].copy()
    return Split(np.ascontiguousarray(images), labels)


def read_stl10(x_path: Path, y_path: Path, hint: str) -> Split:
    """STL-10 binary: 96x96x3 column-major per channel, labels 1..10."""
    x = _records(x_path, 3 * 96 * 96, hint)
    y = _read_bytes(y_path)
    if len(y) != len(x):
        raise UserError(f"{y_path} has {len(y)} labels but {x_path} has {len(x)} images: {hint}")
    labels = np.frombuffer(y, np.uint8).astype(np.int64) - 1
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise UserError(f"{y_path} has labels outside 1..10 (wrong file?): {hint}")
    # As the official reader: (N, 3, 96, 96) then (0, 3, 2, 1) -- column-major swaps H and W.
    images = x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    return Split(np.ascontiguousarray(images), labels)


def read_stl10_unlabelled(x_path: Path, hint: str) -> Split:
    """STL-10's unlabeled_X.bin (100,000 images, the layout of train_X.bin), memory-mapped:
    its 2.7 GB are read a batch at a time, never copied into RAM as a whole."""
    record = 3 * 96 * 96
    try:
        size = x_path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {x_path}: {e.strerror or e}") from None
    if size == 0 or size % record:
        raise UserError(f"{x_path} has {size} bytes, not a whole number of {record}-byte images "
                        f"(truncated or wrong file): {hint}")
    x = np.memmap(x_path, np.uint8, mode="r", shape=(size // record, 3, 96, 96))
    # the orientation of read_stl10: a transposed view of the map, still lazy
    return Split(x.transpose(0, 3, 2, 1), np.full(len(x), UNLABELLED, np.int64))


# Probes allocate a layer with one output per class: a label of 2e9 in a user's file would ask
# for a 64 GB linear layer. No real dataset comes near this (ImageNet-21k: 21,841 classes).
MAX_CLASSES = 100_000


def check_labels(labels: np.ndarray, where: str) -> None:
    """Class indices must be integers in [0, MAX_CLASSES): one line naming `where` otherwise."""
    if not len(labels):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise UserError(f"{where}: label {low} is negative; labels must be class indices >= 0")
    if high >= MAX_CLASSES:
        raise UserError(f"{where}: label {high} is over the limit of {MAX_CLASSES:,} classes "
                        "(the probes allocate one output per class); use class indices "
                        "0, 1, 2, ...")


NPZ_LAYOUTS = "keys x_train,y_train,x_test,y_test (optional x_val,y_val) or images,labels"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz archive, never unpickling object arrays."""
    if path_kind(path, "npz file") != "file":
        raise UserError(f"npz file {path} not found: check the path in data.name=npz:PATH")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except ValueError as e:
        if "Object arrays" in str(e):
            raise UserError(
                f"{path} holds an object (pickled) array: save plain uint8 images and "
                "integer labels instead"
            ) from None
        raise UserError(f"{path} is not a readable .npz archive ({e}): re-save it") from None
    except (OSError, zipfile.BadZipFile, AttributeError) as e:
        # A plain .npy loads as an ndarray (no .files): AttributeError.
        raise UserError(f"{path} is not a readable .npz archive ({e}): re-save it with "
                        "np.savez") from None


def npz_split(path: Path, x: np.ndarray, y: np.ndarray, key: str) -> Split:
    """Check one (images, labels) pair from an npz and normalise to (N, H, W, C) / int64."""
    if x.dtype != np.uint8:
        raise UserError(f"{path}: {key} images are {x.dtype}, need uint8 (0..255)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{path}: {key} images have shape {x.shape}, need (N,H,W) or "
                        "(N,H,W,C) with C 1 or 3")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim not in (1, 2):
        raise UserError(f"{path}: {key} labels are {y.dtype} {y.shape}, need integer (N,) "
                        "or (N,F)")
    if len(y) != len(x):
        raise UserError(f"{path}: {key} has {len(x)} images but {len(y)} labels")
    if not len(x):
        raise UserError(f"{path}: {key} has no images; every split needs at least one")
    check_labels(y, f"{path}: {key}")
    return Split(np.ascontiguousarray(x), y.astype(np.int64))
