"""The encoder every method shares (input normalisation -> backbone -> projector) and the
functions that rebuild a run's encoder from its `encoder.json` and newest checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config import ModelConfig
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


def read_spec(run_dir: Path) -> dict:
    path = Path(run_dir) / "encoder.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an ssl-lab run directory (no encoder.json); pass the "
                        "directory that `ssl-lab train` created")
    return json.loads(path.read_text())


def encoder_from_spec(spec: dict, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelConfig(**spec["model"]), spec["in_chans"], spec["image_size"],
                   spec["mean"], spec["std"])


def load_encoder(run_dir: Path) -> Encoder:
    """The trained encoder of a run (its newest verified checkpoint), in eval mode."""
    encoder = encoder_from_spec(read_spec(run_dir))
    found = ckpt_io.find_checkpoint(Path(run_dir))
    if found is None:
        raise UserError(f"no complete checkpoint in {run_dir}/checkpoints; train the run first "
                        "(or resume it with resume=true)")
    holder = torch.nn.Module()
    holder.encoder = encoder
    ckpt_io.load_weights(found, {"model": holder}, strict=False)
    return encoder.eval()
