"""Packing: any source as uint8 images at one resolution, in a store (format: data/store.py).

`pack(SOURCE, DEST)` (CLI: `ssl-lab data pack`) reads a source once (ImageFolder files are
streamed, never all in RAM) and writes the store DEST/ for the source's splits (train, test and
val when the source has its own). Images are resized (shorter side to R, centre crop; or
`fit=pad`: longer side to R, centred on black); without `resolution` they keep the size
`data.name=SOURCE` gives, so `packed:DEST` trains exactly like SOURCE. Everything is written in
a hidden sibling folder renamed to DEST once complete (an interrupted pack leaves nothing that
opens as a store); re-packing a finished store is a no-op. Reading a store: data/store.py.
"""

from __future__ import annotations

import errno
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
from tqdm import tqdm

from ssl_lab import __version__
from ssl_lab.checkpoint import fsync_dir, sha256_file
from ssl_lab.config_io import parse_override, short
from ssl_lab.data import imagefolder
from ssl_lab.data.sources import SOURCES, parse_name
from ssl_lab.data.splits import Split, count_classes
from ssl_lab.data.store import FORMAT, HEADER, VERSION, read_header
from ssl_lab.errors import UserError
from ssl_lab.rundir import check_usable
from ssl_lab.runtime import os_user_error, pid_alive

SPLITS = ("train", "val", "test", "unlabelled")
FITS = ("crop", "pad")
ENCODINGS = ("raw", "jpeg")
_CHUNK = 256  # images in flight per pack worker round: bounded memory, ordered output


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PackOptions:
    resolution: int | None = None  # square side; None: the size `data.name=SOURCE` gives
    max_side: int | None = None  # caps that default size (ImageFolder: 224 when not given)
    fit: str = "crop"
    encoding: str = "raw"
    quality: int = 90  # JPEG quality (jpeg encoding)
    root: str | None = None  # data.root for the source
    workers: int = 2  # decoding threads (PIL releases the GIL while it decodes and resizes)

    def __post_init__(self) -> None:
        for key in ("resolution", "max_side"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise UserError(f"pack option {key} must be a positive integer, got {short(value)}")
        if self.resolution is not None and self.max_side is not None:
            raise UserError("give pack option resolution= or max_side=, not both")
        if self.fit not in FITS or self.encoding not in ENCODINGS:
            raise UserError(f"pack options: fit must be one of {', '.join(FITS)} and encoding "
                            f"one of {', '.join(ENCODINGS)}, got fit={short(self.fit)} "
                            f"encoding={short(self.encoding)}")
        if not _is_int(self.quality) or not 1 <= self.quality <= 100 or not _is_int(self.workers) \
                or self.workers < 1:
            raise UserError(f"pack options: quality must be in 1..100 and workers >= 1, got "
                            f"quality={short(self.quality)} workers={short(self.workers)}")


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
    side = opts.resolution or imagefolder.default_size(folder, opts.max_side or imagefolder.MAX_SIZE)
    return folder_plan(folder, side, opts)


def folder_plan(folder: imagefolder.FolderIndex, side: int, opts: PackOptions) -> _Plan:
    """The plan that decodes an indexed image folder's files at `side` x `side`."""
    mode = "L" if folder.gray else "RGB"
    shape = (side, side, 1 if folder.gray else 3)

    def reader(files: list[Path]) -> Callable[[int], np.ndarray | bytes]:
        def item(i: int) -> np.ndarray | bytes:
            with imagefolder.open_image(files[i]) as im:
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


# ----------------------------------------------------------------------------- writing


def pack(source: str, dest: str | Path, opts: PackOptions | None = None, progress: bool = True
         ) -> tuple[Path, bool]:
    """Pack `source` (a data.name) into the store `dest`; (dest, False) if it was already there."""
    opts = opts or PackOptions()
    dest = Path(dest).expanduser()
    kind, arg = parse_name(source)
    if kind == "packed":
        raise UserError(f"{source} is already a packed store: pack its original source")
    try:
        done = (dest / HEADER).is_file()
    except OSError as exc:  # a name too long, a loop of links...
        raise os_user_error("cannot use DEST", dest, exc, "choose another DEST") from None
    if done:
        _check_same(read_header(dest), source, opts, dest)
        return dest, False
    check_usable(dest, "DEST")  # a file, under a file, too long, unwritable: before any reading
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} exists and is not a packed store; choose a new DEST")
    start = time.perf_counter()
    plan = _plan(kind, arg, opts)  # reads (or indexes) the source: every input error is raised here
    try:
        write_store(dest, plan, {"source": source.strip(), "split_key": kind}, opts, progress,
                    start)
    except OSError as exc:  # write_store has removed its partial folder
        raise os_user_error("cannot write the store", dest, exc, "nothing was kept") from None
    return dest, True


def write_store(dest: Path, plan: _Plan, names: dict[str, Any], opts: PackOptions,
                progress: bool, start: float | None = None) -> None:
    """Write `plan`'s splits as the store `dest` (hidden sibling, then renamed: see above).

    `names` gives the header's "source" and "split_key"; `start` is when reading began (for
    "pack_s"). An unwritable destination raises OSError with nothing left behind.
    """
    start = time.perf_counter() if start is None else start
    _remove_stale_partials(dest)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        split_meta = {name: _write_split(tmp, name, sp, opts, progress)
                      for name, sp in plan.splits.items()}
        first = next(iter(plan.splits.values()))
        header = {"format": FORMAT, "version": VERSION, **names,
                  "encoding": opts.encoding, "fit": opts.fit,
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


def write_items(dest: Path, splits: dict[str, tuple[np.ndarray, tuple[int, int, int],
                                                     Callable[[int], np.ndarray]]],
                meta: dict[str, Any], names: dict[str, Any], workers: int, progress: bool) -> None:
    """A raw store at `dest` from per-split (labels, (H, W, C), item(i) -> uint8 image)."""
    plan = _Plan({k: _SplitPlan(*v) for k, v in splits.items()}, meta)
    write_store(dest, plan, names, PackOptions(workers=max(1, workers)), progress)


def _write_split(tmp: Path, name: str, sp: _SplitPlan, opts: PackOptions, progress: bool
                 ) -> dict[str, Any]:
    files = {"labels": f"{name}.labels.npy"}
    np.save(tmp / files["labels"], np.ascontiguousarray(sp.labels, dtype=np.int64))
    # closed on an error too: a bar left on the line would prefix the one-line error message
    with tqdm(ordered_map(sp.item, sp.count, opts.workers), total=sp.count, desc=f"pack {name}",
              unit="img", disable=not progress or not sp.count, leave=False) as items:
        if opts.encoding == "raw":
            files["images"] = f"{name}.images.npy"
            _write_raw(tmp / files["images"], items, sp.count, sp.shape)
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


def _write_raw(path: Path, items: Iterator[np.ndarray], count: int, shape: tuple[int, ...]
               ) -> None:
    """A uint8 (count, *shape) .npy written image by image with plain writes.

    Not through a memory map: on a full disk a write to a mapped page that has no block behind
    it kills the process with SIGBUS (no message, nothing cleaned up), where a plain write raises
    OSError(ENOSPC). The space is reserved first, so a disk too small fails before any decoding.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, *shape)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        _reserve(handle, handle.tell() + count * int(np.prod(shape)))
        for img in items:
            handle.write(np.ascontiguousarray(np.broadcast_to(img, shape), np.uint8).tobytes())


def _reserve(handle: Any, size: int) -> None:
    """Allocate `size` bytes for the open file (ENOSPC now rather than hours into a pack); a file
    system that cannot reserve (EOPNOTSUPP...) is simply written without."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise


def ordered_map(fn: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
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
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


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
