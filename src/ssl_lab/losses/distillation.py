"""Self-distillation loss: DINO's cross-entropy between a centred, sharpened teacher and a
student, over every (teacher crop, student crop) pair of different crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_views, compute_dtype, no_autocast


def _check_dino_inputs(student: Tensor, teacher: Tensor, center: Tensor) -> None:
    _, N, K = check_views(student, "student")
    if not isinstance(teacher, Tensor) or teacher.ndim != 3:
        shape = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
        raise ValueError(f"teacher must have shape (Vt, N, K), got {shape}")
    if not 1 <= teacher.shape[0] <= student.shape[0] or teacher.shape[1:] != (N, K):
        raise ValueError(
            f"teacher (Vt, N, K) must hold the first Vt >= 1 of the student's {student.shape[0]} "
            f"crops of the same N={N} samples and K={K} outputs, got {tuple(teacher.shape)}"
        )
    if not isinstance(center, Tensor) or tuple(center.shape) != (K,):
        shape = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
        raise ValueError(f"center must have shape (K,) = ({K},), got {shape}")


def dino(
    student: Tensor,
    teacher: Tensor,
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float | Tensor = 0.04,
) -> Tensor:
    """DINO loss (Caron et al. 2021), the authors' `DINOLoss.forward` without its center update.

    student: logits (Vs, N, K) of all crops, the first Vt of which are the global crops the
    teacher saw; teacher: logits (Vt, N, K); center: (K,). Teacher probabilities
        q_t = softmax((teacher_t − center) / teacher_temp), detached,
    and the loss is the mean over the Vt·Vs − Vt pairs (t, s) with s ≠ t of the batch mean of
        −Σ_k q_t,k · log_softmax(student_s / student_temp)_k.
    The center's EMA update and the teacher-temperature schedule belong to the method
    (ssl_lab.methods), not to this function; the method passes teacher_temp as a 0-dim
    tensor (its value is then not checked here: that would synchronise with the device).
    Computed in float32 (float64 inputs stay float64) with autocast off; returns a 0-dim tensor.
    """
    _check_dino_inputs(student, teacher, center)
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if not isinstance(temp, Tensor) and not temp > 0:
            raise ValueError(f"{name} must be > 0, got {temp}")
    Vt, Vs, N = teacher.shape[0], student.shape[0], student.shape[1]
    with no_autocast(student):
        dtype = compute_dtype(student, teacher)
        log_p = F.log_softmax(student.to(dtype) / student_temp, dim=-1)  # (Vs, N, K)
        q = F.softmax((teacher.detach().to(dtype) - center.detach().to(dtype)) / teacher_temp,
                      dim=-1)  # (Vt, N, K)
        cross = -torch.einsum("tnk,snk->ts", q, log_p) / N  # (Vt, Vs): batch-mean cross-entropy
        pairs = torch.ones(Vt, Vs, dtype=torch.bool, device=student.device)
        pairs[torch.arange(Vt), torch.arange(Vt)] = False  # a crop is never its own target
        return cross[pairs].sum() / (Vt * Vs - Vt)
