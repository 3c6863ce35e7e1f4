"""Procedural multi-factor images: one coloured shape on a dark background.

Factors (labels (N, 5), in this order): shape (4 classes), colour (6 hues), x and y position
of the centre and scale (half-size), the continuous three each binned into 4 equal-width bins.
The shape always lies fully inside the frame. Drawing is vectorised over all images of one
shape at a time, so 20k 32x32 images take well under a second.
"""

from __future__ import annotations

import numpy as np

from ssl_lab.config_io import short
from ssl_lab.data.splits import Loaded, Split
from ssl_lab.errors import UserError
from ssl_lab.seeding import numpy_rng

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
BACKGROUND = 16
N_BINS = 4
FACTORS = ["shape", "colour", "x", "y", "scale"]
SCALE_RANGE = (0.12, 0.25)  # half-size as a fraction of the image side
DEFAULTS = {"n": 20000, "size": 32, "seed": 0}


def parse_options(arg: str | None) -> dict[str, int]:
    """`n=20000,size=32,seed=0` -> dict (missing keys take the defaults)."""
    opts = dict(DEFAULTS)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in DEFAULTS or not value.strip().lstrip("-").isdigit():
            raise UserError(
                f"bad shapes option {short(item)}: use shapes:n=20000,size=32,seed=0 (integers)"
            )
        opts[key] = int(value)
    if opts["n"] < 5 or opts["size"] < 8:
        raise UserError(f"shapes needs n >= 5 and size >= 8, got n={opts['n']} "
                        f"size={opts['size']}")
    return opts


def _masks(kind: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean (n, S, S) masks of one shape kind; dx, dy are offsets from the centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == 0:  # circle
        return dx * dx + dy * dy <= r * r
    if kind == 1:  # square, shrunk so its area is close to the circle's
        return np.maximum(ax, ay) <= 0.85 * r
    if kind == 2:  # triangle, apex up: half-width grows from 0 at the top to r at the base
        return (ay <= r) & (ax <= (dy + r) / 2)
    thin = r / 3  # cross: two bars of thickness 2r/3
    return ((ax <= r) & (ay <= thin)) | ((ay <= r) & (ax <= thin))


def _bin(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(((values - lo) / (hi - lo) * N_BINS).astype(np.int64), 0, N_BINS - 1)


def draw(n: int, size: int, rng: np.random.Generator) -> Split:
    """Draw `n` images of side `size` with labels (n, 5)."""
    shape = rng.integers(len(SHAPES), size=n)
    colour = rng.integers(len(COLOURS), size=n)
    r_lo, r_hi = (f * size for f in SCALE_RANGE)
    r = rng.uniform(r_lo, r_hi, size=n)
    # Centres stay r_hi + 0.5 from the border so the largest shape is never clipped; the
    # position bins then span the same range for every scale.
    lo, hi = r_hi + 0.5, size - r_hi - 0.5
    cx, cy = rng.uniform(lo, hi, size=n), rng.uniform(lo, hi, size=n)

    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    mask = np.zeros((n, size, size), dtype=bool)
    for kind in range(len(SHAPES)):
        i = np.flatnonzero(shape == kind)
        dx = grid[None, None, :] - cx[i, None, None].astype(np.float32)
        dy = grid[None, :, None] - cy[i, None, None].astype(np.float32)
        mask[i] = _masks(kind, dx, dy, r[i, None, None].astype(np.float32))

    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    images = np.full((n, size, size, 3), BACKGROUND, dtype=np.uint8)
    images[mask] = np.repeat(palette[colour], mask.sum(axis=(1, 2)), axis=0)
    labels = np.stack(
        [shape, colour, _bin(cx, lo, hi), _bin(cy, lo, hi), _bin(r, r_lo, r_hi)], axis=1
    ).astype(np.int64)
    return Split(images, labels)


def load_shapes(arg: str | None) -> Loaded:
    opts = parse_options(arg)
    # Train and test are independent draws from separate streams of the option seed.
    train = draw(opts["n"], opts["size"], numpy_rng(opts["seed"], 0))
    test = draw(opts["n"] // 5, opts["size"], numpy_rng(opts["seed"], 1))
    bins = [f"bin{k}" for k in range(N_BINS)]
    return Loaded(
        train=train,
        test=test,
        factor_names=list(FACTORS),
        num_classes=[len(SHAPES), len(COLOURS), N_BINS, N_BINS, N_BINS],
        class_names=[list(SHAPES), list(COLOURS), bins, bins, bins],
    )
