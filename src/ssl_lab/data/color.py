"""Batched colour ops: jitter (brightness, contrast, saturation, hue), grayscale, solarize.

Tensors are float32 (M, C, H, W) in [0, 1], parameters per sample (see augment.py). The exact
recipe applies the jitter ops one at a time with torchvision's clamp after each
(`color_jitter`); the fast one collapses jitter + grayscale into one affine colour map per
sample (`color_map`, `fused_color`).
"""

from __future__ import annotations

import math

import torch

from ssl_lab.data.augment import const

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
GRAY_RGB = (0.2989, 0.587, 0.114)
# RGB -> YIQ; a hue shift is a rotation of the (I, Q) chroma plane that keeps luma Y.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_INV = tuple(map(tuple, torch.linalg.inv(torch.tensor(_YIQ, dtype=torch.float64)).tolist()))


def gray_weights(channels: int, device: torch.device) -> torch.Tensor:
    """Luma weights (C,); for one channel the "gray" image is the image itself."""
    return const(GRAY_RGB if channels == 3 else (1.0,), device)


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


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """In place: invert pixels >= threshold (x -> 1 - x) in the samples where mask (M,)."""
    # A threshold above any pixel value switches the op off for unmasked samples.
    thr = torch.where(mask, threshold, 2.0)[:, None, None, None]
    return torch.where(x >= thr, 1.0 - x, x, out=x)
