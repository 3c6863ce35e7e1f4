"""`ssl-lab rcdm sample RUN key=value ...`: k samples per conditioning image (grid.png,
samples.npz) and an interpolation between two images' representations (interp.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.gen import rcdm
from ssl_lab.gen.rcdm_build import (
    Built,
    check_encoder_dir,
    encoder_channels,
    encoder_data,
    features,
    load_run,
)
from ssl_lab.gen.rcdm_config import SampleArgs, check_args, check_new_folder, read_run_config, sample_folder
from ssl_lab.runtime import path_kind, short_path
from ssl_lab.seeding import SELECT_SEED

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_SIDE = 4096  # an images= .npy is copied and resized whole: its side is bounded


def select_indices(n_total: int, n: int) -> np.ndarray:
    """The first n of a fixed permutation: a class-mixed subset, the same for sample and score
    (and for every run seed)."""
    perm = np.random.default_rng(SELECT_SEED).permutation(n_total)
    return np.sort(perm[:min(n, n_total)])


def held_out(built: Built, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images of a split of the encoder's dataset (`select_indices`) and their indices."""
    images = getattr(encoder_data(built.cfg), split).images
    if len(images) == 0:
        raise UserError(f"the {split} split of {built.spec['dataset']} is empty; choose another "
                        "split= or pass images=")
    idx = select_indices(len(images), n)
    return encoder_channels(images[idx], built.spec["in_channels"]), idx


def render(built: Built, images: np.ndarray) -> np.ndarray:
    """Images as the generator's canvas shows them (resized to `content`), uint8 NHWC."""
    x = rcdm.to_canvas(torch.from_numpy(images), built.content, built.spec["size"])
    return rcdm.from_canvas(x, built.content).numpy()


def sample_images(built: Built, images: np.ndarray, k: int, steps: int, seed: int, eta: float = 0.0,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """k samples for each uint8 image: {'conditioning', 'samples' (N, k, c, c, C), 'features'}."""
    h = features(built, images).to(built.device)
    out = rcdm.sample_k(built.model, h, k, built.shape, steps, seed, eta, built.amp_dtype,
                        batch_size)
    return {"conditioning": render(built, images), "features": h.cpu().numpy(),
            "samples": rcdm.from_canvas(out, built.content).numpy()}


def save_sample_grid(result: dict[str, np.ndarray], path: Path, rows: int | None = None) -> Path:
    """One row per conditioning image: the image, a gap, its k samples."""
    cond, samples = result["conditioning"], result["samples"]
    n = len(cond) if rows is None else min(rows, len(cond))
    return rcdm.save_grid([[cond[i], *samples[i]] for i in range(n)], path)


def interpolation(built: Built, a: np.ndarray, b: np.ndarray, points: int, k: int, steps: int,
                  seed: int, eta: float, path: Path) -> tuple[Path, np.ndarray]:
    """Samples along h(a) → h(b), k rows (one noise draw each) between the two images."""
    h = features(built, np.stack([a, b])).to(built.device)
    out = rcdm.interpolate(built.model, h[0], h[1], points, k, built.shape, steps, seed, eta,
                           built.amp_dtype)
    tiles = rcdm.from_canvas(out, built.content).numpy()  # (k, points, c, c, C)
    ends = render(built, np.stack([a, b]))
    rows = [[ends[0], *tiles[j], ends[1]] for j in range(k)]
    return rcdm.save_grid(rows, path, gap_after=None), tiles


def load_images(spec: str, in_chans: int, size: int) -> np.ndarray:
    """`images=`: comma-separated image files, a directory of them, or a uint8 .npy
    (N, H, W[, C]); returned as uint8 (N, size, size, in_chans) for the encoder."""
    paths = [Path(p) for p in spec.split(",") if p]
    if len(paths) == 1 and paths[0].suffix == ".npy":
        return encoder_channels(_load_npy(paths[0]), in_chans)
    if len(paths) == 1 and path_kind(paths[0], "images=") == "dir":
        folder, paths = paths[0], sorted(p for p in paths[0].iterdir()
                                         if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"images={short_path(folder)} holds no image files "
                            f"({', '.join(IMAGE_SUFFIXES)}); pass a folder of images or a .npy")
    missing = [str(p) for p in paths if path_kind(p, "images=") != "file"]
    if not paths or missing:
        raise UserError(f"images={short(spec)}: no such image file(s) {short(missing)}; pass "
                        "image paths separated by commas, a directory, or a .npy")
    return np.stack([_load_image(p, in_chans, size) for p in paths])


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # the header first: no pixels read
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {short_path(path)} ({str(exc)[:80]}); pass a uint8 .npy"
                        ) from None
    if arr.ndim == 0 or len(arr) == 0:
        raise UserError(f"{short_path(path)} holds no images (shape {short(arr.shape)}); pass a "
                        "uint8 .npy of at least one image (N, H, W[, C])")
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or 0 in arr.shape or \
            (arr.ndim == 4 and arr.shape[-1] not in (1, 3)) or max(arr.shape[1:3]) > MAX_SIDE:
        raise UserError(f"{short_path(path)} must hold uint8 images (N, H, W[, C]) with C 1 or "
                        f"3 and sides up to {MAX_SIDE}, got {arr.dtype} {short(arr.shape)}")
    arr = np.ascontiguousarray(arr)
    return arr if arr.ndim == 4 else arr[..., None]


def _load_image(path: Path, in_chans: int, size: int) -> np.ndarray:
    """An image file as uint8 (size, size, C): imagefolder's opener (an unreadable file or a
    decompression bomb is one line naming it) and its 16-bit conversion, resized to fit."""
    from PIL import Image

    from ssl_lab.data.imagefolder import bomb_guard, open_image, to_8bit

    with bomb_guard(), open_image(path) as im:
        try:
            img = to_8bit(im).convert("L" if in_chans == 1 else "RGB")
        except OSError as exc:  # truncated pixel data shows up only on decode
            raise UserError(f"cannot decode image {short_path(path)} ({str(exc)[:80]}): delete "
                            "or replace it") from None
    arr = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Arrays plus a JSON `meta` entry, written under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return path


def sample_command(run_dir: Path, args: SampleArgs) -> dict[str, Path]:
    """`rcdm sample`: grid.png, samples.npz and (interp >= 2) interp.png; returns their paths.
    They go to out=, else RUN/samples/<settings>/ (`rcdm_config.sample_folder`), which must be
    new or empty unless overwrite=true: a second call never silently replaces earlier samples.
    Arguments, the folder and images= are checked before the model is loaded."""
    check_args(args)  # before loading anything (also for a SampleArgs built in Python)
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    s = saved.sample
    out = sample_folder(run_dir, args, s)
    if not args.overwrite:
        check_new_folder(out)
    images = idx = None
    if args.images:
        enc = check_encoder_dir(saved.encoder)
        images = load_images(args.images, enc["in_chans"], enc["image_size"])
    built = load_run(run_dir)
    k, steps = pick(args.k, s.k), pick(args.steps, s.steps)
    seed, eta = pick(args.seed, s.seed), pick(args.eta, s.eta)
    if images is None:
        images, idx = held_out(built, pick(args.split, "test"), pick(args.n, 8))
    result = sample_images(built, images, k, steps, seed, eta, pick(args.batch_size, s.batch_size))
    paths = {"grid": save_sample_grid(result, out / "grid.png")}
    arrays = dict(result)
    if args.interp >= 2 and len(images) >= 2:
        paths["interp"], arrays["interp"] = interpolation(built, images[0], images[1], args.interp,
                                                           k, steps, seed, eta, out / "interp.png")
    if idx is not None:
        arrays["indices"] = idx
    meta = {"k": k, "steps": steps, "seed": seed, "eta": eta, "layer": built.spec["layer"]}
    paths["arrays"] = save_npz(out / "samples.npz", arrays, meta)
    return paths


def pick(given: Any, default: Any) -> Any:
    """A given argument, else the run's setting (None means "not given", never 0)."""
    return default if given is None else given
