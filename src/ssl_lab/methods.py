"""Methods: a loss + the heads it needs + (BYOL, MoCo v3, DINO) a target network, chosen from a
plain dict.

The encoder (input normalisation → backbone → projector) is shared by every method; a method
only says which extra heads exist, how the loss reads the forward pass's outputs, and what
happens around each optimizer step (EMA targets, DINO's center, a frozen last layer). DINO's
head is the encoder's projector (a spec such as "2048g-2048g-256u-65536w", models/projector.py),
so its layers are probed, exported and read by RCDM like any projector layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ssl_lab import dist, losses
from ssl_lab.config import MethodConfig
from ssl_lab.errors import UserError
from ssl_lab.models import Projector
from ssl_lab.models.encoder import Encoder


@dataclass(frozen=True)
class Method:
    loss: Callable[[dict, torch.Tensor, MethodConfig, torch.Generator | None], torch.Tensor]
    predictor: bool = False  # an online predictor after the projector (BYOL, MoCo v3, SimSiam)
    target: bool = False  # an EMA copy of the encoder that produces the targets
    classifier: bool = False  # supervised cross-entropy head on z
    uses_labels: bool = False  # positives or targets come from labels
    # DINO: the target (teacher) sees only the global views; a center buffer, a teacher
    # temperature schedule and a last layer frozen at the start
    self_distillation: bool = False


def _simclr(out, labels, mc, generator):
    return losses.simclr(out["z"], mc.temperature, mc.negatives, generator)


def _supcon(out, labels, mc, generator):
    return losses.supcon(out["z"], labels, mc.temperature)


def _vicreg(out, labels, mc, generator):
    return losses.vicreg(out["z"], mc.sim_weight, mc.var_weight, mc.cov_weight)


def _barlow(out, labels, mc, generator):
    return losses.barlow_twins(out["z"], mc.lambd)


def _byol(out, labels, mc, generator):
    return losses.byol(out["p"], out["z_target"])


def _multiview_barlow(out, labels, mc, generator):
    z = out["z"]
    beta = effective_beta(mc, z.shape[-1])
    if z.shape[0] == 2:
        # The authors' code (Ghosh et al. 2024) trains 2 views with plain Barlow Twins, β as its
        # off-diagonal weight: the mean-embedding form's invariance term is ~1/4 of Barlow's there
        return losses.barlow_twins(z, beta)
    return losses.multiview_barlow(z, beta)


def _multiview_vicreg(out, labels, mc, generator):
    return losses.multiview_vicreg(out["z"], mc.sim_weight, mc.var_weight, mc.cov_weight)


def _supervised(out, labels, mc, generator):
    logits = out["logits"].float()  # (V, N, C): every view is a labelled example
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))


def _simsiam(out, labels, mc, generator):
    return losses.simsiam(out["p"], out["z"])


def _mocov3(out, labels, mc, generator):
    return losses.mocov3(out["p"], out["z_target"], mc.temperature)


def _dino(out, labels, mc, generator):
    return losses.dino(out["z"], out["z_target"], out["center"], mc.student_temp,
                       out["teacher_temp"])


METHODS: dict[str, Method] = {
    "simclr": Method(_simclr),
    "supcon": Method(_supcon, uses_labels=True),
    "vicreg": Method(_vicreg),
    "barlow_twins": Method(_barlow),
    "byol": Method(_byol, predictor=True, target=True),
    "multiview_barlow": Method(_multiview_barlow),
    "multiview_vicreg": Method(_multiview_vicreg),
    "supervised": Method(_supervised, classifier=True, uses_labels=True),
    "simsiam": Method(_simsiam, predictor=True),
    "mocov3": Method(_mocov3, predictor=True, target=True),
    "dino": Method(_dino, target=True, self_distillation=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method.name '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def effective_beta(mc: MethodConfig, dim: int) -> float:
    """Ghosh et al. 2024: β only roughly ∝ 1/d, so the rule needs an anchor: β = β_ref · d_ref / d."""
    if mc.beta_scaling == "inverse_dim":
        return mc.beta * mc.beta_ref_dim / dim
    return mc.beta


@dataclass(frozen=True)
class Progress:
    """Where the training loop is: what schedules inside a method (EMA momentum, DINO's teacher
    temperature, a frozen last layer) are functions of."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> float:
        return self.step / max(self.steps_per_epoch, 1)


class SSLModel(nn.Module):
    """Encoder + the method's heads. `forward` runs every view through the encoder in one pass.

    The training loop calls, around each optimizer step: `begin_step(progress)` before the
    forward pass, `before_update()` after backward (gradients may be edited), `end_step(out)`
    after the optimizer step (EMA targets and other non-gradient state); and builds the
    optimizer from `trainable_modules()`. Every piece of state a schedule needs is either a
    function of the Progress (restored with the step on resume) or a buffer (checkpointed
    with the weights): DINO's `center`.
    """

    def __init__(self, encoder: Encoder, method: Method, method_cfg: MethodConfig, num_classes: int):
        super().__init__()
        self.method_cfg = method_cfg
        self.progress = Progress(0, 1, 1)
        self.encoder = encoder
        self.predictor = _predictor(encoder.out_dim, method_cfg.predictor) if method.predictor else None
        if self.predictor is not None and method_cfg.predictor_fixed_lr:
            self.predictor.fixed_lr = True  # optim.param_groups: SimSiam's constant predictor lr
        self.classifier = nn.Linear(encoder.out_dim, num_classes) if method.classifier else None
        self.target = copy.deepcopy(encoder).requires_grad_(False) if method.target else None
        self.self_distillation = method.self_distillation
        if method.self_distillation:
            self.register_buffer("center", torch.zeros(encoder.out_dim))
            # a buffer, not a Python float read in forward: torch.compile would recompile the
            # forward for every new value; not saved (begin_step recomputes it from the step)
            self.register_buffer("teacher_temp", torch.tensor(
                teacher_temperature(method_cfg, 0.0)), persistent=False)
        else:
            self.center = self.teacher_temp = None

    def forward(self, views: torch.Tensor, layers: Sequence[str],
                small: torch.Tensor | None = None) -> dict[str, Any]:
        """`views` (V, N, C, S, S) → z (V, N, D) and the requested layers' features of `views`;
        multi-crop `small` views (k, N, C, s, s) get their own backbone pass (one per size) and
        are appended to z, p and logits as views V … V+k−1, and to z_target except for DINO,
        whose teacher sees only the V global views. DINO also returns its `center` and the
        current `teacher_temp` (0-dim tensors) for the loss."""
        batch = views.shape[1]
        z_name = self.encoder.layer_names[-1]
        flat = views.flatten(0, 1)
        feats = self.encoder.features(flat, list(dict.fromkeys([*layers, z_name])))
        z = feats[z_name]
        if small is not None:
            small = small.flatten(0, 1)
            z = torch.cat([z, self.encoder(small)])
        out: dict[str, Any] = {"features": feats, "z": z.unflatten(0, (-1, batch))}
        if self.predictor is not None:
            out["p"] = self.predictor(z).unflatten(0, (-1, batch))
        if self.classifier is not None:
            out["logits"] = self.classifier(z).unflatten(0, (-1, batch))
        if self.target is not None:
            teacher_small = small is not None and not self.self_distillation
            with torch.no_grad():
                targets = [self.target(flat)] + ([self.target(small)] if teacher_small else [])
                out["z_target"] = torch.cat(targets).unflatten(0, (-1, batch))
        if self.center is not None:
            out["center"] = self.center
            out["teacher_temp"] = self.teacher_temp
        return out

    def trainable_modules(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.predictor, self.classifier) if m is not None]

    def begin_step(self, progress: Progress) -> None:
        self.progress = progress
        if self.teacher_temp is not None:
            self.teacher_temp.fill_(teacher_temperature(self.method_cfg, progress.epoch))

    def before_update(self) -> None:
        """Between backward and the optimizer step: DINO's per-parameter gradient clipping
        (`method.clip_grad`, any method), then, while the last layer is frozen, its gradients
        are dropped (None: the optimizer then skips it, weight decay included)."""
        mc = self.method_cfg
        if mc.clip_grad > 0:
            clip_gradients(self.parameters(), mc.clip_grad)
        if self.self_distillation and self.progress.epoch < mc.freeze_last_layer_epochs:
            for param in self.last_layer_parameters():
                param.grad = None

    def end_step(self, out: dict[str, Any]) -> None:
        p = self.progress
        self.update_target(byol_momentum(self.method_cfg.momentum, p.step, p.total_steps))
        if self.center is not None:
            self.update_center(out["z_target"])

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The projector's last block (DINO's prototypes); none for an identity projector."""
        blocks = self.encoder.projector.blocks
        return list(blocks[-1].parameters()) if len(blocks) else []

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """BYOL: target ← m·target + (1−m)·online; buffers (BN statistics) are copied."""
        if self.target is None:
            return
        online = list(self.encoder.parameters())
        target = list(self.target.parameters())
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1 - momentum)
        for t_buf, o_buf in zip(self.target.buffers(), self.encoder.buffers(), strict=True):
            t_buf.copy_(o_buf)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """DINO: center ← c·center + (1−c)·mean of the teacher's outputs over every global
        view of the GLOBAL batch (gathered across ranks: the same center everywhere)."""
        batch_center = dist.gather_views(teacher.detach().float()).mean(dim=(0, 1))
        c = self.method_cfg.center_momentum
        self.center.mul_(c).add_(batch_center, alpha=1 - c)


def _predictor(dim: int, hidden: str) -> Projector:
    """BYOL's predictor maps z back to z's width, so `method.predictor` only names hidden layers."""
    return Projector(dim, f"{hidden}-{dim}" if hidden.strip() else str(dim))


def byol_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: m = 1 − (1 − m0)·(cos(πk/K) + 1)/2, rising from m0 to 1."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def teacher_temperature(mc: MethodConfig, epoch: float) -> float:
    """DINO's teacher temperature: linear from `warmup_teacher_temp` at epoch 0 to
    `teacher_temp` at `warmup_teacher_temp_epochs` (fractional epochs), constant after."""
    warmup = mc.warmup_teacher_temp_epochs
    if warmup <= 0 or epoch >= warmup:
        return mc.teacher_temp
    return mc.warmup_teacher_temp + (mc.teacher_temp - mc.warmup_teacher_temp) * epoch / warmup


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's `clip_gradients`: each parameter's gradient on its own is scaled down to L2 norm
    `max_norm` when it is larger (factor max_norm / (norm + 1e-6)); no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    for grad, norm in zip(grads, torch._foreach_norm(grads), strict=True):
        grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
