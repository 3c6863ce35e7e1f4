"""`imagefolder:PATH` -- PATH/<class>/<image> trees read with PIL.

Layout: if PATH has a `train/` folder, it and optional `val/` and `test/` siblings (same class
folder names) are the splits; a missing `test/` is carved from train (seeded 20%, stratified).
Otherwise PATH itself holds the class folders and test is carved the same way.

Size rule: every image is resized so its shorter side is S, then centre-cropped to S x S, with
S = the smallest shorter side over all images, capped at 64 -- no image is ever upscaled and
large photos stay cheap to train on. Images are grayscale (C = 1) when every file is
grayscale, else RGB (alpha dropped). Files other than png/jpg/jpeg/bmp/webp are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_lab.data.splits import Loaded, Split, holdout
from ssl_lab.errors import UserError
from ssl_lab.seeding import HOLDOUT_SEED

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIZE = 64
TEST_FRACTION = 0.2
GRAY_MODES = {"1", "L", "LA"}


def _scan(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files, for every non-hidden subfolder holding images."""
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in EXTENSIONS)
        if files:
            classes[sub.name] = files
    if not classes:
        raise UserError(
            f"no images found in {folder}: imagefolder expects {folder}/<class>/<image>.png "
            f"(extensions {', '.join(sorted(EXTENSIONS))})"
        )
    return classes


def _open(path: Path):  # -> PIL.Image.Image (PIL imported lazily: only this source needs it)
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path} ({e}): delete or replace it") from None


def fit_image(im, size: int | tuple[int, int], gray: bool, fit: str = "crop") -> np.ndarray:
    """A PIL image as uint8 (H, W, C) of exactly `size` (an int: square): "crop" resizes the
    shorter side to fit and centre-crops, "pad" resizes the longer side and centres it on black."""
    from PIL import Image

    try:
        im = im.convert("L" if gray else "RGB")
    except OSError as e:  # truncated pixel data shows up only on decode
        raise UserError(f"cannot decode image {getattr(im, 'filename', '')} ({e}): delete or "
                        "replace it") from None
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
    with _open(path) as im:
        return fit_image(im, size, gray, fit)


def _load(files: list[Path], size: int, gray: bool) -> np.ndarray:
    out = np.empty((len(files), size, size, 1 if gray else 3), dtype=np.uint8)
    for i, path in enumerate(files):
        out[i] = read_image(path, size, gray)
    return out


def _split_folders(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise UserError(f"imagefolder path {root} is not a folder: fix data.name=imagefolder:PATH")
    if not (root / "train").is_dir():
        return {"train": root}
    return {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}


@dataclass
class FolderIndex:
    """What an image folder holds, from file names and image headers only (no pixels)."""

    files: dict[str, list[Path]]  # split -> files; test carved from train when absent
    labels: dict[str, np.ndarray]
    class_names: list[str]
    gray: bool  # every image is grayscale: C = 1
    min_side: int  # smallest shorter side over every image


def index_imagefolder(arg: str | None) -> FolderIndex:
    """Index the folder `arg` (splits, classes, sizes) without decoding any pixel."""
    if not arg:
        raise UserError("imagefolder needs a path: data.name=imagefolder:PATH")
    folders = _split_folders(Path(arg).expanduser())
    scans = {s: _scan(f) for s, f in folders.items()}
    class_names = list(scans["train"])
    index = {c: k for k, c in enumerate(class_names)}
    for s, classes in scans.items():
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise UserError(f"{folders[s]} has classes {unknown} missing from "
                            f"{folders['train']}: give every split the same class folders")

    files = {s: [f for fs in c.values() for f in fs] for s, c in scans.items()}
    labels = {s: np.concatenate([np.full(len(fs), index[c], np.int64) for c, fs in classes.items()])
              for s, classes in scans.items()}
    sizes, gray = [], True
    for path in (f for fs in files.values() for f in fs):  # headers only: PIL reads pixels lazily
        with _open(path) as im:
            sizes.append(min(im.size))
            gray &= im.mode in GRAY_MODES
    if "test" not in files:
        keep, held = holdout(labels["train"], TEST_FRACTION, HOLDOUT_SEED)
        train = files["train"]
        files["train"], files["test"] = [train[i] for i in keep], [train[i] for i in held]
        labels["train"], labels["test"] = labels["train"][keep], labels["train"][held]
    return FolderIndex(files, labels, class_names, gray, min(sizes))


def load_imagefolder(arg: str | None) -> Loaded:
    """The `imagefolder:PATH` source: every image decoded and resized into RAM."""
    folder = index_imagefolder(arg)
    size = min(MAX_SIZE, folder.min_side)
    splits = {s: Split(_load(f, size, folder.gray), folder.labels[s])
              for s, f in folder.files.items()}
    return Loaded(
        train=splits["train"],
        val=splits.get("val"),
        test=splits["test"],
        num_classes=[len(folder.class_names)],
        class_names=[folder.class_names],
    )
