"""Batched augmentation primitives: every op takes a whole batch and per-sample parameters.

Tensors are float32 (M, C, H, W) in [0, 1] (M = views x samples). No function loops over
samples in Python and none calls `.item()`, so the ops run unchanged on CPU or CUDA without
a host sync. Parameters are sampled elsewhere (views.py); these functions are deterministic,
which is what makes `ViewGenerator.replay` exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
GRAY_RGB = (0.2989, 0.587, 0.114)
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane that keeps luma Y.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_INV = tuple(map(tuple, torch.linalg.inv(torch.tensor(_YIQ, dtype=torch.float64)).tolist()))
N_CROP_TRIES = 10  # candidates per sample, as torchvision's RandomResizedCrop


@functools.lru_cache(maxsize=64)
def const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant on device, made once: torch.tensor(..., device="cuda") is a
    blocking host-to-device copy, i.e. a sync, if done on every call. Never modify it."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def gray_weights(channels: int, device: torch.device) -> torch.Tensor:
    """Luma weights (C,); for one channel the "gray" image is the image itself."""
    return const(GRAY_RGB if channels == 3 else (1.0,), device)


def to_float(images: torch.Tensor, repeats: int = 1,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (repeats * N, C, H, W) in [0, 1], channels-last memory.

    Converting in the images' own NHWC layout is a plain vectorised cast (transposing while
    casting is 2x slower); grid_sample reads channels-last input at full speed anyway.
    `out`, if given, is an (repeats, N, H, W, C) float32 buffer reused across calls.
    """
    n, h, w, c = images.shape
    if out is None:
        out = torch.empty((repeats, n, h, w, c), device=images.device)
    out.copy_(images.expand(repeats, n, h, w, c)).div_(255.0)
    return out.view(repeats * n, h, w, c).permute(0, 3, 1, 2)


def sample_crop_boxes(
    u: torch.Tensor, height: int, width: int,
    scale: tuple[float, float], ratio: tuple[float, float],
) -> torch.Tensor:
    """RandomResizedCrop boxes (M, 4) = (top, left, h, w), int64, from uniforms u (M, 2T+2).

    Same rule as torchvision: T candidates (area, log-ratio); the first that fits wins; if none
    fits, the centre crop with the ratio clamped into range. Vectorised over samples.
    """
    t = N_CROP_TRIES
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :t])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, t:2 * t])
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    fw, fh = _fallback_size(height, width, ratio)
    found = ok.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # Uniform integer offsets in [0, H - h]; the clamp guards float rounding at u -> 1.
    top = torch.minimum((u[:, 2 * t] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((u[:, 2 * t + 1] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, (height - h).div(2, rounding_mode="floor"))
    left = torch.where(found, left, (width - w).div(2, rounding_mode="floor"))
    return torch.stack((top, left, h, w), dim=1).long()


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, round(width / min(ratio))
    if in_ratio > max(ratio):
        return round(height * max(ratio)), height
    return width, height


def crop_flip_resize(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                     grid: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes (M, 4), mirror where flip (M,), resize to size: one bilinear grid_sample.

    x is (M, C, H, W) (row m is cut by box m). Equals cutting the box out and resizing it
    bilinearly with align_corners=False (torchvision's Resize without antialias), then
    flipping. `grid`, if given, is an (M, S, S, 2) float32 buffer reused across calls.
    """
    height, width = x.shape[-2:]
    grid = _axis_aligned_grid(boxes.to(torch.float32), flip, height, width, size, grid)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_flip_resize_antialiased(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                                 size: int) -> torch.Tensor:
    """`crop_flip_resize` with antialiasing: equals cutting the box out and resizing it with
    F.interpolate(mode="bilinear", antialias=True) (PIL's bilinear filter: a triangle widened
    by the shrink factor), then flipping. Separable, so per sample out = Ry @ crop @ Rx^T."""
    rows, cols = resample_matrices(boxes, flip, *x.shape[-2:], size, antialias=True)
    return torch.matmul(torch.matmul(rows[:, None], x), cols.transpose(1, 2)[:, None])


def resample_matrices(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int,
                      size: int, antialias: bool, blur: torch.Tensor | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop + flip + resize (+ blur) as matrices: view = rows @ image @ cols^T per channel.

    rows (M, size, height), cols (M, size, width), float32. antialias=False gives the bilinear
    weights of `crop_flip_resize` (two taps per output pixel, the box's edge pixel repeated),
    built sparsely; True widens the triangle by the shrink factor as
    `crop_flip_resize_antialiased`. blur: (M, K) Gaussian taps (`gauss_kernels`) folded in as
    rows <- B @ rows and cols <- B @ cols, B the reflect-padded blur of the output. `out`:
    (rows, cols) buffers reused across calls, overwritten (bilinear only).
    """
    top, left, h, w = boxes.to(torch.float32).unbind(1)
    if antialias:
        rows = _resample_weights(top, h, height, size)
        cols = _resample_weights(left, w, width, size)
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
        if blur is not None:
            band = _band(blur, size)
            rows, cols = torch.bmm(band, rows), torch.bmm(band, cols)
        return rows, cols
    row_taps = _bilinear_taps(top, h, size)
    col_taps = _bilinear_taps(left, w, size)
    col_taps = tuple(torch.where(flip[:, None, None], t.flip(1), t) for t in col_taps)
    out = out or (torch.empty(len(boxes), size, height, device=boxes.device),
                  torch.empty(len(boxes), size, width, device=boxes.device))
    return tuple(_scatter_taps(*_blurred_taps(*taps, blur), into)
                 for taps, into in zip((row_taps, col_taps), out, strict=True))


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, out_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (M, out_size, 2) of bilinear resizing [start, start + length)
    to out_size (align_corners=False), sampling positions clamped to the box's edge pixels."""
    ramp = torch.arange(out_size, dtype=torch.float32, device=start.device) + 0.5
    lo, hi = start[:, None], (start + length - 1)[:, None]
    pos = torch.maximum(torch.minimum(start[:, None] + ramp * (length / out_size)[:, None] - 0.5,
                                      hi), lo)
    left = pos.floor()
    frac = pos - left
    idx = torch.stack((left, torch.minimum(left + 1, hi)), dim=-1).long()
    return idx, torch.stack((1 - frac, frac), dim=-1)


def _blurred_taps(idx: torch.Tensor, weight: torch.Tensor, blur: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps of B @ R from R's (M, S, T) taps and B's Gaussian taps (M, K), reflect padded:
    output row i gathers rows reflect(i + t - K // 2) weighted by blur[:, t]."""
    if blur is None:
        return idx, weight
    m, s, taps = idx.shape
    k = blur.shape[1]
    if k // 2 < s:  # reflect-pad the rows, then K shifted windows are a strided view
        half = k // 2
        def windows(t: torch.Tensor) -> torch.Tensor:  # (M, S, T) -> (M, S, K, T)
            padded = torch.cat((t[:, 1:half + 1].flip(1), t, t[:, s - 1 - half:s - 1].flip(1)), 1)
            return padded.unfold(1, k, 1).transpose(2, 3)
        idx, weight = windows(idx), windows(weight)
    else:  # tiny views: the reach exceeds the view, indices repeat at the edges
        src = _reflect(torch.arange(s, device=idx.device)[:, None]
                       + torch.arange(k, device=idx.device) - k // 2, s).flatten()
        idx, weight = (t.index_select(1, src).view(m, s, k, taps) for t in (idx, weight))
    return idx.reshape(m, s, k * taps), (weight * blur[:, None, :, None]).view(m, s, k * taps)


def _scatter_taps(idx: torch.Tensor, weight: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    return into.zero_().scatter_add_(2, idx, weight)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) without repeating the edge (numpy's 'reflect'), repeated
    at the edges when n is smaller than the reach."""
    idx = torch.where(idx < 0, -idx, idx)
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx).clamp_(0, n - 1)


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int
                      ) -> torch.Tensor:
    """(M, out_size, in_size): row i averages the source pixels of [start, start + length)
    under a triangle of half-width max(1, length / out_size) centred on output pixel i."""
    scale = length / out_size
    support = scale.clamp(min=1.0)
    ramp = torch.arange(out_size, dtype=torch.float32, device=start.device) + 0.5
    centre = start[:, None] + ramp * scale[:, None]
    j = torch.arange(in_size, dtype=torch.float32, device=start.device) + 0.5
    weights = (1 - (j - centre[:, :, None]).abs() / support[:, None, None]).clamp_(min=0)
    inside = (j >= start[:, None]) & (j < (start + length)[:, None])
    weights = weights * inside[:, None, :]
    return weights / weights.sum(-1, keepdim=True)


Scratch = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]


def separable_views(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    matrix: torch.Tensor | None, shift: torch.Tensor | None, channels: int,
                    scratch: Scratch | None = None) -> torch.Tensor:
    """Fast views: clamp(matrix · (rows @ image_c @ cols^T) + shift, 0, 1), two GEMMs per view.

    src: the images (N, H, W*C) in HWC order as 0..255 in the GEMM dtype (exact in bf16);
    rows (N*V, S, H) and cols (N*V, S, W) from `resample_matrices` (crop, flip, resize and any
    blur) in *image-major* order, i.e. row i*V + k is view k of image i; matrix (N*V, C, C) and
    shift (N*V, C, 1) from `color_map`, or None. scratch(name, shape, dtype) may hand out
    buffers kept between calls. Returns a fresh float32 (V, N, C, S, S) in [0, 1] (view-major).

    Why this shape: the first GEMM stacks each image's V views' rows against the image once,
    straight from its HWC layout; the colour map is a K = C batched matmul; one transposing copy
    makes planes for the second GEMM, which resamples the columns. With the blur folded into
    rows and cols it comes before the colour map and the clamp (the exact recipe blurs after
    them). In bf16 (where `native_bf16_matmul`) the whole fast recipe ran 2x the exact views at
    96 px (bench/view_ops.py, docs/data.md), at ~3 significant digits per rounding.
    """
    n, h, wc = src.shape
    w, c = wc // channels, channels
    m, s = rows.shape[:2]
    v, dtype = m // n, src.dtype
    scratch = scratch or (lambda name, shape, dt: torch.empty(shape, dtype=dt, device=src.device))
    ry = torch.mul(rows.view(n, v * s, h), 1 / 255, out=scratch("rows", (n, v * s, h), dtype))
    t = torch.bmm(ry, src, out=scratch("t", (n, v * s, w * c), dtype)).view(m, s * w, c)
    if matrix is not None:  # K = C: cheaper on HWC rows than on the transposed planes
        t = torch.bmm(t, matrix.transpose(1, 2).to(dtype), out=scratch("mixed", t.shape, dtype))
    planes = scratch("planes", (m, c, s * w), dtype).copy_(t.transpose(1, 2))
    rx = scratch("cols", (m, s, w), dtype).copy_(cols)
    out = torch.bmm(planes.view(m, c * s, w), rx.transpose(1, 2),
                    out=scratch("out", (m, c * s, s), dtype))
    out = out.view(n, v, c, s, s).transpose(0, 1)
    views = torch.empty((v, n, c, s, s), device=src.device)
    if shift is None:
        views.copy_(out)
    else:  # the shift is added in float32, in the same pass as the cast
        torch.add(out, shift.view(n, v, c, 1, 1).transpose(0, 1), out=views)
    return views.clamp_(0.0, 1.0)


def crop_means(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N*V, C, 1) channel means in [0, 1] of the views rows @ image @ cols^T of
    `separable_views` (same arguments), without making them: (1^T rows) image (cols^T 1) / S^2,
    one small GEMM per image."""
    n, h, wc = src.shape
    m, s, w = cols.shape
    per_col = torch.bmm(rows.sum(1).view(n, m // n, h).to(src.dtype), src)  # (N, V, W*C)
    per_col = per_col.view(m, w, wc // w).float()
    return (cols.sum(1)[:, :, None] * per_col).sum(1)[:, :, None] / (255 * s * s)


def _axis_aligned_grid(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int,
                       size: int, out: torch.Tensor | None) -> torch.Tensor:
    # The same grid F.affine_grid builds for theta = [[sx, 0, tx], [0, sy, ty]], but built by
    # broadcasting: affine_grid's general batched matmul costs as much as the sampling itself.
    top, left, h, w = boxes.unbind(1)
    sx = torch.where(flip, -w, w) / width
    tx = (2 * left + w) / width - 1
    sy = h / height
    ty = (2 * top + h) / height - 1
    base = (torch.arange(size, device=boxes.device, dtype=torch.float32) * 2 + 1) / size - 1
    # Clamp to the box's outer pixel centres: the edge pixel is repeated, as when the crop is
    # cut out first and then resized, instead of blending in pixels from outside the box.
    gx = torch.addcmul(tx[:, None], sx[:, None], base).clamp_(
        ((2 * left + 1) / width - 1)[:, None], ((2 * (left + w) - 1) / width - 1)[:, None])
    gy = torch.addcmul(ty[:, None], sy[:, None], base).clamp_(
        ((2 * top + 1) / height - 1)[:, None], ((2 * (top + h) - 1) / height - 1)[:, None])
    m = boxes.shape[0]
    return torch.stack((gx[:, None, :].expand(m, size, size), gy[:, :, None].expand(m, size, size)),
                       dim=-1, out=out)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Whole-image resize to (size, size), antialiased when shrinking (like torchvision)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def jitter_matrices(
    brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
    hue: torch.Tensor, channels: int,
) -> torch.Tensor:
    """(M, 4, C, C) colour matrices of brightness, contrast, saturation, hue per sample.

    Contrast's matrix is only its scale part c*I; its shift (1-c)*mean is added at apply time
    because the mean depends on the image after the ops that precede it.
    """
    m, dev = brightness.shape[0], brightness.device
    eye = torch.eye(channels, device=dev)
    w = gray_weights(channels, dev)
    gray = torch.ones(channels, 1, device=dev) * w[None, :]  # every channel <- luma
    sat = saturation[:, None, None]
    mats = [
        brightness[:, None, None] * eye,
        contrast[:, None, None] * eye,
        sat * eye + (1 - sat) * gray,  # = identity when C == 1
        _hue_matrices(hue) if channels == 3 else eye.expand(m, 1, 1),
    ]
    return torch.stack(mats, dim=1)


def _hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """RGB matrices rotating chroma by hue * 360 degrees in YIQ space (DALI's hue op)."""
    yiq, yiq_inv = const(_YIQ, hue.device), const(_YIQ_INV, hue.device)
    theta = hue * (2 * math.pi)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return yiq_inv @ rot @ yiq


def color_jitter(x: torch.Tensor, mats: torch.Tensor, contrast: torch.Tensor,
                 order: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Apply the 4 jitter ops in per-sample order (M, 4), clamping after each as torchvision.

    x: contiguous (M, C, H, W), overwritten and returned; work: a scratch tensor like x. Each
    step is one batched matmul over the colour axis (sample m applies op order[m, k] at step
    k), written alternately into work and x: fresh 6 MB outputs cost more than the matmul.
    Contrast (op 1) blends with the mean luma of the image *at its step*.
    """
    m, c, h, w = x.shape
    src, dst = x.view(m, c, h * w), work.view(m, c, h * w)
    luma = gray_weights(c, x.device)
    rows = torch.arange(m, device=x.device)
    shift_coef = torch.zeros(m, 4, device=x.device)
    shift_coef[:, 1] = 1 - contrast
    for k in range(4):
        op = order[:, k]
        mean = src.mean(dim=2) @ luma  # (M,) mean luma, read before this step
        shift = (shift_coef[rows, op] * mean)[:, None, None]
        torch.baddbmm(shift, mats[rows, op], src, out=dst).clamp_(0.0, 1.0)
        src, dst = dst, src
    return x  # an even number of steps ends back in x


def fused_color(x: torch.Tensor, mats: torch.Tensor | None, contrast: torch.Tensor | None,
                order: torch.Tensor | None, gray: torch.Tensor | None,
                work: torch.Tensor) -> torch.Tensor:
    """Jitter (per-sample order) then grayscale as ONE affine colour map per sample, one clamp.

    DALI's ColorTwist semantics (solo-learn's DALI pipeline): the same ops and parameters as
    `color_jitter` + `grayscale`, but no clamp between them, so the chain collapses into a CxC
    matrix and a shift per sample: three passes over the image (a mean, one batched matmul, one
    clamp) instead of a mean, a matmul and a clamp per op plus the grayscale's two.
    Equal to the sequential ops wherever no intermediate value leaves [0, 1]. Contrast's mean
    luma at its step is exact: without clamps the mean maps through the affine chain.
    mats/contrast/order: as for color_jitter, or None (no jitter); gray: (M,) mask or None.
    x: contiguous (M, C, H, W), overwritten and returned; work: a scratch tensor like x.
    """
    m, c = x.shape[:2]
    flat = x.view(m, c, -1)
    mean = flat.mean(dim=2, keepdim=True) if mats is not None else None
    matrix, shift = color_map(mats, contrast, order, gray, mean, c)
    torch.baddbmm(shift, matrix, flat, out=work.view(m, c, -1))
    return torch.clamp(work, 0.0, 1.0, out=x)


def color_map(mats: torch.Tensor | None, contrast: torch.Tensor | None,
              order: torch.Tensor | None, gray: torch.Tensor | None, mean: torch.Tensor | None,
              channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine colour map (matrix (M, C, C), shift (M, C, 1)) of `fused_color`: the jitter
    chain in per-sample order, then grayscale, with no clamp in between. mean (M, C, 1) is the
    channel mean of the input (contrast blends with the mean luma at its step, which is the
    input's mean mapped along the chain); it may be None when mats is."""
    c = channels
    ref = mats if mats is not None else gray
    m, dev = ref.shape[0], ref.device
    luma = gray_weights(c, dev)
    matrix = torch.eye(c, device=dev).expand(m, c, c)
    shift = torch.zeros(m, c, 1, device=dev)
    if mats is not None:
        rows = torch.arange(m, device=dev)
        for k in range(4):
            op = order[:, k]
            mean_luma = (luma @ (matrix @ mean + shift)).view(m)
            blend = torch.where(op == 1, (1 - contrast) * mean_luma, 0.0)[:, None, None]
            step = mats[rows, op]
            matrix, shift = step @ matrix, step @ shift + blend
    if gray is not None and c > 1:
        to_luma = torch.ones(c, 1, device=dev) * luma[None, :]
        keep = gray[:, None, None]
        matrix = torch.where(keep, to_luma @ matrix, matrix)
        shift = torch.where(keep, to_luma @ shift, shift)
    return matrix, shift


def grayscale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In place: every channel becomes the luma where mask (M,); no-op for one channel."""
    m, c, h, w = x.shape
    if c == 1:
        return x
    flat = x.view(m, c, h * w)
    gray = torch.matmul(gray_weights(c, x.device)[None, :], flat)  # (M, 1, HW)
    torch.where(mask[:, None, None], gray, flat, out=flat)
    return x


def blur_kernel_size(size: int, frac: float) -> int:
    """Odd kernel ~frac of the image side (SimCLR: 10% -> 23 px at 224), at least 3."""
    return max(3, int(frac * size) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor, ksize: int,
                  work: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma (M,) where mask, reflect padding.

    x: contiguous (M, C, H, W), overwritten and returned; work: a scratch tensor like x.

    Unmasked samples get a delta kernel, which reproduces them, so the whole batch is blurred
    at once with no gather/scatter and no host sync. Small images multiply by per-sample band
    matrices (reflection built in): one GEMM per axis beats a depthwise convolution there.
    bf16=True runs those GEMMs in bfloat16 (float32 accumulation), at ~3 significant digits:
    worth it only where the hardware multiplies bf16 natively (`native_bf16_matmul`).
    """
    if x.device.type == "cpu" and max(x.shape[-2:]) > _SUBSET_MIN and not bool(mask.all()):
        # On CPU the blur's FLOPs are the cost at large sizes (half of all view work at 96 px):
        # blur only the samples whose coin said yes (bench/view_ops.py: 1.6-1.8x at 96 px, p = 0.5;
        # at 64 px the band matmuls are cheap and the gather/scatter did not pay). On GPUs
        # nonzero() would be a host sync per batch. The output is the same bit for bit.
        idx = mask.nonzero().squeeze(1)
        if len(idx):
            rows = x.view(x.shape[0], -1)  # 2-D: index_select copies whole rows, ~2x faster
            sub = rows.index_select(0, idx).view(len(idx), *x.shape[1:])
            sub = _blur(sub, gauss_kernels(sigma[idx], mask[idx], ksize), work[:len(idx)], bf16)
            rows.index_copy_(0, idx, sub.view(len(idx), -1))
        return x
    return _blur(x, gauss_kernels(sigma, mask, ksize), work, bf16)


@functools.lru_cache(maxsize=8)
def native_bf16_matmul(device: torch.device) -> bool:
    """True where bfloat16 matmuls run natively (CUDA compute capability >= 8, i.e. Ampere on;
    CPUs with AMX tiles or AVX512-BF16 dot products), i.e. are the fast kind; elsewhere bf16
    is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so guarded
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _blur(x: torch.Tensor, kern: torch.Tensor, work: torch.Tensor, bf16: bool = False
          ) -> torch.Tensor:
    """x (M, C, H, W) blurred in place with the (M, K) taps: band matmuls or convolutions."""
    if max(x.shape[-2:]) > _BAND_MAX:
        return x.copy_(_blur_conv(x, kern))
    m, c, h, w = x.shape
    band_w = _band(kern, w)
    band_h = band_w if h == w else _band(kern, h)
    if bf16:
        low = torch.bfloat16
        rows = torch.bmm(x.to(low).view(m, c * h, w), band_w.to(low).transpose(1, 2))
        out = torch.matmul(band_h.to(low)[:, None], rows.view(m, c, h, w))
        return x.copy_(out.clamp_(0.0, 1.0))  # bf16-rounded taps may sum to 1 + 2^-8
    rows = torch.bmm(x.view(m, c * h, w), band_w.transpose(1, 2), out=work.view(m, c * h, w))
    return torch.matmul(band_h[:, None], rows.view(m, c, h, w), out=x)


_BAND_MAX = 96  # above this side a band matmul costs more than a k-tap convolution
_SUBSET_MIN = 64  # above this side, CPUs blur only the masked samples


def gauss_kernels(sigma: torch.Tensor, mask: torch.Tensor, ksize: int) -> torch.Tensor:
    """(M, K) normalised Gaussian taps (torchvision's), a delta where mask is off."""
    half = ksize // 2
    pos = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    kern = torch.exp(-0.5 * (pos / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kern = kern / kern.sum(dim=1, keepdim=True)
    return torch.where(mask[:, None], kern, (pos == 0).to(torch.float32))


def _band(kern: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n, n) matrices B with (B @ v)[i] = sum_t kern[t] * v[reflect(i + t - K // 2)]."""
    m, k = kern.shape
    dev = kern.device
    idx = _reflect(torch.arange(n, device=dev)[:, None] + torch.arange(k, device=dev) - k // 2, n)
    mats = torch.zeros(m, n, n, device=kern.device)
    return mats.scatter_add_(2, idx.expand(m, n, k), kern[:, None, :].expand(m, n, k))


def _blur_conv(x: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
    """The same blur as two depthwise convolutions (one kernel per sample and channel)."""
    m, c, h, w = x.shape
    half = kern.shape[1] // 2
    kern = kern.repeat_interleave(c, dim=0)
    y = x.reshape(1, m * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), kern[:, None, None, :],
                 groups=m * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), kern[:, None, :, None],
                 groups=m * c)
    return y.view(m, c, h, w)


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """In place: invert pixels >= threshold (x -> 1 - x) in the samples where mask (M,)."""
    # A threshold above any pixel value switches the op off for unmasked samples.
    thr = torch.where(mask, threshold, 2.0)[:, None, None, None]
    return torch.where(x >= thr, 1.0 - x, x, out=x)
