"""Batched augmentation primitives: every op takes a whole batch and per-sample parameters.

Tensors are float32 (M, C, H, W) in [0, 1] (M = views x samples). No function loops over
samples in Python and none calls `.item()`, so the ops run unchanged on CPU or CUDA without
a host sync. Parameters are sampled elsewhere (views.py); these functions are deterministic,
which is what makes `ViewGenerator.replay` exact.

This module: the geometric ops (crop boxes, crop + flip + resize by `grid_sample`, resize)
and the Gaussian blur. The colour ops are in color.py; crop + flip + resize (+ blur) as
resampling matrices, and the fast views made with them, in resample.py.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

N_CROP_TRIES = 10  # candidates per sample, as torchvision's RandomResizedCrop


@functools.lru_cache(maxsize=64)
def const(values: tuple, device: torch.device) -> torch.Tensor:
    """A small float32 constant on device, made once: torch.tensor(..., device="cuda") is a
    blocking host-to-device copy, i.e. a sync, if done on every call. Never modify it."""
    return torch.tensor(values, dtype=torch.float32, device=device)


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
    band_w = band_matrices(kern, w)
    band_h = band_w if h == w else band_matrices(kern, h)
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


def band_matrices(kern: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n, n) matrices B with (B @ v)[i] = sum_t kern[t] * v[reflect(i + t - K // 2)]."""
    m, k = kern.shape
    dev = kern.device
    idx = reflect_indices(torch.arange(n, device=dev)[:, None] + torch.arange(k, device=dev) - k // 2, n)
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


def reflect_indices(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) without repeating the edge (numpy's 'reflect'), repeated
    at the edges when n is smaller than the reach."""
    idx = torch.where(idx < 0, -idx, idx)
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx).clamp_(0, n - 1)
