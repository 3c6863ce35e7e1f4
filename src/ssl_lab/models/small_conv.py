"""A Conv2d that runs as one dense matmul when its maps are tiny (4x4 or 2x2 pixels).

Why: on small images the last ResNet stages see 4x4 and 2x2 maps. There oneDNN's convolution
backward is several times slower than its forward (a 3x3, 128 -> 512 conv on 2x2 maps took
~27 % of a whole training step of the default model of the time on a 2-core Intel Xeon;
docs/RESULTS.md, "Small-map convolutions as one matmul"),
because a 2x2 map leaves almost nothing to parallelise or vectorise over. On such a map the
convolution is just a linear map from all C*H*W inputs to all O*H'*W' outputs whose
(O*H'*W') x (C*H*W) matrix repeats the kernel taps; built once per call from the weight
(its size does not depend on the batch), it turns forward and backward into three
well-shaped GEMMs (`bench/small_conv.py`).

Parameters, state dict, initialisation and output values are those of `nn.Conv2d` (equal up
to float summation order), so checkpoints and torchvision weights load unchanged. Larger maps,
groups, dilation and non-zero padding modes take `nn.Conv2d`'s own path.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

import torch
from torch import nn

MAX_DENSE_PIXELS = 16  # input H*W up to 4x4: beyond it the dense matrix is mostly zeros
MAX_DENSE_ENTRIES = 1 << 23  # 16 MB in bf16, rebuilt each call: caps the cost for wide models


def output_size(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                size: tuple[int, int]) -> tuple[int, int]:
    """(H', W') of a convolution (dilation 1) on an (H, W) map."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding,
                                                               strict=True))


@lru_cache(maxsize=64)
def tap_matrix(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               size: tuple[int, int], device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int, int]:
    """One-hot (H*W*H'*W', kh*kw) matrix: row (q, p) holds a 1 at the kernel tap that links
    input pixel q to output pixel p (none when q is outside p's window), and H', W'. Cached per
    device and dtype: a host-to-GPU copy in every forward would stall the launch queue."""
    (kh, kw), (sh, sw), (ph, pw), (h, w) = kernel, stride, padding, size
    oh, ow = output_size(kernel, stride, padding, size)
    taps = torch.zeros(h * w, oh * ow, kh * kw)
    for oy in range(oh):
        for ox in range(ow):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sh - ph + ky, ox * sw - pw + kx
                    if 0 <= iy < h and 0 <= ix < w:
                        taps[iy * w + ix, oy * ow + ox, ky * kw + kx] = 1.0
    return taps.reshape(-1, kh * kw).to(device, dtype), oh, ow


class _Transpose(torch.autograd.Function):
    """a.t().contiguous() for a 2-D tensor, with the same in backward. Both directions take
    torch's cache-blocked 2-D transpose copy; autograd's own backward of `.t().contiguous()`
    leaves a transposed gradient that a generic strided copy later makes contiguous, several
    times slower on the widest layer's weight."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        return a.t().contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.t().contiguous()


class _NCHW(torch.autograd.Function):
    """x.contiguous() (NCHW) whose gradient goes back in x's own layout: a channels_last
    network would otherwise get an NCHW gradient here and run the preceding ReLU and BN
    backward as mixed-layout loops, slower than one copy back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last) if ctx.channels_last else grad


def dense_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (groups 1, dilation 1) as one matmul.

    Rows of the dense matrix are ordered (channel, input pixel), i.e. an NCHW input flattened,
    and columns (output pixel, channel), so the output comes out channels_last. That order lets
    the matrix be built as tap-matrix @ weight with the weight's output channels innermost: one
    blocked transpose of the (small) weight instead of a strided permute of the (large) dense
    matrix, which had cost more than the matmuls themselves on the widest layer.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    if (kh, kw) == (1, 1) and padding == (0, 0):  # per-pixel: no tap matrix needed
        y = x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1) @ weight.view(o, c).t()
        y = y if bias is None else y + bias.to(y.dtype)
        return y.permute(0, 3, 1, 2)
    w2 = weight.reshape(o, c * kh * kw)
    if torch.is_autocast_enabled(x.device.type):  # cast before the transpose: half the bytes
        w2 = w2.to(torch.get_autocast_dtype(x.device.type))
    w_cto = _Transpose.apply(w2).view(c, kh * kw, o)
    taps, oh, ow = tap_matrix((kh, kw), stride, padding, (h, w), x.device, w_cto.dtype)
    dense = torch.matmul(taps, w_cto)  # (c, q*p, o): the dense matrix, rows (c, q), cols (p, o)
    y = _NCHW.apply(x).view(n, c * h * w) @ dense.view(c * h * w, oh * ow * o)
    if bias is not None:
        y = y.view(n, oh * ow, o) + bias.to(y.dtype)
    return y.view(n, oh, ow, o).permute(0, 3, 1, 2)


class SmallMapConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward is `dense_conv2d` where that wins: 1x1 convs on inputs of at
    most MAX_DENSE_PIXELS, and other kernels whose output is at most 2x2 pixels (at 4x4 -> 4x4
    the dense matrix is 61 % zeros and was no faster) with a dense matrix of at most
    MAX_DENSE_ENTRIES (a full-width ResNet-18's 2x2 stage, 2048 x 2048, fits)."""

    dense: ClassVar[bool] = True  # False: always nn.Conv2d's path (A/B in bench/small_conv.py)

    def uses_dense(self, x: torch.Tensor) -> bool:
        """True if forward(x) takes the dense-matmul path (only x's shape matters)."""
        h, w = x.shape[-2:]
        if not (self.dense and x.dim() == 4 and h * w <= MAX_DENSE_PIXELS and self.groups == 1
                and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple)):
            return False
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            return True
        oh, ow = output_size(self.kernel_size, self.stride, self.padding, (h, w))
        out_pixels = oh * ow
        entries = self.in_channels * h * w * self.out_channels * out_pixels
        return out_pixels <= 4 and entries <= MAX_DENSE_ENTRIES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_dense(x):
            return dense_conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)
