"""`imagefolder:PATH` -- folders of image files read with PIL, decoded once and cached.

Layout: if PATH has a `train/` folder, it and optional `val/` and `test/` siblings (same class
folder names) are the splits; a missing `test/` is carved from train (seeded 20%, stratified).
Otherwise PATH itself holds the class folders and test is carved the same way. Images directly
in PATH (or PATH/train) are unlabelled: SSL trains on them, the probes never see them. A folder
without any class sub-folder is an unlabelled dataset (empty train/test).

Size rule: every image is resized so its shorter side is S, then centre-cropped to S x S, with
S = `image_size` (data.image_size) when > 0, else the smallest shorter side capped at 224, so
that by default no image is upscaled. Images whose shorter side is below half the median are
outliers (a stray thumbnail would shrink the whole dataset): they are left out of that minimum,
upscaled, and named in a warning. Images are grayscale (C = 1) when every file is grayscale,
else RGB (alpha dropped); 16-bit grayscale is scaled to 8 bits. Files other than
png/jpg/jpeg/bmp/webp are ignored.

Cache: decoding runs in os.cpu_count() threads (PIL releases the GIL) straight into a packed
raw store (data/store.py) under $SSL_LAB_CACHE/imagefolder/<key>/ (default ~/.cache/ssl-lab);
the key hashes the folder's resolved path, every file's relative path, mtime and size, and the
requested size, so the next load reads the store and decodes nothing. An unwritable cache is
warned about once and the images are decoded into RAM instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_lab.config_io import cut, short
from ssl_lab.data.splits import UNLABELLED, Loaded, Split, holdout
from ssl_lab.errors import UserError
from ssl_lab.runtime import path_kind, short_path
from ssl_lab.seeding import HOLDOUT_SEED

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIZE = 224  # default cap on S: ImageNet's size; larger needs data.image_size
MAX_IMAGE_SIZE = 4096  # refuse data.image_size above this: 4096^2 x 3 bytes is 48 MiB per image
TEST_FRACTION = 0.2
WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # 16/32-bit grayscale
GRAY_MODES = {"1", "L", "LA", *WIDE_MODES}
IN_RAM_BYTES = 2 << 30  # cached folders up to this size are read into RAM, larger ones mapped
PROGRESS_MIN = 300  # fewer images decode too fast to need a progress bar
CACHE_VERSION = 1  # bump when the decoding rule changes: old cache entries are then ignored
_warned: set[str] = set()


def cache_root() -> Path:
    """ssl-lab's cache folder: $SSL_LAB_CACHE, else ~/.cache/ssl-lab."""
    value = os.environ.get("SSL_LAB_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "ssl-lab"


def check_image_size(image_size: int, key: str = "data.image_size") -> None:
    """A requested side must be 0 (the source's size) or 1..MAX_IMAGE_SIZE."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or not 0 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"{key}={short(image_size)} is out of range: use 0 (the source's size) or a "
                        f"side in pixels up to {MAX_IMAGE_SIZE}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"ssl-lab: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- decoding


def open_image(path: Path):  # -> PIL.Image.Image (PIL imported lazily: only this source needs it)
    """`Image.open(path)`; a file PIL cannot read, or one whose header claims more pixels than
    it decodes safely (a DecompressionBombError is no OSError), is one line naming it. Use it
    inside `bomb_guard()` to refuse the warning-sized bombs too."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {short_path(path)} is too large to decode safely ({cut(e, 120)}): "
                        "shrink it or remove it") from None
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {short_path(path)} ({cut(e, 120)}): delete or replace "
                        "it") from None


@contextmanager
def bomb_guard() -> Iterator[None]:
    """PIL's decompression-bomb warning raised as an error, for every thread while active.

    Set once around a whole parallel pass (warning filters are process-wide) so `open_image` turns
    it into a UserError naming the file instead of decoding a 100-megapixel image.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_8bit(im):  # PIL image -> PIL image
    """16/32-bit grayscale (PNG "I;16", "I") as 8-bit "L" on the full 0..65535 range; PIL's own
    convert("L") clips every value above 255 to white."""
    from PIL import Image

    if im.mode not in WIDE_MODES:
        return im
    wide = np.asarray(im).astype(np.float32)
    return Image.fromarray(np.clip(np.round(wide / 257), 0, 255).astype(np.uint8), "L")


def fit_image(im, size: int | tuple[int, int], gray: bool, fit: str = "crop") -> np.ndarray:
    """A PIL image as uint8 (H, W, C) of exactly `size` (an int: square): "crop" resizes the
    shorter side to fit and centre-crops, "pad" resizes the longer side and centres it on black."""
    from PIL import Image

    try:
        im = to_8bit(im).convert("L" if gray else "RGB")
    except OSError as e:  # truncated pixel data shows up only on decode
        name = short_path(getattr(im, "filename", ""))
        raise UserError(f"cannot decode image {name} ({cut(e, 120)}): delete or replace it"
                        ) from None
    out_h, out_w = (size, size) if isinstance(size, int) else size
    w, h = im.size
    if (w, h) != (out_w, out_h):
        pick = min if fit == "pad" else max
        scale = pick(out_w / w, out_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if fit == "crop":
            nw, nh = max(out_w, nw), max(out_h, nh)
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        if fit == "crop":
            left, top = (nw - out_w) // 2, (nh - out_h) // 2
            im = im.crop((left, top, left + out_w, top + out_h))
        else:
            canvas = Image.new(im.mode, (out_w, out_h))
            canvas.paste(im, ((out_w - nw) // 2, (out_h - nh) // 2))
            im = canvas
    return np.asarray(im).reshape(out_h, out_w, -1)


def read_image(path: Path, size: int, gray: bool, fit: str = "crop") -> np.ndarray:
    """The image file at `path` as uint8 (size, size, C) (see `fit_image`)."""
    with open_image(path) as im:
        return fit_image(im, size, gray, fit)


# ----------------------------------------------------------------------------- listing


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)


def _scan(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """(class name -> sorted image files for every non-hidden subfolder holding images, the
    images directly in `folder`)."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _images_in(sub)
        if files:
            classes[sub.name] = files
    loose = _images_in(folder)
    if not classes and not loose:
        raise UserError(
            f"no images found in {folder}: imagefolder expects {folder}/<class>/<image>.png, or "
            f"images directly in {folder} for unlabelled data (extensions "
            f"{', '.join(sorted(EXTENSIONS))})"
        )
    return classes, loose


def _split_folders(root: Path) -> dict[str, Path]:
    if path_kind(root, "the imagefolder path") != "dir":
        raise UserError(f"imagefolder path {root} is not a folder: fix data.name=imagefolder:PATH")
    if not (root / "train").is_dir():
        return {"train": root}
    return {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}


@dataclass
class FolderIndex:
    """What an image folder holds, from file names and image headers only (no pixels)."""

    # split -> files: train/test (test carved from train when absent), val if the folder has
    # one, and "unlabelled" when there are images outside class folders
    files: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    gray: bool  # every image is grayscale: C = 1
    sides: dict[Path, int]  # every image's shorter side

    @property
    def min_side(self) -> int:
        return min(self.sides.values())


def _list(arg: str | None) -> tuple[Path, dict[str, tuple[dict[str, list[Path]], list[Path]]]]:
    """(resolved root, split -> (class folders, loose images)): names only, no file opened."""
    if not arg:
        raise UserError("imagefolder needs a path: data.name=imagefolder:PATH")
    path_kind(Path(arg).expanduser(), "the imagefolder path")  # a name too long: one line
    root = Path(arg).expanduser().resolve()  # the cache key names the folder, not the spelling
    return root, {s: _scan(f) for s, f in _split_folders(root).items()}


def _labelled(scans, root: Path) -> tuple[dict[str, list[Path]], dict[str, np.ndarray], list[str]]:
    """Files and labels of the labelled splits (and of "unlabelled": loose train images)."""
    class_names = list(scans["train"][0])
    index = {c: k for k, c in enumerate(class_names)}
    files, labels = {}, {}
    for s, (classes, loose) in scans.items():
        where = root if s == "train" and not (root / "train").is_dir() else root / s
        if not classes or (loose and s != "train"):
            raise UserError(f"{where} has images outside class folders: give every split class "
                            "folders (unlabelled images go directly in the train folder)")
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise UserError(f"{where} has classes {unknown} missing from the train folder: "
                            "give every split the same class folders")
        files[s] = [f for fs in classes.values() for f in fs]
        labels[s] = np.concatenate([np.full(len(fs), index[c], np.int64)
                                    for c, fs in classes.items()])
    if scans["train"][1]:
        files["unlabelled"] = scans["train"][1]
    return files, labels, class_names


def _header(path: Path) -> tuple[int, bool]:
    with open_image(path) as im:  # PIL reads pixels lazily: this reads the header only
        return min(im.size), im.mode in GRAY_MODES


def index_imagefolder(arg: str | None) -> FolderIndex:
    """Index the folder `arg` (splits, classes, sizes) without decoding any pixel."""
    root, scans = _list(arg)
    return _index(root, scans)


def _index(root: Path, scans) -> FolderIndex:
    if any(classes for classes, _ in scans.values()):
        files, labels, class_names = _labelled(scans, root)
        if "test" not in files:
            keep, held = holdout(labels["train"], TEST_FRACTION, HOLDOUT_SEED)
            train = files["train"]
            files["train"], files["test"] = [train[i] for i in keep], [train[i] for i in held]
            labels["train"], labels["test"] = labels["train"][keep], labels["train"][held]
    else:  # no class folder anywhere: every image is unlabelled
        files = {"train": [], "test": [], "unlabelled": [f for _, fs in scans.values() for f in fs]}
        labels, class_names = {"train": np.zeros(0, np.int64), "test": np.zeros(0, np.int64)}, []
    if "unlabelled" in files:
        labels["unlabelled"] = np.full(len(files["unlabelled"]), UNLABELLED, np.int64)
    every = [f for fs in files.values() for f in fs]
    with bomb_guard(), ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        headers = list(pool.map(_header, every))
    sides = {f: side for f, (side, _) in zip(every, headers, strict=True)}
    gray = all(g for _, g in headers)
    return FolderIndex(files, labels, class_names, gray, sides)


def default_size(folder: FolderIndex, cap: int = MAX_SIZE) -> int:
    """S for `image_size=0`: the smallest shorter side (capped at `cap`), outliers aside.

    Shorter sides below half the median are outliers: left out of the minimum, upscaled, and
    named in a warning (a 1x1 icon would otherwise shrink the whole dataset to 1 px).
    """
    sides = np.array(list(folder.sides.values()))
    floor = np.median(sides) / 2
    side = min(cap, int(sides[sides >= floor].min()))
    small = {f: s for f, s in folder.sides.items() if s < floor}
    if small:
        worst = min(small, key=small.get)
        with open_image(worst) as im:
            w, h = im.size
        _warn_once(f"{len(small)} image(s) of the folder are much smaller than the rest and are "
                   f"upscaled to {side}x{side} (smallest: {worst}, {w}x{h}); set data.image_size "
                   "to choose the size")
    return side


# ----------------------------------------------------------------------------- loading


def _cache_key(root: Path, scans, image_size: int) -> str:
    """Hash of the folder's path, every file's name, mtime and size, and the requested size.

    S and gray/RGB are functions of the files (covered by mtime + size) and of the request, so
    hashing the request lets a cache hit skip even the header reads.
    """
    digest = hashlib.sha256(f"v{CACHE_VERSION}\0{root}\0{image_size}\0".encode())
    for classes, loose in scans.values():
        for f in [*loose, *(f for fs in classes.values() for f in fs)]:
            st = f.stat()
            digest.update(f"{f.relative_to(root)}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    return digest.hexdigest()[:24]


def _from_cache(dest: Path) -> Loaded | None:
    """The cached store at `dest` (in RAM when small), or None if absent or damaged."""
    from ssl_lab.data.store import HEADER, open_store

    if not (dest / HEADER).is_file():
        return None
    try:
        loaded = open_store(dest).loaded()
    except (UserError, OSError) as e:  # damaged: decode again
        _warn_once(f"ignoring the damaged imagefolder cache {dest} ({str(e)[:100]}); decoding "
                   "the images again")
        shutil.rmtree(dest, ignore_errors=True)
        return None
    parts = [s for s in (loaded.train, loaded.val, loaded.test, loaded.unlabelled) if s is not None]
    if sum(int(np.prod(s.images.shape)) for s in parts) <= IN_RAM_BYTES:
        for s in parts:
            s.images = np.asarray(s.images)
    return loaded


def _decode_to_ram(plan, workers: int, progress: bool) -> Loaded:
    """Every split of a pack plan decoded into RAM arrays (when the cache is unwritable)."""
    from tqdm import tqdm

    from ssl_lab.data.pack import ordered_map

    splits = {}
    for name, sp in plan.splits.items():
        out = np.empty((sp.count, *sp.shape), np.uint8)
        items = ordered_map(sp.item, sp.count, workers)
        for i, img in enumerate(tqdm(items, total=sp.count, desc=f"decode {name}", unit="img",
                                     disable=not progress or not sp.count, leave=False)):
            out[i] = img
        splits[name] = Split(out, sp.labels)
    meta = plan.meta
    return Loaded(train=splits["train"], test=splits["test"], val=splits.get("val"),
                  unlabelled=splits.get("unlabelled"), num_classes=meta["num_classes"],
                  class_names=meta["class_names"])


def load_imagefolder(arg: str | None, image_size: int = 0) -> Loaded:
    """The `imagefolder:PATH` source: decoded once (in parallel) into a cached store."""
    from ssl_lab.data import pack
    from ssl_lab.data.store import HEADER

    check_image_size(image_size)
    root, scans = _list(arg)
    dest = cache_root() / "imagefolder" / _cache_key(root, scans, int(image_size))
    cached = _from_cache(dest)
    if cached is not None:
        return cached
    folder = _index(root, scans)
    side = int(image_size) or default_size(folder)
    workers = os.cpu_count() or 1
    opts = pack.PackOptions(resolution=side, workers=workers)
    plan = pack.folder_plan(folder, side, opts)
    progress = len(folder.sides) > PROGRESS_MIN
    with bomb_guard():
        try:
            pack.write_store(dest, plan, {"source": f"imagefolder:{root}",
                                          "split_key": "imagefolder"}, opts, progress)
        except OSError as e:
            if (dest / HEADER).is_file():  # another process cached it first
                return _from_cache(dest) or _decode_to_ram(plan, workers, progress)
            _warn_once(f"cannot write the imagefolder cache under {dest.parent} ({e}); decoding "
                       "into RAM without caching (set SSL_LAB_CACHE to a writable folder)")
            return _decode_to_ram(plan, workers, progress)
    return _from_cache(dest) or _decode_to_ram(plan, workers, progress)
