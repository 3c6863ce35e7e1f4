"""Helpers shared by the loss functions: input checks, float32 compute, off-diagonal view."""

from __future__ import annotations

import torch
from torch import Tensor


def check_views(z: Tensor, name: str = "z") -> tuple[int, int, int]:
    """Return (V, N, D) of a views tensor, or raise ValueError naming what is wrong.

    Every loss takes embeddings as (V, N, D): V >= 2 views of the same N >= 2 samples
    (N >= 2 because batch statistics and negatives need at least two samples).
    """
    if not isinstance(z, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (V, N, D), got {type(z).__name__}")
    if z.ndim != 3:
        raise ValueError(
            f"{name} must have shape (V, N, D) = (views, samples, dims), got {tuple(z.shape)}"
        )
    V, N, D = z.shape
    if V < 2:
        raise ValueError(f"{name} needs at least 2 views (V >= 2), got shape {tuple(z.shape)}")
    if N < 2:
        raise ValueError(f"{name} needs at least 2 samples (N >= 2), got shape {tuple(z.shape)}")
    if D < 1:
        raise ValueError(f"{name} needs at least 1 dimension (D >= 1), got shape {tuple(z.shape)}")
    return V, N, D


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype losses compute in: at least float32 (bf16/fp16 are upcast, float64 is kept,
    so gradcheck and float64 references work on the same code path)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def no_autocast(t: Tensor) -> torch.autocast:
    """Context that switches autocast off for t's device: inside it, matmuls stay in the
    dtype of their (upcast) inputs instead of being recast to bf16/fp16."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def off_diagonal(m: Tensor) -> Tensor:
    """Flattened off-diagonal entries of a square matrix (the trick of the authors' code:
    dropping the last element and viewing as (n-1, n+1) puts the diagonal in column 0)."""
    n, n2 = m.shape
    if n != n2:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(m.shape)}")
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
