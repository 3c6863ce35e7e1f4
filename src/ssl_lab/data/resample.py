"""Crop + flip + resize (+ blur) as resampling matrices, and the fast views made with them.

A view is rows @ image @ cols^T per channel, rows (S, H) and cols (S, W) per sample
(`resample_matrices`). The exact antialiased crop (`crop_flip_resize_antialiased`) applies
them as two matmuls; the fast recipe's `separable_views` as two GEMMs per view with the colour
map of color.py between them. Tensors as in augment.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ssl_lab.data.augment import band_matrices, reflect_indices


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
            band = band_matrices(blur, size)
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
        src = reflect_indices(torch.arange(s, device=idx.device)[:, None]
                       + torch.arange(k, device=idx.device) - k // 2, s).flatten()
        idx, weight = (t.index_select(1, src).view(m, s, k, taps) for t in (idx, weight))
    return idx.reshape(m, s, k * taps), (weight * blur[:, None, :, None]).view(m, s, k * taps)


def _scatter_taps(idx: torch.Tensor, weight: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    return into.zero_().scatter_add_(2, idx, weight)


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
