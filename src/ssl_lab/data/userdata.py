"""The user's own data as `DatasetSplits`: `from_arrays` (numpy) and `from_dataset` (torch).

Images become uint8 (N, H, W, C) with C 1 or 3; labels int64 class indices. Images given
without labels go to `unlabelled` (SSL trains on them, the probes never see them). Validation
is carved from the labelled train images with the seeded `carve_val` of `load_dataset` unless
given. The returned name is `f"{name}@{fingerprint}"`: 12 hex digits of a SHA-1 over the
shapes, labels and pixels (every pixel up to 256 MiB of images, else an evenly strided 16 MiB
sample; `from_dataset` hashes every item as read), so caches keyed by the dataset name (the
evaluation's baselines) never mistake one array for another.
"""

from __future__ import annotations

import hashlib
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssl_lab.data.formats import MAX_CLASSES
from ssl_lab.data.imagefolder import MAX_IMAGE_SIZE, PROGRESS_MIN, cache_root, fit_image, to_8bit
from ssl_lab.data.splits import UNLABELLED, DatasetSplits, Split, carve_val
from ssl_lab.errors import UserError
from ssl_lab.seeding import numpy_rng

MAX_IMAGES = 2**31
FULL_HASH_BYTES = 256 << 20
SAMPLE_BYTES = 16 << 20
Shape = tuple[int, int, int]


def _empty(shape: Shape) -> Split:
    return Split(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64))


def _unlabelled(images: Any) -> Split:
    return Split(images, np.full(len(images), UNLABELLED, np.int64))


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; float in [0, 1] rounded to 0..255; anything else a UserError."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise UserError(f"{what} is {x.dtype} {x.shape} with values outside [0, 1]: pass "
                            "uint8 (0..255) or floats in [0, 1]")
        return np.round(x * 255).astype(np.uint8)
    raise UserError(f"{what} is {x.dtype} {x.shape}: pass uint8 (0..255) or floats in [0, 1]")


def _as_images(x: Any, arg: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8/float images -> contiguous uint8 (N, H, W, C)."""
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{arg} is {x.dtype} {x.shape}: need (N, H, W) or (N, H, W, C) images "
                        "with C 1 or 3 (channels last)")
    n, h, w, _ = x.shape
    if not 0 < n <= MAX_IMAGES or not 1 <= min(h, w) <= max(h, w) <= MAX_IMAGE_SIZE:
        raise UserError(f"{arg} is {x.dtype} {x.shape}: need 1 to 2**31 images of at most "
                        f"{MAX_IMAGE_SIZE} x {MAX_IMAGE_SIZE} pixels")
    return np.ascontiguousarray(_to_uint8(x, arg))


def _as_labels(y: Any, n: int, arg: str) -> np.ndarray:
    y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise UserError(f"{arg} is {y.dtype} {y.shape}: need integer class indices of shape (N,)")
    if len(y) != n:
        raise UserError(f"{arg} has {len(y)} labels for {n} images: give one label per image")
    if len(y) and (y.min() < 0 or y.max() >= MAX_CLASSES):
        # the probes allocate one output per class: a label of 2e9 would ask for 64 GB
        raise UserError(f"{arg} has labels outside [0, {MAX_CLASSES:,}): use class indices from "
                        "0 (and labels=None for unlabelled images)")
    return y.astype(np.int64)


def _fingerprint(splits: list[Split | None]) -> str:
    """SHA-1 of every split's shape, labels and pixels (a strided sample of large ones)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for s in splits:
        if s is None:
            digest.update(b"-")
            continue
        flat = s.images.reshape(-1)
        step = 1 if flat.size <= FULL_HASH_BYTES else flat.size // SAMPLE_BYTES
        digest.update(f"{s.images.shape}".encode())
        digest.update(np.ascontiguousarray(s.labels).tobytes())
        digest.update(np.ascontiguousarray(flat[::step]).tobytes())
    return digest.hexdigest()[:12]


def _assemble(name: str, fingerprint: str, train: Split, val: Split | None, test: Split,
              unlabelled: Split | None, val_fraction: float, seed: int,
              class_names: list[str] | None) -> DatasetSplits:
    """The DatasetSplits of checked splits: val carved as load_dataset does, classes counted."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction={val_fraction} is out of range: use a number in [0, 1)")
    labelled = len(train) > 0
    if val is None:
        # seeded by the name as load_dataset seeds by the kind; nothing labelled: no val
        val = train
        if labelled:
            train, val = carve_val(train, val_fraction, numpy_rng(seed, zlib.crc32(name.encode()), 0))
    if labelled and len(train) == 0:
        raise UserError(f"{name} has no training images left after the validation split: lower "
                        "val_fraction or add data")
    labels = [s.labels for s in (train, val, test) if len(s)]
    top = max((int(y.max()) for y in labels), default=-1)
    if class_names is not None and top >= len(class_names):
        raise UserError(f"label {top} has no name: class_names has {len(class_names)} entries")
    num = len(class_names) if class_names is not None else top + 1
    return DatasetSplits(name=f"{name}@{fingerprint}", train=train, val=val, test=test,
                         factor_names=["label"], num_classes=[num],
                         class_names=None if class_names is None else [list(class_names)],
                         unlabelled=unlabelled)


def from_arrays(train_images: Any, train_labels: Any = None, test_images: Any = None,
                test_labels: Any = None, *, val_images: Any = None, val_labels: Any = None,
                name: str = "arrays", val_fraction: float = 0.1, seed: int = 0,
                class_names: list[str] | None = None) -> DatasetSplits:
    """Numpy images (uint8 (N, H, W[, C]) or floats in [0, 1]) and int labels as splits.

    `train_labels=None`: the train images are unlabelled (SSL only). Without test images the
    result has no probes (`has_labels` False). Every split must share one (H, W, C).
    """
    x = _as_images(train_images, "train_images")
    given = {}
    for split, images, labels in (("test", test_images, test_labels),
                                  ("val", val_images, val_labels)):
        if (images is None) != (labels is None):
            raise UserError(f"give {split}_images and {split}_labels together ({split} images "
                            "are for the probes, which need labels)")
        if images is not None:
            xs = _as_images(images, f"{split}_images")
            if xs.shape[1:] != x.shape[1:]:
                raise UserError(f"{split}_images are {xs.shape[1:]} (H, W, C) but train_images "
                                f"are {x.shape[1:]}: give every split one size (from_dataset "
                                "resizes)")
            given[split] = Split(xs, _as_labels(labels, len(xs), f"{split}_labels"))
    if train_labels is None:
        train, unlabelled = _empty(x.shape[1:]), _unlabelled(x)
    else:
        train, unlabelled = Split(x, _as_labels(train_labels, len(x), "train_labels")), None
    test = given.get("test", _empty(x.shape[1:]))
    fingerprint = _fingerprint([train, given.get("val"), test, unlabelled])
    return _assemble(name, fingerprint, train, given.get("val"), test, unlabelled,
                     val_fraction, seed, class_names)


# ----------------------------------------------------------------------------- from_dataset


def _item_label(label: Any, where: str) -> int | None:
    if label is None:
        return None
    arr = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
    if isinstance(label, bool) or arr.dtype == bool or arr.size != 1 \
            or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{where}: the label is {label!r:.60}; need an int class index (or None "
                        "for an unlabelled image)")
    value = int(arr.reshape(()))
    if not 0 <= value < MAX_CLASSES:
        raise UserError(f"{where}: label {value} is outside [0, {MAX_CLASSES:,}): class indices "
                        "start at 0 (the probes allocate one output per class); use None for an "
                        "unlabelled image")
    return value


def _item_image(image: Any, where: str) -> np.ndarray:
    """A PIL image, numpy array or tensor (HWC, CHW or HW; uint8 or float in [0, 1]) as uint8
    (H, W, C) at its own size."""
    from PIL import Image

    if isinstance(image, Image.Image):
        im = to_8bit(image)
        arr = np.asarray(im.convert("L" if im.mode in ("1", "L", "LA") else "RGB"))
        return arr.reshape(*arr.shape[:2], -1)
    if hasattr(image, "detach"):  # a torch tensor (bfloat16 has no numpy dtype)
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise UserError(f"{where}: the image is a {type(image).__name__}; need a PIL image, a "
                        "numpy array or a torch tensor")
    x = image[..., None] if image.ndim == 2 else image
    if x.ndim != 3:
        raise UserError(f"{where}: the image has shape {image.shape}; need one image per item: "
                        "(H, W), (H, W, C) or (C, H, W)")
    if x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)  # CHW (torchvision's ToTensor)
    if x.shape[-1] not in (1, 3) or min(x.shape[:2]) < 1:
        raise UserError(f"{where}: the image has shape {image.shape}; need 1 or 3 channels")
    return np.ascontiguousarray(_to_uint8(x, f"{where}: the image"))


def _read_item(ds: Any, i: int, arg: str) -> tuple[np.ndarray, int | None]:
    item = ds[i]
    where = f"{arg}[{i}]"
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise UserError(f"{where} is a {type(item).__name__} of {len(item)} items: return an "
                            "image or (image, label)")
        image, label = item
    else:
        image, label = item, None
    return _item_image(image, where), _item_label(label, where)


@dataclass
class _Scan:
    """The first pass over a dataset: every item's shape and label, its pixels while they fit."""

    ds: Any
    arg: str
    shapes: list[Shape] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # UNLABELLED where the item had none
    kept: list[np.ndarray] | None = field(default_factory=list)  # None: over budget, re-read
    digest: Any = field(default_factory=lambda: hashlib.sha1(usedforsecurity=False))

    def rows(self, labelled: bool) -> np.ndarray:
        return np.flatnonzero((np.array(self.labels, np.int64) != UNLABELLED) == labelled)

    def image(self, i: int) -> np.ndarray:
        return self.kept[i] if self.kept is not None else _read_item(self.ds, i, self.arg)[0]


def _first_pass(ds: Any, arg: str, budget: int, workers: int) -> _Scan:
    from tqdm import tqdm

    from ssl_lab.data.pack import ordered_map

    n = len(ds)
    scan, kept_bytes = _Scan(ds, arg), 0
    items = ordered_map(lambda i: _read_item(ds, i, arg), n, workers)
    for image, label in tqdm(items, total=n, desc=f"read {arg}", unit="img", leave=False,
                             disable=n <= PROGRESS_MIN):
        scan.shapes.append(image.shape)
        scan.labels.append(UNLABELLED if label is None else label)
        scan.digest.update(f"{image.shape}{label}".encode())
        scan.digest.update(image.tobytes())
        kept_bytes += image.nbytes
        if scan.kept is not None:  # pixels kept while they fit: no second read of the dataset
            if kept_bytes <= budget:
                scan.kept.append(image)
            else:
                scan.kept = None
    return scan


def _out_shape(scans: list[_Scan], image_size: int | None) -> Shape:
    """(H, W, C): image_size square; else all images' own size if they share one; else the
    smallest shorter side, square. C = 3 if any image is in colour."""
    shapes = [s for scan in scans for s in scan.shapes]
    channels = 3 if any(s[2] == 3 for s in shapes) else 1
    sizes = {s[:2] for s in shapes}
    if image_size:
        return image_size, image_size, channels
    if len(sizes) == 1:
        h, w = sizes.pop()
        if max(h, w) > MAX_IMAGE_SIZE:
            raise UserError(f"the images are {h}x{w}, over {MAX_IMAGE_SIZE} px: pass image_size")
        return h, w, channels
    side = min(min(s) for s in sizes)
    return side, side, channels


def _finish(image: np.ndarray, shape: Shape) -> np.ndarray:
    """One image at the output (H, W, C): shorter side resized and centre-cropped, grey
    repeated to RGB when the dataset has colour."""
    from PIL import Image

    h, w, channels = shape
    if image.shape[:2] != (h, w):
        gray = image.shape[2] == 1
        image = fit_image(Image.fromarray(image[..., 0] if gray else image), (h, w), gray)
    return np.repeat(image, channels, axis=2) if image.shape[2] != channels else image


def _split_items(scans: dict[str, _Scan], shape: Shape) -> dict[str, tuple]:
    """split -> (labels, shape, item(k) -> uint8 image): train/unlabelled from the train
    dataset's labelled/unlabelled items, test from the test dataset."""
    def items(scan: _Scan, rows: np.ndarray):
        return lambda k: _finish(scan.image(int(rows[k])), shape)

    train = scans["train"]
    parts = {"train": (train, train.rows(True)), "unlabelled": (train, train.rows(False))}
    if "test" in scans:
        parts["test"] = (scans["test"], np.arange(len(scans["test"].shapes)))
    out = {}
    for split, (scan, rows) in parts.items():
        labels = np.array(scan.labels, np.int64)[rows]
        if split != "unlabelled" or len(rows):
            out[split] = (labels, shape, items(scan, rows))
    return out


def _in_ram(items: dict[str, tuple], workers: int) -> dict[str, Split]:
    from tqdm import tqdm

    from ssl_lab.data.pack import ordered_map

    out = {}
    for split, (labels, shape, item) in items.items():
        images = np.empty((len(labels), *shape), np.uint8)
        for k, image in enumerate(tqdm(ordered_map(item, len(labels), workers), total=len(labels),
                                       desc=f"resize {split}", unit="img", leave=False,
                                       disable=len(labels) <= PROGRESS_MIN)):
            images[k] = image
        out[split] = Split(images, labels)
    return out


def _in_store(items: dict[str, tuple], dest: Path, meta: dict[str, Any], name: str,
              workers: int) -> dict[str, Split]:
    """The splits written once into a raw packed store at `dest` (reused when complete) and
    read back as lazy memory-mapped rows."""
    import shutil

    from ssl_lab.data import pack
    from ssl_lab.data.store import HEADER, open_store

    if (dest / HEADER).is_file():
        try:
            open_store(dest).loaded()
        except (UserError, OSError) as e:  # a damaged cache entry is written again, not fatal
            print(f"ssl-lab: warning: ignoring the damaged image store {dest} ({str(e)[:100]}); "
                  "writing it again", file=sys.stderr)
            shutil.rmtree(dest, ignore_errors=True)
    if not (dest / HEADER).is_file():
        try:
            pack.write_items(dest, items, meta, {"source": f"from_dataset:{name}",
                                                 "split_key": name}, workers, progress=True)
        except OSError as e:
            if not (dest / HEADER).is_file():  # else another process wrote it first
                raise UserError(f"cannot write the image store {dest} ({e}): pass cache_dir= a "
                                "writable folder, or raise max_ram_mb to keep the images in RAM"
                                ) from None
    store = open_store(dest)
    return {split: store.split(split) for split in items}


def from_dataset(train_ds: Any, test_ds: Any = None, *, image_size: int | None = None,
                 name: str = "dataset", val_fraction: float = 0.1, seed: int = 0,
                 max_ram_mb: float = 4096, cache_dir: str | Path | None = None,
                 workers: int = 0) -> DatasetSplits:
    """Map-style datasets (`len(ds)`, `ds[i]`) of `image` or `(image, label)` items as splits.

    An image is a PIL image, a numpy array or a tensor (HWC, CHW or HW; uint8 or float in
    [0, 1]); a label an int (or integer scalar) or None (unlabelled: SSL only; test items need
    labels). Images are resized (shorter side, centre crop) to `image_size`, or when None and
    their sizes differ to the smallest shorter side. Over `max_ram_mb` of uint8 pixels they
    are written once into a packed store under `cache_dir` (default $SSL_LAB_CACHE/datasets)
    and memory-mapped. `workers` > 0 reads items in that many threads. The dataset must give
    the same item for the same index every time (no random augmentation).
    """
    if image_size is not None:
        from ssl_lab.data.imagefolder import check_image_size

        check_image_size(image_size, "image_size")
        image_size = int(image_size) or None
    if not max_ram_mb >= 0:
        raise UserError(f"max_ram_mb={max_ram_mb} must be >= 0")
    budget = int(max_ram_mb * 2**20)
    scans = {"train": _first_pass(train_ds, "train_ds", budget, workers)}
    if test_ds is not None:
        scans["test"] = _first_pass(test_ds, "test_ds", budget, workers)
        missing = scans["test"].rows(False)
        if len(missing):
            raise UserError(f"test_ds[{missing[0]}] has no label: test images are for the "
                            "probes, give every test item a label")
    if not scans["train"].shapes:
        raise UserError("train_ds is empty: give it at least one image")
    shape = _out_shape(list(scans.values()), image_size)
    digest = hashlib.sha1(f"{shape}".encode(), usedforsecurity=False)
    for scan in scans.values():
        digest.update(scan.digest.digest())
    fingerprint = digest.hexdigest()[:12]
    items = _split_items(scans, shape)
    n_pixels = sum(len(labels) for labels, _, _ in items.values()) * int(np.prod(shape))
    if n_pixels <= budget:
        splits = _in_ram(items, workers)
    else:
        labelled = [labels for split, (labels, _, _) in items.items() if split != "unlabelled"]
        meta = {"factor_names": ["label"], "default_target": None, "class_names": None,
                "num_classes": [max((int(y.max()) for y in labelled if len(y)), default=-1) + 1]}
        base = Path(cache_dir).expanduser() if cache_dir else cache_root() / "datasets"
        folder = re.sub(r"[^\w.-]", "_", name)[:64]  # a name is not necessarily a file name
        splits = _in_store(items, base / f"{folder}@{fingerprint}", meta, name, workers)
    return _assemble(name, fingerprint, splits["train"], None, splits.get("test", _empty(shape)),
                     splits.get("unlabelled"), val_fraction, seed, None)
