"""Images to encoder inputs: channels matched and resized, so any dataset can be probed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """float (N, C, H, W): grey repeated to RGB, RGB to luminance, else unchanged."""
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and in_chans == 1:
        return (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


def to_model_input(batch: torch.Tensor, in_chans: int, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, in_chans, size, size) in [0, 1]: channels matched (grey
    repeated to RGB, RGB to luminance) and resized, so any dataset can be probed (transfer).
    This is also the augmented protocol's centre view of val and test images."""
    x = match_channels(batch.permute(0, 3, 1, 2).float().div_(255), in_chans)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)
