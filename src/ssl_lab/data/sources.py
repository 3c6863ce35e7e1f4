"""Dataset sources: `load_dataset(name)` -> uint8 train/val/test splits with named labels.

Names are `kind` or `kind:ARG`; see `available_datasets()`:
- `fashion-mnist` -- IDX .gz files, looked up in `root` (or root/fashion-mnist), else
  $SSL_LAB_DATA/fashion-mnist, /usr/share/datasets/fashion-mnist (Debian package
  dataset-fashion-mnist), ~/.cache/ssl-lab/fashion-mnist; downloaded there when found nowhere.
- `digits` -- scikit-learn's 8x8 digits; a fixed stratified 20% is the test set.
- `shapes[:n=20000,size=32,seed=0]` -- procedural multi-factor images (see shapes.py).
- `cifar10`, `cifar100`, `stl10[:labelled]` -- the official *binary* archives in `root`,
  root/<folder> or $SSL_LAB_DATA/<folder>. CIFAR-100 labels are (N, 2): coarse, fine (default
  target fine). `stl10` is the papers' protocol: SSL on train + the 100,000 unlabelled images
  (unlabeled_X.bin, memory-mapped), probes on train/test; `stl10:labelled` leaves them out.
- `imagefolder:PATH` -- PATH/<class>/<image>, or loose images for unlabelled data, resized to
  `image_size` (see imagefolder.py); `npz:PATH` -- an .npz
  archive with x_train,y_train,x_test,y_test[,x_val,y_val] or images,labels (+ optional
  factor_names) -- test = a fixed stratified 20% for the latter.
- `packed:PATH` -- a store made by `ssl-lab data pack` (see store.py): images stay memory-mapped
  and are read a batch at a time; val is carved as for the store's source.

An explicit `root` is authoritative: if the files are not there it is an error, not a silent
fall back to another copy. Validation comes from train (seeded by the run seed and the dataset
kind, so it does not depend on where the files live) unless the source has its own. Unlabelled
images (`DatasetSplits.unlabelled`) are for SSL only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ssl_lab.config_io import short
from ssl_lab.data import formats
from ssl_lab.data.imagefolder import check_image_size, load_imagefolder
from ssl_lab.data.shapes import load_shapes
from ssl_lab.data.splits import (
    DatasetSplits,
    Loaded,
    Split,
    carve_val,
    count_classes,
    holdout,
    subset,
)
from ssl_lab.data.store import load_packed, read_header
from ssl_lab.errors import UserError
from ssl_lab.runtime import short_path
from ssl_lab.seeding import HOLDOUT_SEED, numpy_rng

__all__ = ["DatasetSplits", "Split", "available_datasets", "load_dataset"]

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer",
                 "dog", "horse", "monkey", "ship", "truck"]


def cache_dir() -> Path:
    """Where downloads go (~/.cache/ssl-lab)."""
    return Path.home() / ".cache" / "ssl-lab"


def _env_data() -> Path | None:
    value = os.environ.get("SSL_LAB_DATA")
    return Path(value).expanduser() if value else None


def _has_all(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _find(root: str | None, sub: str, names: list[str]) -> tuple[Path | None, list[Path]]:
    """The first candidate folder holding every file in `names`, and all candidates tried."""
    if root is not None:
        base = Path(root).expanduser()
        tried = [base / sub, base]
    else:
        env = _env_data()
        tried = [env / sub] if env else []
    return next((d for d in tried if _has_all(d, names)), None), tried


# --- fashion-mnist -----------------------------------------------------------------------


def download_fashion_mnist(dest: Path) -> None:
    """Fetch the four official .gz files into `dest` (each written atomically)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in [n for pair in FASHION_FILES.values() for n in pair]:
        if (dest / name).is_file():
            continue
        fd, tmp_name = tempfile.mkstemp(dir=dest, suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:  # a half-written file must never look like a complete one
            with urllib.request.urlopen(FASHION_URL + name, timeout=60) as resp, \
                    tmp.open("wb") as out:
                shutil.copyfileobj(resp, out)
            os.replace(tmp, dest / name)
        finally:
            tmp.unlink(missing_ok=True)


def _fashion_dir(root: str | None) -> Path:
    names = [n for pair in FASHION_FILES.values() for n in pair]
    found, tried = _find(root, "fashion-mnist", names)
    if found or root is not None:
        if found is None:
            raise UserError(f"Fashion-MNIST files ({', '.join(names)}) not found in "
                            f"{' or '.join(map(str, tried))}: fix data.root")
        return found
    for folder in (FASHION_SYSTEM_DIR, cache_dir() / "fashion-mnist"):
        if _has_all(folder, names):
            return folder
    dest = cache_dir() / "fashion-mnist"
    try:
        download_fashion_mnist(dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise UserError(
            f"Fashion-MNIST not found locally and the download from {FASHION_URL} failed "
            f"({e}): run `apt-get install dataset-fashion-mnist` or set SSL_LAB_DATA to a "
            "folder holding fashion-mnist/*.gz"
        ) from None
    return dest


def _load_fashion(root: str | None, arg: str | None) -> Loaded:
    folder = _fashion_dir(root)
    train, test = (formats.read_idx_split(*(folder / n for n in FASHION_FILES[s]))
                   for s in ("train", "test"))
    return Loaded(train=train, test=test, num_classes=[10], class_names=[FASHION_CLASSES])


# --- digits ------------------------------------------------------------------------------


def _load_digits(root: str | None, arg: str | None) -> Loaded:
    from sklearn.datasets import load_digits  # slow import: only when asked for

    bunch = load_digits()
    # Pixel values are 0..16: scale to the uint8 range every other source uses.
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    data = Split(images, bunch.target.astype(np.int64))
    keep, held = holdout(data.labels, 0.2, HOLDOUT_SEED)
    return Loaded(train=data.take(keep), test=data.take(held), num_classes=[10],
                  class_names=[[str(d) for d in range(10)]])


# --- cifar / stl10 -----------------------------------------------------------------------


def _binary_dir(root: str | None, sub: str, names: list[str], what: str, url: str) -> Path:
    found, tried = _find(root, sub, names)
    if found is None:
        where = " or ".join(map(str, tried)) if tried else "nowhere (no data.root, no SSL_LAB_DATA)"
        raise UserError(
            f"{what} binary files ({', '.join(names)}) not found in {where}: download the "
            f"binary version from {url}, extract it and set data.root or SSL_LAB_DATA"
        )
    return found


def _names_file(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return names or None


def _load_cifar10(root: str | None, arg: str | None) -> Loaded:
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    folder = _binary_dir(root, "cifar-10-batches-bin", [*train_names, "test_batch.bin"],
                         "CIFAR-10", url)
    hint = f"re-extract the binary version from {url}"
    train = formats.read_cifar([folder / n for n in train_names], 1, [10], hint)
    test = formats.read_cifar([folder / "test_batch.bin"], 1, [10], hint)
    return Loaded(train=train, test=test, num_classes=[10], class_names=[CIFAR10_CLASSES])


def _load_cifar100(root: str | None, arg: str | None) -> Loaded:
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    folder = _binary_dir(root, "cifar-100-binary", ["train.bin", "test.bin"], "CIFAR-100", url)
    hint = f"re-extract the binary version from {url}"
    train, test = (formats.read_cifar([folder / f"{s}.bin"], 2, [20, 100], hint)
                   for s in ("train", "test"))
    coarse = _names_file(folder / "coarse_label_names.txt")
    fine = _names_file(folder / "fine_label_names.txt")
    names = [coarse, fine] if coarse and fine else None
    return Loaded(train=train, test=test, factor_names=["coarse", "fine"],
                  num_classes=[20, 100], class_names=names, default_target="fine")


def _load_stl10(root: str | None, arg: str | None) -> Loaded:
    """`stl10`: train + unlabelled for SSL (the papers' protocol); `stl10:labelled`: train only."""
    if arg not in (None, "labelled"):
        raise UserError(f"unknown dataset stl10:{arg}: use data.name=stl10 (SSL on the labelled "
                        "and unlabelled images) or data.name=stl10:labelled")
    url = "https://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    folder = _binary_dir(root, "stl10_binary", names, "STL-10", url)
    hint = f"re-extract the binary version from {url}"
    train, test = (formats.read_stl10(folder / f"{s}_X.bin", folder / f"{s}_y.bin", hint)
                   for s in ("train", "test"))
    unlabelled = None
    if arg is None:
        path = folder / "unlabeled_X.bin"
        if not path.is_file():
            raise UserError(f"STL-10's unlabeled_X.bin is not in {folder}: extract it from {url} "
                            "(SSL trains on its 100,000 images), or use data.name=stl10:labelled "
                            "to train on the 5,000 labelled images only")
        unlabelled = formats.read_stl10_unlabelled(path, hint)
    return Loaded(train=train, test=test, num_classes=[10], class_names=[STL10_CLASSES],
                  unlabelled=unlabelled)


# --- npz / imagefolder ---------------------------------------------------------------------


def _npz_factor_names(path: Path, arrays: dict[str, np.ndarray], n_factors: int) -> list[str]:
    if "factor_names" not in arrays:
        return ["label"] if n_factors == 0 else [f"factor{k}" for k in range(n_factors)]
    names = [str(s) for s in np.atleast_1d(arrays["factor_names"])]
    if len(names) != max(n_factors, 1):
        raise UserError(f"{path}: factor_names has {len(names)} entries but labels have "
                        f"{max(n_factors, 1)} columns")
    return names


def _load_npz(root: str | None, arg: str | None) -> Loaded:
    if not arg:
        raise UserError("npz needs a path: data.name=npz:PATH")
    path = Path(arg).expanduser()
    arrays = formats.read_npz(path)
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise UserError(f"{path} has only one of x_val / y_val: save both or neither")
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        splits = {s: formats.npz_split(path, arrays[f"x_{s}"], arrays[f"y_{s}"], s)
                  for s in ("train", "val", "test") if f"x_{s}" in arrays}
    elif {"images", "labels"} <= arrays.keys():
        data = formats.npz_split(path, arrays["images"], arrays["labels"], "images")
        keep, held = holdout(data.labels, 0.2, HOLDOUT_SEED)
        if len(held) == 0:  # every class under 3 images: round(0.2 * n) holds none out
            raise UserError(f"{short_path(path)}: its {len(data)} images are too few to hold out "
                            "the 20% test split (it would be empty); add images, or save "
                            "x_train, y_train, x_test, y_test")
        splits = {"train": data.take(keep), "test": data.take(held)}
    else:
        raise UserError(f"{path} has keys {sorted(arrays)}; need {formats.NPZ_LAYOUTS}")
    first = splits["train"]
    for s, split in splits.items():
        if split.images.shape[1:] != first.images.shape[1:] or \
                split.labels.shape[1:] != first.labels.shape[1:]:
            raise UserError(f"{path}: {s} images/labels shapes {split.images.shape[1:]}/"
                            f"{split.labels.shape[1:]} differ from train's")
    n_factors = first.labels.shape[1] if first.labels.ndim == 2 else 0
    return Loaded(train=first, val=splits.get("val"), test=splits["test"],
                  factor_names=_npz_factor_names(path, arrays, n_factors))


# kind -> (reader(root, arg), takes an ARG?). A literal dict: adding a source is one line.
# Readers of RESIZING kinds also take `image_size=` (data.image_size).
SOURCES: dict[str, tuple[Callable[..., Loaded], bool]] = {
    "fashion-mnist": (_load_fashion, False),
    "digits": (_load_digits, False),
    "shapes": (lambda root, arg: load_shapes(arg), True),
    "cifar10": (_load_cifar10, False),
    "cifar100": (_load_cifar100, False),
    "stl10": (_load_stl10, True),
    "imagefolder": (lambda root, arg, image_size=0: load_imagefolder(arg, image_size), True),
    "npz": (_load_npz, True),
    "packed": (load_packed, True),
}
RESIZING = {"imagefolder"}  # other sources keep their own size whatever data.image_size says
# The view size `views.size=0` resolves to, where it is not the image size. Fashion-MNIST's
# 28-px images make better and cheaper SSL views at 20 px for the main job's budget (3 epochs
# at 20 px beat 2 at 28 px on three seeds in about the same time: docs/RESULTS.md, "How the
# defaults were chosen").
VIEW_SIZES = {"fashion-mnist": 20}


def default_view_size(name: str, image_size: int) -> int:
    """The view size for `views.size=0` on dataset `name` (a SOURCES kind, maybe with ':ARG').

    A store packed at its source's own size (`packed:DEST`, no resolution=) follows its source
    (the header records it), so that a run on the store is the run on the source; a store
    resized at pack time has new images, viewed at their size like any other dataset."""
    kind, _, arg = name.partition(":")
    kind = kind.strip().lower()
    if kind == "packed" and arg:
        return _store_view_size(read_header(arg), image_size)
    return VIEW_SIZES.get(kind, image_size)


def _store_view_size(header: dict, image_size: int) -> int:
    source, max_side = header.get("source"), header.get("max_side")
    # max_side changed the pixels only where an image reached it
    kept = header.get("resolution") is None and (
        max_side is None or (isinstance(max_side, int) and image_size < max_side))
    if not kept or not isinstance(source, str) or source.partition(":")[0] == "packed":
        return image_size
    return default_view_size(source, image_size)


USAGE = {"shapes": "shapes[:n=20000,size=32,seed=0]", "stl10": "stl10[:labelled]",
         "imagefolder": "imagefolder:PATH", "npz": "npz:PATH", "packed": "packed:PATH"}


def available_datasets() -> list[str]:
    """Every accepted dataset name pattern, e.g. 'cifar10', 'npz:PATH'."""
    return [USAGE.get(kind, kind) for kind in SOURCES]


def _check_fraction(key: str, value: float, allow_zero: bool) -> None:
    ok = 0.0 <= value < 1.0 if allow_zero else 0.0 < value <= 1.0
    if not ok:
        bounds = "[0, 1)" if allow_zero else "(0, 1]"
        raise UserError(f"{key}={value} is out of range: use a number in {bounds}")


def parse_name(name: str) -> tuple[str, str | None]:
    """`kind[:ARG]` -> (kind, ARG or None), checked against SOURCES."""
    kind, sep, arg = name.partition(":")
    kind = kind.strip().lower()
    if kind not in SOURCES:
        raise UserError(f"unknown dataset {short(name)}: choose one of "
                        f"{', '.join(available_datasets())}")
    if sep and not SOURCES[kind][1]:
        raise UserError(f"dataset {kind} takes no ':' argument (got {short(name)})")
    if kind in ("imagefolder", "npz", "packed") and not arg:
        raise UserError(f"dataset {kind} needs a path: data.name={USAGE[kind]}")
    return kind, arg or None


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    fraction: float = 1.0,
    image_size: int = 0,
) -> DatasetSplits:
    """Load `name` and return train/val/test (+ unlabelled images for SSL, if the source has any).

    val is carved from train by a permutation seeded by (seed, dataset kind) unless the source
    has its own (an empty labelled train split gives an empty val); `fraction` then keeps a
    seeded prefix-of-a-permutation subset of the remaining train split and, seeded apart, of
    the unlabelled images (nested across fractions). The test split is never subsampled.
    `image_size` (data.image_size) resizes the sources in RESIZING; 0 keeps their default.
    """
    _check_fraction("val_fraction", val_fraction, allow_zero=True)
    _check_fraction("fraction", fraction, allow_zero=False)
    check_image_size(image_size)
    kind, arg = parse_name(name)
    reader = SOURCES[kind][0]
    loaded = reader(root, arg, image_size=image_size) if kind in RESIZING else reader(root, arg)
    key = zlib.crc32((loaded.split_key or kind).encode())  # stable across processes, unlike hash()
    train, val, unlabelled = loaded.train, loaded.val, loaded.unlabelled
    if val is None:
        # nothing labelled (an unlabelled folder): nothing to validate on
        train, val = carve_val(train, val_fraction, numpy_rng(seed, key, 0)) if len(train) \
            else (train, train)
    has_unlabelled = unlabelled is not None and len(unlabelled) > 0
    if len(train) == 0 and (len(loaded.train) or not has_unlabelled):
        raise UserError(f"{name} has no training images left after the validation split: "
                        "lower val_fraction or add data")
    if len(train):
        train = subset(train, fraction, numpy_rng(seed, key, 1))
    if has_unlabelled:
        unlabelled = subset(unlabelled, fraction, numpy_rng(seed, key, 2))
    return DatasetSplits(
        name=name.strip(),
        train=train,
        val=val,
        test=loaded.test,
        factor_names=loaded.factor_names,
        num_classes=loaded.num_classes or count_classes(loaded),
        class_names=loaded.class_names,
        default_target=loaded.default_target,
        unlabelled=unlabelled,
    )
