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

from pathlib import Path

import numpy as np

from ssl_lab.data.splits import Loaded, Split, holdout
from ssl_lab.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MAX_SIZE = 64
TEST_FRACTION = 0.2
TEST_SEED = 0  # fixed, so the carved test set never depends on the run seed
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


def _load(files: list[Path], size: int, gray: bool) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), size, size, 1 if gray else 3), dtype=np.uint8)
    for i, path in enumerate(files):
        with _open(path) as im:
            try:
                im = im.convert("L" if gray else "RGB")
            except OSError as e:  # truncated pixel data shows up only on decode
                raise UserError(f"cannot decode image {path} ({e}): delete or replace it") \
                    from None
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        out[i] = np.asarray(im).reshape(size, size, -1)
    return out


def _split_folders(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise UserError(f"imagefolder path {root} is not a folder: fix data.name=imagefolder:PATH")
    if not (root / "train").is_dir():
        return {"train": root}
    return {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}


def load_imagefolder(arg: str | None) -> Loaded:
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
    every = [f for fs in files.values() for f in fs]
    sizes, gray = [], True
    for path in every:  # headers only: PIL reads pixels lazily
        with _open(path) as im:
            sizes.append(min(im.size))
            gray &= im.mode in GRAY_MODES
    size = min(MAX_SIZE, min(sizes))

    splits = {}
    for s, classes in scans.items():
        labels = np.concatenate([np.full(len(fs), index[c], np.int64) for c, fs in classes.items()])
        splits[s] = Split(_load(files[s], size, gray), labels)
    if "test" not in splits:
        keep, held = holdout(splits["train"].labels, TEST_FRACTION, TEST_SEED)
        splits["train"], splits["test"] = splits["train"].take(keep), splits["train"].take(held)
    return Loaded(
        train=splits["train"],
        val=splits.get("val"),
        test=splits["test"],
        num_classes=[len(class_names)],
        class_names=[class_names],
    )
