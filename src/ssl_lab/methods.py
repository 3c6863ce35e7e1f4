"""Methods: a loss + the heads it needs + (for BYOL) a target network, chosen from a plain dict.

The encoder (input normalisation → backbone → projector) is shared by every method; a method
only says which extra heads exist and how the loss reads the forward pass's outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssl_lab import losses
from ssl_lab.config import MethodConfig, ModelConfig
from ssl_lab.errors import UserError
from ssl_lab.models import Projector, build_backbone


class Encoder(nn.Module):
    """Images in [0, 1] → named pooled features (backbone stages, backbone, projector layers).

    The dataset's channel statistics live here as buffers so an exported encoder normalises its
    inputs exactly as it did during training.
    """

    def __init__(self, model_cfg: ModelConfig, in_chans: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.backbone = build_backbone(model_cfg.backbone, width=model_cfg.width,
                                       last_width=model_cfg.last_width, in_chans=in_chans,
                                       image_size=image_size, stem=model_cfg.stem)
        self.projector = Projector(self.backbone.embed_dim, model_cfg.projector)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.feature_dims = {**self.backbone.feature_dims, **self.projector.feature_dims}
        self.layer_names = list(self.feature_dims)
        self.in_chans = in_chans
        self.image_size = image_size

    @property
    def out_dim(self) -> int:
        return self.projector.out_dim if self.projector.layer_names else self.backbone.embed_dim

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        unknown = [name for name in layers if name not in self.feature_dims]
        if unknown:
            raise UserError(f"unknown layer(s) {unknown}; valid layers: {', '.join(self.layer_names)}")
        x = (x - self.mean) / self.std
        proj_layers = [name for name in layers if name in self.projector.feature_dims]
        back_layers = [name for name in layers if name in self.backbone.feature_dims]
        if proj_layers and "backbone" not in back_layers:
            back_layers.append("backbone")
        out = self.backbone.features(x, back_layers)
        if proj_layers:
            out.update(self.projector.forward_layers(out["backbone"], proj_layers))
        return {name: out[name] for name in layers}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """z: the last projector layer (the backbone output when there is no projector)."""
        return self.features(x, [self.layer_names[-1]])[self.layer_names[-1]]


@dataclass(frozen=True)
class Method:
    loss: Callable[[dict, torch.Tensor, MethodConfig, torch.Generator | None], torch.Tensor]
    predictor: bool = False  # BYOL's online predictor
    target: bool = False  # an EMA copy of the encoder that produces the targets
    classifier: bool = False  # supervised cross-entropy head on z
    uses_labels: bool = False  # positives or targets come from labels


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
    return losses.multiview_barlow(out["z"], effective_beta(mc, out["z"].shape[-1]))


def _multiview_vicreg(out, labels, mc, generator):
    return losses.multiview_vicreg(out["z"], mc.sim_weight, mc.var_weight, mc.cov_weight)


def _supervised(out, labels, mc, generator):
    logits = out["logits"].float()  # (V, N, C): every view is a labelled example
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))


METHODS: dict[str, Method] = {
    "simclr": Method(_simclr),
    "supcon": Method(_supcon, uses_labels=True),
    "vicreg": Method(_vicreg),
    "barlow_twins": Method(_barlow),
    "byol": Method(_byol, predictor=True, target=True),
    "multiview_barlow": Method(_multiview_barlow),
    "multiview_vicreg": Method(_multiview_vicreg),
    "supervised": Method(_supervised, classifier=True, uses_labels=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method.name '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def effective_beta(mc: MethodConfig, dim: int) -> float:
    """papers.md §6: β only roughly ∝ 1/d, so the rule needs an anchor: β = β_ref · d_ref / d."""
    if mc.beta_scaling == "inverse_dim":
        return mc.beta * mc.beta_ref_dim / dim
    return mc.beta


class SSLModel(nn.Module):
    """Encoder + the method's heads. `forward` runs every view through the encoder in one pass."""

    def __init__(self, encoder: Encoder, method: Method, method_cfg: MethodConfig, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.predictor = _predictor(encoder.out_dim, method_cfg.predictor) if method.predictor else None
        self.classifier = nn.Linear(encoder.out_dim, num_classes) if method.classifier else None
        self.target = copy.deepcopy(encoder).requires_grad_(False) if method.target else None

    def forward(self, views: torch.Tensor, layers: Sequence[str],
                small: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`views` (V, N, C, S, S) → z (V, N, D) and the requested layers' features of `views`;
        multi-crop `small` views (k, N, C, s, s) get their own backbone pass (one per size) and
        are appended to z, p, logits and z_target as views V … V+k−1."""
        batch = views.shape[1]
        z_name = self.encoder.layer_names[-1]
        flat = views.flatten(0, 1)
        feats = self.encoder.features(flat, list(dict.fromkeys([*layers, z_name])))
        z = feats[z_name]
        if small is not None:
            small = small.flatten(0, 1)
            z = torch.cat([z, self.encoder(small)])
        out = {"features": feats, "z": z.unflatten(0, (-1, batch))}
        if self.predictor is not None:
            out["p"] = self.predictor(z).unflatten(0, (-1, batch))
        if self.classifier is not None:
            out["logits"] = self.classifier(z).unflatten(0, (-1, batch))
        if self.target is not None:
            with torch.no_grad():
                targets = [self.target(flat)] + ([self.target(small)] if small is not None else [])
                out["z_target"] = torch.cat(targets).unflatten(0, (-1, batch))
        return out

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


def _predictor(dim: int, hidden: str) -> Projector:
    """BYOL's predictor maps z back to z's width, so `method.predictor` only names hidden layers."""
    return Projector(dim, f"{hidden}-{dim}" if hidden.strip() else str(dim))


def byol_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: m = 1 − (1 − m0)·(cos(πk/K) + 1)/2, rising from m0 to 1."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2
