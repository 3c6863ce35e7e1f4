"""Packed stores, the reading side: a store made by `ssl-lab data pack` (data/pack.py).

A store is a folder:

    header.json              format, version, source, resolution, channels, encoding, classes,
                             per-split shape and the size + sha256 of every file below
    <split>.images.npy       raw encoding: uint8 (N, H, W, C), read with np.load(mmap_mode="r")
    <split>.jpeg             jpeg encoding: the images' JPEG files back to back ...
    <split>.offsets.npy      ... and int64 (N + 1,) byte offsets into it
    <split>.labels.npy       int64 (N,) or (N, F)

for the source's splits (train, test, val when the source has its own, and unlabelled when it
has images without labels: STL-10, an ImageFolder with loose images). The header is
written last, so a folder without one is not a store (an interrupted pack).

`open_store(DEST)` reads the header only: pixels are read from the memory map, a batch at a
time (`StoreImages`); JSON and `.npy` with allow_pickle=False only, nothing is unpickled.
"""

from __future__ import annotations

import io
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_lab.checkpoint import sha256_file
from ssl_lab.config_io import short
from ssl_lab.data.formats import MAX_CLASSES
from ssl_lab.data.splits import UNLABELLED, Loaded, Split
from ssl_lab.errors import UserError
from ssl_lab.runtime import path_kind, read_json, short_path

FORMAT, VERSION, HEADER = "ssl-lab-store", 1, "header.json"


def read_header(path: str | Path) -> dict[str, Any]:
    """The header of the store at `path`, checked (format, version); a clear error otherwise."""
    path = Path(path).expanduser()
    if path_kind(path / HEADER, "the store") != "file":
        partial = list(path.parent.glob(f".{path.name}.partial-*"))
        why = " (an unfinished pack is next to it: run `ssl-lab data pack` again)" if partial \
            else ""
        raise UserError(f"{short_path(path)} is not a packed store (no {HEADER}){why}; make one "
                        "with `ssl-lab data pack SOURCE DEST`")
    header = read_json(path / HEADER, "store header", "pack the store again")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{short_path(path / HEADER)} is not an ssl-lab store header: pack the "
                        "store again")
    if header.get("version") != VERSION:
        raise UserError(f"{short_path(path)} is store version {short(header.get('version'), 20)}, "
                        f"this ssl-lab reads version {VERSION}: pack it again")
    problem = _header_problem(header)
    if problem:
        raise UserError(f"{path / HEADER} is damaged ({problem}): pack the store again")
    return header


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


# top-level header key -> its check; every key a reader or `describe` reads is here
_HEADER_CHECKS = {
    "source": lambda v: isinstance(v, str), "split_key": _str_or_none,
    "encoding": lambda v: v in ("raw", "jpeg"), "fit": lambda v: isinstance(v, str),
    "quality": lambda v: v is None or _is_int(v), "pack_s": lambda v: isinstance(v, (int, float)),
    "created": lambda v: isinstance(v, str), "default_target": _str_or_none,
    "image_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(_is_int(x, 1) for x in v),
    "factor_names": lambda v: isinstance(v, list) and len(v) > 0 and all(
        isinstance(x, str) for x in v),
    "num_classes": lambda v: isinstance(v, list) and all(
        _is_int(x) and x <= MAX_CLASSES for x in v),
    "class_names": lambda v: v is None or (isinstance(v, list) and all(
        x is None or (isinstance(x, list) and all(isinstance(n, str) for n in x)) for x in v)),
    "splits": lambda v: isinstance(v, dict) and "train" in v,
}


def _header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a parsed header (keys, types, files), or None."""
    for key, ok in _HEADER_CHECKS.items():
        if key not in header:
            return f"no '{key}'"
        if not ok(header[key]):
            return f"'{key}' is {short(header[key])}"
    if len(header["num_classes"]) != len(header["factor_names"]):
        return "num_classes and factor_names differ in length"
    for name, split in header["splits"].items():
        problem = _split_problem(split, header)
        if problem:
            return f"split '{str(name)[:20]}': {problem}"
    return None


def _split_problem(split: Any, header: dict[str, Any]) -> str | None:
    roles = {"labels", "images", "offsets"} if header["encoding"] == "jpeg" else {"labels", "images"}
    if not isinstance(split, dict) or not _is_int(split.get("count")):
        return "no image count"
    shape = split.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(_is_int(x) for x in shape)
            and shape[0] == split["count"] and min(shape[1:]) >= 1):
        return f"shape {short(shape)} is not [count, H, W, C]"
    files = split.get("files")
    if not isinstance(files, dict) or set(files) != roles:
        return f"files must be {', '.join(sorted(roles))}"
    for info in files.values():
        if not (isinstance(info, dict) and _is_int(info.get("bytes"))
                and isinstance(info.get("sha256"), str) and isinstance(info.get("name"), str)):
            return "a file entry lacks name, bytes or sha256"
        if Path(info["name"]).name != info["name"] or info["name"] in ("", ".", ".."):
            # a name with a folder in it could point anywhere on the machine
            return f"file name {short(info['name'])} is not a plain file name"
    return None


def _check_file(path: Path, info: dict[str, Any]) -> Path:
    file = path / info["name"]
    size = file.stat().st_size if file.is_file() else None
    if size != info["bytes"]:
        raise UserError(f"store {path} is damaged: {info['name']} has {size} bytes, the header "
                        f"says {info['bytes']}; pack it again")
    return file


def _load_npy(file: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{file} is not a plain .npy array ({e}): pack the store again") from None


def _decode_jpeg(blob: np.ndarray | bytes, shape: tuple[int, ...], where: str) -> np.ndarray:
    """One stored JPEG as uint8 `shape` (H, W, C); a damaged one is a UserError naming `where`.
    The size in its header is checked before any pixel is decoded (a damaged header could
    claim 30000 x 30000)."""
    from PIL import Image

    height, width, channels = shape
    try:
        with Image.open(io.BytesIO(blob)) as im:
            if im.size != (width, height):
                raise ValueError(f"{im.size[0]}x{im.size[1]}, the header says {width}x{height}")
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError too
        raise UserError(f"{where} is damaged ({str(e)[:80]}): pack the store again") from None
    return arr.reshape(height, width, channels)


class _RawReader:
    """Rows of a uint8 (N, H, W, C) .npy through a read-only memory map."""

    def __init__(self, file: Path):
        self.array = _load_npy(file, mmap=True)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            return np.array(self.array[rows[0]:rows[-1] + 1])  # one sequential read
        order = np.argsort(rows, kind="stable")  # file order: readahead helps on disks
        out = np.empty((len(rows), *self.array.shape[1:]), np.uint8)
        out[order] = self.array[rows[order]]
        return out

    def fetch(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.read(rows))

    def release_pages(self) -> None:
        _release(self.array)


def _release(mapped_array: np.ndarray) -> None:
    """madvise(DONTNEED) on a memory map: the pages read so far leave this process's RSS (the
    page cache keeps them, so reading them again costs no I/O)."""
    mapped = getattr(mapped_array, "_mmap", None)
    if mapped is not None:
        mapped.madvise(mmap.MADV_DONTNEED)


class _JpegReader:
    """JPEG blobs in one file (memory-mapped) and their offsets; decoded a batch at a time."""

    def __init__(self, file: Path, offsets: Path, shape: tuple[int, ...]):
        self.blobs = np.memmap(file, np.uint8, mode="r") if file.stat().st_size else \
            np.zeros(0, np.uint8)
        self.offsets = _load_npy(offsets)
        self.shape, self.file = shape, file
        ends = self.offsets
        if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer) or (len(ends) and (
                ends[0] != 0 or ends[-1] != len(self.blobs) or np.any(np.diff(ends) < 0))):
            raise UserError(f"store file {offsets} is damaged (offsets do not index "
                            f"{file.name}): pack the store again")

    def release_pages(self) -> None:
        _release(self.blobs)

    def _blob(self, i: int) -> np.ndarray:
        return np.array(self.blobs[self.offsets[i]:self.offsets[i + 1]])

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), np.uint8)
        for k, i in enumerate(rows):
            out[k] = _decode_jpeg(self._blob(int(i)), self.shape, f"image {i} of {self.file}")
        return out

    def fetch(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """torchvision's batched decoder (on the GPU when `device` is one) when installed."""
        tv_io = _torchvision_io()
        if tv_io is None:
            return torch.from_numpy(self.read(rows))
        mode = tv_io.ImageReadMode.GRAY if self.shape[-1] == 1 else tv_io.ImageReadMode.RGB
        blobs = [torch.from_numpy(self._blob(int(i))) for i in rows]
        where = device if device.type == "cuda" else "cpu"
        try:
            decoded = torch.stack(tv_io.decode_jpeg(blobs, mode=mode, device=where))
        except RuntimeError:  # a damaged JPEG or another size: PIL's path names the image
            return torch.from_numpy(self.read(rows))
        if tuple(decoded.shape[1:]) != (self.shape[2], *self.shape[:2]):
            return torch.from_numpy(self.read(rows))
        return decoded.permute(0, 2, 3, 1).contiguous()


def _torchvision_io():
    try:
        from torchvision import io as tv_io
    except Exception:  # not installed, or built against another torch: PIL decodes instead
        return None
    return tv_io


class StoreImages:
    """One split's images: a read-only uint8 (N, H, W, C) array-like over the memory map.

    Indexing with an int, a slice or an integer array reads just those rows into a fresh
    ndarray; `select(idx)` is a lazy subset (the val carve and data.fraction use it, so a
    training split never has to be copied into RAM); `np.asarray(x)` reads every row.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, reader: _RawReader | _JpegReader, shape: tuple[int, ...],
                 rows: np.ndarray | None = None):
        self._reader, self._rows = reader, rows
        self.shape = (shape[0] if rows is None else len(rows), *shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def _absolute(self, rows: np.ndarray) -> np.ndarray:
        return rows if self._rows is None else self._rows[rows]

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = np.arange(len(self))[key]  # normalises slices, negatives and bounds
        return self._reader.read(self._absolute(rows.astype(np.int64)))

    def fetch(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """The loader's path: uint8 (n, H, W, C) tensor, on `device` if the decoder put it there."""
        return self._reader.fetch(self._absolute(np.asarray(rows, np.int64)), device)

    def release_pages(self) -> None:
        """Drop the pages read so far from this process's RSS (evaluation calls it per block)."""
        self._reader.release_pages()

    def select(self, idx: np.ndarray) -> StoreImages:
        rows = np.arange(len(self))[idx].astype(np.int64)
        return StoreImages(self._reader, self.shape, self._absolute(rows))

    def reshape(self, *shape: int) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


@dataclass
class Store:
    """An opened store: its folder and its checked header (`open_store`)."""

    path: Path
    header: dict[str, Any]

    def images(self, split: str) -> StoreImages:
        """The split's images as lazy rows; a file whose size or shape is off is an error."""
        info = self.header["splits"][split]
        files = {role: _check_file(self.path, f) for role, f in info["files"].items()}
        shape = tuple(info["shape"])
        if self.header["encoding"] == "jpeg":
            offsets = files["offsets"]
            reader: _RawReader | _JpegReader = _JpegReader(files["images"], offsets, shape[1:])
            if len(reader.offsets) != shape[0] + 1:
                raise UserError(f"store {self.path} is damaged: {offsets.name} does not match "
                                f"{shape[0]} images; pack it again")
        else:
            reader = _RawReader(files["images"])
            if reader.array.dtype != np.uint8 or reader.array.shape != shape:
                raise UserError(f"store {self.path} is damaged: {files['images'].name} holds "
                                f"{reader.array.dtype} {reader.array.shape}, the header says "
                                f"uint8 {shape}; pack it again")
        return StoreImages(reader, shape)

    def labels(self, split: str) -> np.ndarray:
        """The split's int64 labels, (N,) or (N, F), checked against the header."""
        info = self.header["splits"][split]
        labels = _load_npy(_check_file(self.path, info["files"]["labels"]))
        if len(labels) != info["count"] or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"store {self.path} is damaged: {split} labels do not match the "
                            "header; pack it again")
        if not _labels_in_range(labels, split, self.header["num_classes"]):
            raise UserError(f"store {self.path} is damaged: {split} labels are not class indices "
                            f"below the header's num_classes {self.header['num_classes']}; pack "
                            "it again")
        return labels.astype(np.int64, copy=False)

    def split(self, name: str) -> Split | None:
        """The split `name`, or None when the store does not have it."""
        return Split(self.images(name), self.labels(name)) \
            if name in self.header["splits"] else None

    def loaded(self) -> Loaded:
        """What a source reader returns: the store's splits (lazy images), classes, factors."""
        h = self.header
        # a store written by from_dataset without test_ds has no test split: an empty one
        test = self.split("test") if "test" in h["splits"] else Split(
            np.zeros((0, *h["image_shape"]), np.uint8),
            np.zeros((0, *self.labels("train").shape[1:]), np.int64))
        return Loaded(train=self.split("train"), test=test, val=self.split("val"),
                      factor_names=h["factor_names"], num_classes=h["num_classes"],
                      class_names=h["class_names"], default_target=h["default_target"],
                      split_key=h["split_key"], unlabelled=self.split("unlabelled"))


def _labels_in_range(labels: np.ndarray, split: str, num_classes: list[int]) -> bool:
    """Class indices below the header's class counts (probes size their layers from them);
    the unlabelled split holds UNLABELLED only."""
    if not len(labels):
        return True
    columns = labels.reshape(len(labels), -1)
    if split == "unlabelled":
        return bool(np.all(columns == UNLABELLED))
    if columns.shape[1] != len(num_classes):
        return False
    return bool(np.all(columns >= 0) and np.all(columns < np.asarray(num_classes)))


def open_store(path: str | Path) -> Store:
    """The store at `path` (header and file sizes checked; no pixel is read)."""
    path = Path(path).expanduser()
    return Store(path, read_header(path))


def load_packed(root: str | None, arg: str | None) -> Loaded:
    """The `packed:PATH` source."""
    if not arg:
        raise UserError("packed needs a path: data.name=packed:PATH")
    return open_store(arg).loaded()


# ----------------------------------------------------------------------------- info


def verify(path: str | Path) -> list[str]:
    """Names of the store's files whose sha256 differs from the header's (reads every byte)."""
    store = open_store(path)
    return [f["name"] for s in store.header["splits"].values() for f in s["files"].values()
            if sha256_file(_check_file(store.path, f)) != f["sha256"]]


def describe(path: str | Path) -> str:
    """Human-readable summary of a store (`ssl-lab data info`)."""
    store = open_store(path)
    h = store.header
    total = sum(f["bytes"] for s in h["splits"].values() for f in s["files"].values())
    height, width, channels = h["image_shape"]
    encoding = h["encoding"] + (f" (quality {h['quality']})" if h["encoding"] == "jpeg" else "")
    names = h["class_names"][0] if h["class_names"] else None
    classes = f"{h['num_classes'][0]}" + (f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                                           if names else "")
    lines = [f"store     {store.path}", f"source    {h['source']}",
             f"images    {height}x{width}x{channels} uint8, {encoding}, fit={h['fit']}",
             f"classes   {classes}; factors {', '.join(h['factor_names'])}",
             f"size      {total / 2**20:.1f} MiB; packed in {h['pack_s']:.1f} s on {h['created']}"]
    for name, s in h["splits"].items():
        sums = ", ".join(f"{f['name']} {f['sha256'][:12]}" for f in s["files"].values())
        lines.append(f"{name:<9} {s['count']} images; sha256 {sums}")
    return "\n".join(lines)
