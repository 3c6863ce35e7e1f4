"""Packed stores: any source as uint8 images at one resolution, memory-mapped, with labels.

`pack(SOURCE, DEST)` (CLI: `ssl-lab data pack`) reads a source once (ImageFolder files are
streamed, never all in RAM) and writes DEST/:

    header.json              format, version, source, resolution, channels, encoding, classes,
                             per-split shape and the size + sha256 of every file below
    <split>.images.npy       raw encoding: uint8 (N, H, W, C), read with np.load(mmap_mode="r")
    <split>.jpeg             jpeg encoding: the images' JPEG files back to back ...
    <split>.offsets.npy      ... and int64 (N + 1,) byte offsets into it
    <split>.labels.npy       int64 (N,) or (N, F)

for the source's splits (train, test and val when the source has its own). Images are resized
(shorter side to R, centre crop; or `fit=pad`: longer side to R, centred on black); without
`resolution` they keep the size `data.name=SOURCE` gives, so `packed:DEST` trains exactly like
SOURCE. Everything is written in a hidden sibling folder renamed to DEST once complete (an
interrupted pack leaves nothing that opens as a store); re-packing a finished store is a no-op.

`open_store(DEST)` reads the header only: pixels are read from the memory map, a batch at a
time (`StoreImages`); JSON and `.npy` with allow_pickle=False only, nothing is unpickled.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssl_lab import __version__
from ssl_lab.checkpoint import fsync_dir, sha256_file
from ssl_lab.config import parse_override
from ssl_lab.data import imagefolder
from ssl_lab.data.splits import Loaded, Split, count_classes
from ssl_lab.errors import UserError

FORMAT, VERSION, HEADER = "ssl-lab-store", 1, "header.json"
SPLITS = ("train", "val", "test")
FITS = ("crop", "pad")
ENCODINGS = ("raw", "jpeg")
_CHUNK = 256  # images in flight per pack worker round: bounded memory, ordered output


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PackOptions:
    resolution: int | None = None  # square side; None: the size `data.name=SOURCE` gives
    max_side: int | None = None  # caps that default size (ImageFolder: 64 when not given)
    fit: str = "crop"
    encoding: str = "raw"
    quality: int = 90  # JPEG quality (jpeg encoding)
    root: str | None = None  # data.root for the source
    workers: int = 2  # decoding threads (PIL releases the GIL while it decodes and resizes)

    def __post_init__(self) -> None:
        for key in ("resolution", "max_side"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise UserError(f"pack option {key} must be a positive integer, got {value!r}")
        if self.resolution is not None and self.max_side is not None:
            raise UserError("give pack option resolution= or max_side=, not both")
        if self.fit not in FITS or self.encoding not in ENCODINGS:
            raise UserError(f"pack options: fit must be one of {', '.join(FITS)} and encoding "
                            f"one of {', '.join(ENCODINGS)}, got fit={self.fit!r} "
                            f"encoding={self.encoding!r}")
        if not _is_int(self.quality) or not 1 <= self.quality <= 100 or not _is_int(self.workers) \
                or self.workers < 1:
            raise UserError(f"pack options: quality must be in 1..100 and workers >= 1, got "
                            f"quality={self.quality!r} workers={self.workers!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_options(args: list[str]) -> PackOptions:
    """`key=value` command-line arguments (values read as YAML) -> PackOptions."""
    names = list(PackOptions.__dataclass_fields__)
    given = dict(parse_override(a) for a in args)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UserError(f"unknown pack option '{unknown[0]}'; options: {', '.join(names)}")
    if given.get("root") is not None:
        given["root"] = str(given["root"])
    return PackOptions(**given)


# ----------------------------------------------------------------------------- what to write


@dataclass
class _SplitPlan:
    labels: np.ndarray
    shape: tuple[int, int, int]  # H, W, C
    item: Callable[[int], np.ndarray | bytes]  # image i: uint8 (H, W, C) or JPEG bytes of it

    @property
    def count(self) -> int:
        return len(self.labels)


@dataclass
class _Plan:
    splits: dict[str, _SplitPlan]
    meta: dict[str, Any] = field(default_factory=dict)  # classes, factors: copied to the header


def _plan(kind: str, arg: str | None, opts: PackOptions) -> _Plan:
    if kind == "imagefolder":
        return _plan_folder(arg, opts)
    from ssl_lab.data.sources import SOURCES  # sources imports this module for `packed:`

    loaded = SOURCES[kind][0](opts.root, arg)
    meta = {"factor_names": loaded.factor_names,
            "num_classes": loaded.num_classes or count_classes(loaded),
            "class_names": loaded.class_names, "default_target": loaded.default_target}
    splits = {name: _plan_array(split, opts) for name in SPLITS
              if (split := getattr(loaded, name)) is not None}
    return _Plan(splits, meta)


def _plan_array(split: Split, opts: PackOptions) -> _SplitPlan:
    """Arrays keep their (H, W) unless a resolution (or a max_side below it) asks otherwise."""
    from PIL import Image

    images = split.images
    h, w, c = images.shape[1:]
    side = opts.resolution or (opts.max_side if opts.max_side and opts.max_side < min(h, w)
                               else None)
    shape = (side, side, c) if side else (h, w, c)

    def item(i: int) -> np.ndarray | bytes:
        img = images[i]
        if side and (h, w) != (side, side):
            img = imagefolder.fit_image(Image.fromarray(img[..., 0] if c == 1 else img),
                                        side, c == 1, opts.fit)
        return _encode_jpeg(img, opts.quality) if opts.encoding == "jpeg" else img

    return _SplitPlan(split.labels, shape, item)


def _plan_folder(arg: str | None, opts: PackOptions) -> _Plan:
    """ImageFolder files are streamed: decoded and resized one at a time while writing."""
    folder = imagefolder.index_imagefolder(arg)
    side = opts.resolution or min(folder.min_side, opts.max_side or imagefolder.MAX_SIZE)
    mode = "L" if folder.gray else "RGB"
    shape = (side, side, 1 if folder.gray else 3)

    def reader(files: list[Path]) -> Callable[[int], np.ndarray | bytes]:
        def item(i: int) -> np.ndarray | bytes:
            with imagefolder._open(files[i]) as im:
                if opts.encoding == "jpeg" and im.format == "JPEG" and im.mode == mode \
                        and im.size == (side, side):
                    return files[i].read_bytes()  # already what we would write: keep its bytes
                img = imagefolder.fit_image(im, side, folder.gray, opts.fit)
            return _encode_jpeg(img, opts.quality) if opts.encoding == "jpeg" else img
        return item

    splits = {s: _SplitPlan(folder.labels[s], shape, reader(f)) for s, f in folder.files.items()}
    meta = {"factor_names": ["label"], "num_classes": [len(folder.class_names)],
            "class_names": [folder.class_names], "default_target": None}
    return _Plan(splits, meta)


def _encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decode_jpeg(blob: np.ndarray | bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return arr.reshape(*arr.shape[:2], channels)


# ----------------------------------------------------------------------------- writing


def pack(source: str, dest: str | Path, opts: PackOptions | None = None, progress: bool = True
         ) -> tuple[Path, bool]:
    """Pack `source` (a data.name) into the store `dest`; (dest, False) if it was already there."""
    from ssl_lab.data.sources import parse_name

    opts = opts or PackOptions()
    dest = Path(dest).expanduser()
    kind, arg = parse_name(source)
    if kind == "packed":
        raise UserError(f"{source} is already a packed store: pack its original source")
    if (dest / HEADER).is_file():
        _check_same(read_header(dest), source, opts, dest)
        return dest, False
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not a packed store; choose a new DEST")
    start = time.perf_counter()
    plan = _plan(kind, arg, opts)  # reads (or indexes) the source: every input error is raised here
    _remove_stale_partials(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        split_meta = {name: _write_split(tmp, name, sp, opts, progress)
                      for name, sp in plan.splits.items()}
        first = next(iter(plan.splits.values()))
        header = {"format": FORMAT, "version": VERSION, "source": source.strip(),
                  "split_key": kind, "encoding": opts.encoding, "fit": opts.fit,
                  "quality": opts.quality if opts.encoding == "jpeg" else None,
                  "resolution": opts.resolution, "max_side": opts.max_side,
                  "image_shape": list(first.shape), "dtype": "uint8", **plan.meta,
                  "splits": split_meta, "pack_s": round(time.perf_counter() - start, 3),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "ssl_lab_version": __version__}
        (tmp / HEADER).write_text(json.dumps(header, indent=1))  # last: it marks completion
        fsync_dir(tmp)
        if dest.exists():
            dest.rmdir()  # an empty folder (checked above)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing left after the rename
    return dest, True


def _write_split(tmp: Path, name: str, sp: _SplitPlan, opts: PackOptions, progress: bool
                 ) -> dict[str, Any]:
    items = tqdm(_ordered_map(sp.item, sp.count, opts.workers), total=sp.count,
                 desc=f"pack {name}", unit="img", disable=not progress, leave=False)
    files = {"labels": f"{name}.labels.npy"}
    np.save(tmp / files["labels"], np.ascontiguousarray(sp.labels, dtype=np.int64))
    if opts.encoding == "raw":
        files["images"] = f"{name}.images.npy"
        out = np.lib.format.open_memmap(tmp / files["images"], mode="w+", dtype=np.uint8,
                                        shape=(sp.count, *sp.shape))
        for i, img in enumerate(items):
            out[i] = img
        out.flush()
        del out  # closes the map before the checksum reads the file
    else:
        files["images"], files["offsets"] = f"{name}.jpeg", f"{name}.offsets.npy"
        offsets = np.zeros(sp.count + 1, np.int64)
        with open(tmp / files["images"], "wb") as handle:
            for i, blob in enumerate(items):
                handle.write(blob)
                offsets[i + 1] = offsets[i] + len(blob)
        np.save(tmp / files["offsets"], offsets)
    return {"count": sp.count, "shape": [sp.count, *sp.shape],
            "files": {role: {"name": f, "bytes": (tmp / f).stat().st_size,
                             "sha256": sha256_file(tmp / f)} for role, f in files.items()}}


def _ordered_map(fn: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
    """fn(0), ..., fn(n - 1) in order, `workers` threads at a time, _CHUNK items in flight."""
    if workers <= 1:
        yield from map(fn, range(n))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ssl-lab-pack") as pool:
        for start in range(0, n, _CHUNK):
            yield from pool.map(fn, range(start, min(n, start + _CHUNK)))


def _remove_stale_partials(dest: Path) -> None:
    """Partial folders of packs that died (kill -9): hidden, never read, removed on the next run."""
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_same(header: dict, source: str, opts: PackOptions, dest: Path) -> None:
    """A finished store satisfies a request that names the same source and no other setting."""
    wanted = {"source": source.strip(), "encoding": opts.encoding, "fit": opts.fit}
    if opts.resolution is not None:
        wanted["resolution"] = opts.resolution
    if opts.max_side is not None:
        wanted["max_side"] = opts.max_side
    if opts.encoding == "jpeg":
        wanted["quality"] = opts.quality
    differ = {k: header.get(k) for k, v in wanted.items() if header.get(k) != v}
    if differ:
        found = ", ".join(f"{k}={'the source size' if v is None else v}" for k, v in differ.items())
        raise UserError(f"{dest} is already a store packed with {found}; delete it or choose "
                        "another DEST")


# ----------------------------------------------------------------------------- reading


def read_header(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not (path / HEADER).is_file():
        partial = list(path.parent.glob(f".{path.name}.partial-*"))
        why = " (an unfinished pack is next to it: run `ssl-lab data pack` again)" if partial \
            else ""
        raise UserError(f"{path} is not a packed store (no {HEADER}){why}; make one with "
                        "`ssl-lab data pack SOURCE DEST`")
    try:
        header = json.loads((path / HEADER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / HEADER} is unreadable ({e}): pack the store again") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{path / HEADER} is not an ssl-lab store header: pack the store again")
    if header.get("version") != VERSION:
        raise UserError(f"{path} is store version {header.get('version')}, this ssl-lab reads "
                        f"version {VERSION}: pack it again")
    return header


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


class _JpegReader:
    """JPEG blobs in one file (memory-mapped) and their offsets; decoded a batch at a time."""

    def __init__(self, file: Path, offsets: Path, shape: tuple[int, ...]):
        self.blobs = np.memmap(file, np.uint8, mode="r") if file.stat().st_size else \
            np.zeros(0, np.uint8)
        self.offsets = _load_npy(offsets)
        self.shape = shape

    def _blob(self, i: int) -> np.ndarray:
        return np.array(self.blobs[self.offsets[i]:self.offsets[i + 1]])

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), np.uint8)
        for k, i in enumerate(rows):
            out[k] = _decode_jpeg(self._blob(int(i)), self.shape[-1])
        return out

    def fetch(self, rows: np.ndarray, device: torch.device) -> torch.Tensor:
        """torchvision's batched decoder (on the GPU when `device` is one) when installed."""
        tv_io = _torchvision_io()
        if tv_io is None:
            return torch.from_numpy(self.read(rows))
        mode = tv_io.ImageReadMode.GRAY if self.shape[-1] == 1 else tv_io.ImageReadMode.RGB
        blobs = [torch.from_numpy(self._blob(int(i))) for i in rows]
        where = device if device.type == "cuda" else "cpu"
        decoded = tv_io.decode_jpeg(blobs, mode=mode, device=where)
        return torch.stack(decoded).permute(0, 2, 3, 1).contiguous()


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
    path: Path
    header: dict[str, Any]

    def images(self, split: str) -> StoreImages:
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
        info = self.header["splits"][split]
        labels = _load_npy(_check_file(self.path, info["files"]["labels"]))
        if len(labels) != info["count"] or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(f"store {self.path} is damaged: {split} labels do not match the "
                            "header; pack it again")
        return labels.astype(np.int64, copy=False)

    def split(self, name: str) -> Split | None:
        return Split(self.images(name), self.labels(name)) \
            if name in self.header["splits"] else None

    def loaded(self) -> Loaded:
        """What a source reader returns: the store's splits (lazy images), classes, factors."""
        h = self.header
        return Loaded(train=self.split("train"), test=self.split("test"), val=self.split("val"),
                      factor_names=h["factor_names"], num_classes=h["num_classes"],
                      class_names=h["class_names"], default_target=h["default_target"],
                      split_key=h["split_key"])


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
