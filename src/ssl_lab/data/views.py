"""Batched, per-sample-random view generation on the training device.

`ViewGenerator(recipe, size, n_views)(images, generator)` turns a uint8 batch (N, H, W, C)
into float32 views (V, N, C, S, S). All V*N views are made together: one random draw, one
`grid_sample` for crop + flip + resize, one batched colour matmul per jitter step, and so on.
Every parameter sampled is returned on request and `replay` re-creates the views from them.

Pipeline order (BYOL/VICReg's): random resized crop + horizontal flip + resize -> colour jitter
(brightness, contrast, saturation, hue in a per-sample random order, clamped to [0, 1] after
each op as torchvision does) -> grayscale -> Gaussian blur -> solarize -> Gaussian noise.
Hue is a rotation of the YIQ chroma plane (keeps luma; torchvision rotates HSV hue instead,
which keeps HSV value) because it is a 3x3 matrix and so costs the same as the other ops.
`Recipe.fast` (the default above 64 px, ImageNet-style recipes) trades that exactness for speed
(2.2x at 96 px in the loader benchmark, docs/data.md): jitter and grayscale become one affine
colour map per view with one clamp (DALI's ColorTwist); with a crop or flip, crop + flip +
resize + blur become two GEMMs per view with that colour map between them (the blur thus
before the clamp), in bfloat16 where that is native (AMX or AVX512-BF16 CPUs, CUDA >= sm80).
Crop + flip + resize is one bilinear `grid_sample` equal to cutting the box and resizing it
without antialiasing: exact when crops are upsampled (always at 32 px), aliased when a crop
shrinks a lot (large images; "none"/"noise" resizes do antialias). `Recipe.antialias` makes
shrinking crops antialiased too (torchvision >= 0.17's default), as two batched resampling
matmuls per view instead of the `grid_sample`. Blur kernels are ~10% of
the output side (SimCLR's 23 px at 224; 3 px at 32), sigma ~ U(0.1, 2.0) px as torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ssl_lab.config_io import short
from ssl_lab.data import augment as A
from ssl_lab.data import color as C
from ssl_lab.data import resample as R
from ssl_lab.errors import UserError

Params = dict[str, torch.Tensor]
PerView = float | tuple[float, ...]  # a probability, or one per view index (cycled)
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class Recipe:
    """Augmentation parameters. Probabilities may be per view index (cycled for more views).

    crop_scale=None means no crop: the whole image is resized to the output size.
    """

    name: str = "custom"
    crop_scale: tuple[float, float] | None = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: PerView = 0.0
    jitter_p: PerView = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: PerView = 0.0
    blur_p: PerView = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # kernel side / image side (SimCLR: 23 px at 224)
    solarize_p: PerView = 0.0
    solarize_threshold: float = 0.5
    noise_std: float = 0.0
    # fast: colour ops fused into one matrix and one clamp (color.fused_color) and a bf16
    # blur where native; False: torchvision's clamp after every colour op and an fp32 blur
    fast: bool = False
    # antialias: crops that shrink are low-pass filtered first (torchvision >= 0.17's default,
    # PIL); False: plain bilinear sampling, exact for crops that grow, aliased for shrinking ones
    antialias: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale or (0.5, 1.0)
        probs = [self.prob(f, v) for f in _PROB_FIELDS for v in range(_n_per_view(self, f))]
        if not (0 < lo <= hi <= 1 and 0 < self.crop_ratio[0] <= self.crop_ratio[1]
                and all(0 <= p <= 1 for p in probs) and self.noise_std >= 0
                and min(self.brightness, self.contrast, self.saturation, self.hue) >= 0
                and self.hue <= 0.5 and 0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise UserError(f"invalid view recipe {self}: probabilities must be in [0, 1], "
                            "crop scale in (0, 1], hue in [0, 0.5], other ranges low <= high")

    def prob(self, field: str, view: int) -> float:
        p = getattr(self, field)
        return float(p[view % len(p)]) if isinstance(p, tuple) else float(p)

    def uses(self, field: str) -> bool:
        """True if the op's probability is non-zero for some view (else it is skipped)."""
        p = getattr(self, field)
        return any(q > 0 for q in p) if isinstance(p, tuple) else p > 0

    @property
    def jitters(self) -> bool:
        strengths = (self.brightness, self.contrast, self.saturation, self.hue)
        return self.uses("jitter_p") and any(s > 0 for s in strengths)


_PROB_FIELDS = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


def _n_per_view(recipe: Recipe, field: str) -> int:
    p = getattr(recipe, field)
    return len(p) if isinstance(p, tuple) else 1


_STRONG = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
               grayscale_p=0.2)
_BUILTIN: dict[str, Recipe] = {
    # SimCLR's CIFAR setup: no blur at 32 px. Crop scale (0.2, 1) as in SupContrast/MoCo's
    # CIFAR code: (0.08, 1) is ImageNet's and leaves 9x9-pixel crops at 32 px.
    "simclr": Recipe("simclr", **_STRONG),
    # BYOL (Grill et al. 2020, Table 6) / VICReg (Bardes et al. 2022): asymmetric blur/solarize.
    "byol": Recipe("byol", **_STRONG, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    "vicreg": Recipe("vicreg", **_STRONG, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    "weak": Recipe("weak", crop_scale=(0.5, 1.0), flip_p=0.5),
    "noise": Recipe("noise", crop_scale=None),  # noise_std filled in by get_recipe
    "none": Recipe("none", crop_scale=None),
}
RECIPES: tuple[str, ...] = tuple(_BUILTIN)
_LARGE = 64  # above this output size, crops use ImageNet's scale range


def get_recipe(name: str, *, noise_std: float = 0.1, size: int | None = None,
               fast: bool | None = None, crop_min_scale: float | None = None,
               antialias: bool = False) -> Recipe:
    """The named recipe. `noise_std` is sigma of the "noise" recipe (x + sigma * eps).

    With `size` > 64, crop-based recipes use ImageNet's crop scale (0.08, 1) and SimCLR its
    ImageNet blur (p = 0.5); the defaults are the small-image (CIFAR-style) settings. `fast`
    (Recipe.fast) is None = by size: on above 64 px, where view making costs the most.
    `crop_min_scale` replaces the lower bound of the crop scale; `antialias`: Recipe.antialias.
    """
    if name not in _BUILTIN:
        raise UserError(f"unknown view recipe {short(name)}: use one of {', '.join(RECIPES)}")
    if not noise_std >= 0:
        raise UserError(f"views.noise_std must be >= 0, got {noise_std}")
    recipe = _BUILTIN[name]
    if name == "noise":
        recipe = replace(recipe, noise_std=float(noise_std))
    if size is not None and size > _LARGE and name in ("simclr", "byol", "vicreg"):
        recipe = replace(recipe, crop_scale=(0.08, 1.0))
        if name == "simclr":
            recipe = replace(recipe, blur_p=0.5)
    if crop_min_scale is not None:
        if recipe.crop_scale is None:
            raise UserError(f"views.crop_min_scale: the {short(name)} recipe does not crop")
        recipe = replace(recipe, crop_scale=(float(crop_min_scale), recipe.crop_scale[1]))
    if fast is None:
        fast = size is not None and size > _LARGE
    return replace(recipe, fast=bool(fast), antialias=bool(antialias))


class ViewGenerator:
    """Makes V random views of every image of a uint8 batch, all at once, on its device.

    Keeps scratch buffers between calls, so one instance must not be called from two threads
    at once. The returned views are always a fresh tensor.
    """

    def __init__(self, recipe: str | Recipe, size: int, n_views: int = 2, *,
                 noise_std: float = 0.1, fast: bool | None = None) -> None:
        if not isinstance(size, int) or size < 1:
            raise UserError(f"views.size must be a positive integer, got {short(size)}")
        if not isinstance(n_views, int) or n_views < 1:
            raise UserError(f"views.n must be a positive integer, got {short(n_views)}")
        if isinstance(recipe, str):
            recipe = get_recipe(recipe, noise_std=noise_std, size=size, fast=fast)
        self.recipe, self.size, self.n_views = recipe, size, n_views
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 return_params: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, list[Params]]:
        """(N, H, W, C) uint8 -> (V, N, C, S, S) float32; params[v] = what view v sampled.

        params[v] keys (only for ops the recipe uses): "crop" (N, 4) int64 top, left, height,
        width in input pixels; "flip", "jitter", "grayscale", "blur", "solarize" (N,) bool;
        "brightness", "contrast", "saturation", "hue" (N,) factors (identity where jitter is
        off); "jitter_order" (N, 4) op indices in application order (0 brightness, 1 contrast,
        2 saturation, 3 hue); "blur_sigma" (N,) pixels; "noise" (N, C, S, S) = sigma * eps.
        """
        self._check(images)
        if generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device}, images on {images.device}")
        flat = self._sample(images, generator)
        views = self._apply(images, flat)
        if not return_params:
            return views
        n = images.shape[0]
        return views, [{k: t[v * n:(v + 1) * n] for k, t in flat.items()}
                       for v in range(self.n_views)]

    def replay(self, images: torch.Tensor, params: list[Params]) -> torch.Tensor:
        """Re-create exactly the views described by params (as returned by __call__)."""
        self._check(images)
        if len(params) != self.n_views:
            raise ValueError(f"got params for {len(params)} views, expected {self.n_views}")
        flat = {k: torch.cat([p[k] for p in params]) for k in params[0]}
        return self._apply(images, flat)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise UserError(f"views need uint8 images (N, H, W, C) with C = 1 or 3, got "
                            f"{images.dtype} {tuple(images.shape)}: convert the dataset")

    def _probs(self, field: str, n: int, device: torch.device) -> torch.Tensor:
        """Per-row probability (V*N,) of an op, view-major like the views."""
        p = A.const(tuple(self.recipe.prob(field, v) for v in range(self.n_views)), device)
        return p.repeat_interleave(n)

    def _sample(self, images: torch.Tensor, gen: torch.Generator) -> Params:
        """Draw every random parameter of the V*N views (rows view-major) in a few calls."""
        r, (n, height, width, c) = self.recipe, images.shape
        m, dev = self.n_views * n, images.device
        out: Params = {}
        if r.crop_scale is not None:
            u = torch.rand(m, 2 * A.N_CROP_TRIES + 2, generator=gen, device=dev)
            out["crop"] = A.sample_crop_boxes(u, height, width, r.crop_scale, r.crop_ratio)
        # One draw for every coin flip and factor; a column per use, fixed by the recipe.
        u = torch.rand(m, 13, generator=gen, device=dev)
        for col, field, key in ((0, "flip_p", "flip"), (1, "grayscale_p", "grayscale"),
                                (2, "solarize_p", "solarize")):
            if r.uses(field) and not (key == "grayscale" and c == 1):
                out[key] = u[:, col] < self._probs(field, n, dev)
        if r.jitters:
            out.update(self._jitter_params(u[:, 3:8], u[:, 8:12], n, dev))
        if r.uses("blur_p"):
            out["blur"] = u[:, 12] < self._probs("blur_p", n, dev)
            lo, hi = r.blur_sigma
            out["blur_sigma"] = lo + (hi - lo) * torch.rand(m, generator=gen, device=dev)
        if r.noise_std > 0:
            shape = (m, c, self.size, self.size)
            out["noise"] = torch.randn(shape, generator=gen, device=dev).mul_(r.noise_std)
        return out

    def _jitter_params(self, u: torch.Tensor, u_order: torch.Tensor, n: int,
                       dev: torch.device) -> Params:
        """torchvision's ColorJitter ranges; identity factors where the jitter coin says no."""
        r = self.recipe
        on = u[:, 0] < self._probs("jitter_p", n, dev)
        out: Params = {"jitter": on}
        for i, name in enumerate(JITTER_OPS):
            s = getattr(r, name)
            lo, hi, ident = (-s, s, 0.0) if name == "hue" else (max(0.0, 1 - s), 1 + s, 1.0)
            out[name] = torch.where(on, lo + (hi - lo) * u[:, 1 + i], ident)
        out["jitter_order"] = u_order.argsort(dim=1)  # a random permutation per sample
        return out

    def _apply(self, images: torch.Tensor, p: Params) -> torch.Tensor:
        """Deterministic: the views described by the flat (V*N rows) parameters p."""
        n, h, w, c = images.shape
        v, s, dev = self.n_views, self.size, images.device
        m = v * n
        if self.recipe.fast and ("crop" in p or "flip" in p):
            return self._separable(images, p).view(v, n, c, s, s)
        if "crop" in p or "flip" in p:
            src = A.to_float(images, v, out=self._buffer("src", (v, n, h, w, c), dev))
            boxes = p.get("crop")
            if boxes is None:  # flip without crop: the full image is the box
                boxes = A.const((0, 0, h, w), dev).expand(m, 4)
            flip = p.get("flip", torch.zeros(m, dtype=torch.bool, device=dev))
            if self.recipe.antialias and max(h, w) > s:  # some crops may shrink
                x = R.crop_flip_resize_antialiased(src, boxes, flip, s)
            else:
                x = A.crop_flip_resize(src, boxes, flip, s, self._buffer("grid", (m, s, s, 2), dev))
        else:
            x = A.resize(A.to_float(images), s)
            x = x[None].expand(v, n, c, s, s).contiguous().view(m, c, s, s)
        # x is the fresh tensor returned; the ops below overwrite it, using `work` as scratch.
        fast = self.recipe.fast
        colour = "jitter" in p or "grayscale" in p
        work = self._buffer("work", x.shape, dev) if (colour or "blur" in p) else x
        mats = C.jitter_matrices(*(p[k] for k in JITTER_OPS), channels=c) if "jitter" in p else None
        if fast and colour:
            C.fused_color(x, mats, p.get("contrast"), p.get("jitter_order"), p.get("grayscale"),
                          work)
        if not fast and mats is not None:
            C.color_jitter(x, mats, p["contrast"], p["jitter_order"], work)
        if not fast and "grayscale" in p:
            C.grayscale(x, p["grayscale"])
        if "blur" in p:
            k = A.blur_kernel_size(s, self.recipe.blur_kernel_frac)
            A.gaussian_blur(x, p["blur_sigma"], p["blur"], k, work,
                            bf16=fast and A.native_bf16_matmul(dev))
        if "solarize" in p:
            C.solarize(x, p["solarize"], self.recipe.solarize_threshold)
        if "noise" in p:
            x.add_(p["noise"])
        return x.view(v, n, c, s, s)

    def _separable(self, images: torch.Tensor, p: Params) -> torch.Tensor:
        """Fast views (M, C, S, S): crop, flip, resize, blur and the colour map as two GEMMs per
        view (resample.separable_views, bf16 where native), then solarize and noise."""
        n, h, w, c = images.shape
        v, s, dev = self.n_views, self.size, images.device
        m = v * n

        def image_major(t: torch.Tensor) -> torch.Tensor:  # view-major rows -> image-major
            return t.view(v, n, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

        boxes = image_major(p["crop"]) if "crop" in p else A.const((0, 0, h, w), dev).expand(m, 4)
        flip = image_major(p["flip"]) if "flip" in p else torch.zeros(m, dtype=torch.bool, device=dev)
        blur = None
        if "blur" in p:
            k = A.blur_kernel_size(s, self.recipe.blur_kernel_frac)
            blur = image_major(A.gauss_kernels(p["blur_sigma"], p["blur"], k))
        rows, cols = R.resample_matrices(
            boxes, flip, h, w, s, self.recipe.antialias, blur,
            out=(self._buffer("rows", (m, s, h), dev), self._buffer("cols", (m, s, w), dev)))
        dtype = torch.bfloat16 if A.native_bf16_matmul(dev) else torch.float32
        src = self._buffer("src-hwc", (n, h, w * c), dev, dtype).copy_(images.view(n, h, w * c))
        matrix = shift = None
        if "jitter" in p or "grayscale" in p:
            mats = C.jitter_matrices(*(image_major(p[k]) for k in JITTER_OPS), channels=c) \
                if "jitter" in p else None
            matrix, shift = C.color_map(
                mats, *(image_major(p[k]) if k in p else None
                        for k in ("contrast", "jitter_order", "grayscale")),
                R.crop_means(src, rows, cols) if mats is not None else None, c)
        x = R.separable_views(src, rows, cols, matrix, shift, c,
                              lambda name, shape, dt: self._buffer(f"gemm-{name}", shape, dev, dt))
        x = x.view(m, c, s, s)
        if "solarize" in p:
            C.solarize(x, p["solarize"], self.recipe.solarize_threshold)
        if "noise" in p:
            x.add_(p["noise"])
        return x

    def _buffer(self, name: str, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A scratch tensor kept between calls: re-allocating (and page-faulting) megabytes
        per op costs more than the op itself on CPU."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.device != device or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, device=device, dtype=dtype)
        return buf


def save_view_grid(images: torch.Tensor, views: torch.Tensor, path: str | Path,
                   n: int = 8) -> Path:
    """PNG with one row per image: the original (resized to S) then its V views."""
    from PIL import Image  # PIL comes with matplotlib; only this helper needs it

    v, _, c, s, _ = views.shape
    n = min(n, images.shape[0])
    orig = A.resize(A.to_float(images[:n].cpu()), s)
    tiles = torch.cat([orig[None], views[:, :n].detach().float().cpu()])  # (V+1, n, C, S, S)
    pad = 2
    grid = torch.ones(n * (s + pad) + pad, (v + 1) * (s + pad) + pad, c)
    for row in range(n):  # a figure, not the hot path
        for col in range(v + 1):
            y0, x0 = pad + row * (s + pad), pad + col * (s + pad)
            grid[y0:y0 + s, x0:x0 + s] = tiles[col, row].permute(1, 2, 0)
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path
