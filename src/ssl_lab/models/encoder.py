"""The encoder every method shares (input normalisation -> backbone -> projector) and the
functions that rebuild a run's encoder from its `encoder.json` and newest checkpoint.

A run of a built-in backbone (`model.backbone=resnet18`, ...) rebuilds from its files alone. A
run of a wrapped module (`ssl_lab.models.from_module`, recorded as `model.backbone: module`)
needs that backbone passed again (`backbone=`): a run directory never makes ssl-lab import or
call code it names. `model.backbone=import:package.module:factory` is imported only when the
caller opts in (`allow_import=True`, or `--allow-import` on the command line).
"""

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
                 mean: Sequence[float], std: Sequence[float], backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else build_model_backbone(
            model_cfg, in_chans, image_size)
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


VIT_KEYS = {"patch_size": "patch_size", "depth": "depth", "heads": "heads", "embed_dim": "dim"}
# model.backbone values that name no built-in backbone
WRAPPED, IMPORT_PREFIX = "module", "import:"


def build_model_backbone(model_cfg: ModelConfig, in_chans: int, image_size: int) -> nn.Module:
    """A built-in backbone from the model section (ViT keys only for ViTs; 0 = the preset's)."""
    name = model_cfg.backbone
    if name == WRAPPED or name.startswith(IMPORT_PREFIX):
        raise UserError(f"model.backbone={name!r} is not a built-in backbone: pass the wrapped "
                        "module as backbone= (Python), or an import: factory with allow_import")
    vit = {arg: getattr(model_cfg, key) for key, arg in VIT_KEYS.items() if getattr(model_cfg, key)}
    if name.startswith("vit"):
        vit["pool"] = model_cfg.pool
    elif vit:
        raise UserError(f"model.{next(k for k, a in VIT_KEYS.items() if a in vit)} applies to ViT "
                        f"backbones only (model.backbone={name}); set it to 0")
    return build_backbone(name, width=model_cfg.width, last_width=model_cfg.last_width,
                          in_chans=in_chans, image_size=image_size, stem=model_cfg.stem, **vit)


def given_backbone(name: str, backbone: nn.Module | None, allow_import: bool,
                   recorded: dict | None = None) -> nn.Module | None:
    """The backbone a run of `model.backbone=name` uses when it is not built in: the one passed
    (checked against the widths the run recorded, if any), or an opted-in import: factory."""
    if name.startswith(IMPORT_PREFIX) and backbone is None:
        if not allow_import:
            raise UserError(f"model.backbone={name!r} would import and run code; ssl-lab only does "
                            "that when asked: add --allow-import (CLI) or allow_import=True")
        from ssl_lab.models.wrap import load_factory

        backbone = load_factory(name)
    if backbone is None:
        if name == WRAPPED:
            module = (recorded or {}).get("module_class", "a wrapped module")
            raise UserError(f"this run trained {module} wrapped with ssl_lab.models.from_module; "
                            "rebuild it in Python and pass it as backbone=")
        return None
    if recorded is not None and recorded.get("feature_dims") not in (None, backbone.feature_dims):
        raise UserError(f"the backbone passed has layers {backbone.feature_dims} but the run "
                        f"recorded {recorded['feature_dims']}; pass the module the run trained")
    return backbone


def read_spec(run_dir: Path) -> dict:
    path = Path(run_dir) / "encoder.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an ssl-lab run directory (no encoder.json); pass the "
                        "directory that `ssl-lab train` created")
    return json.loads(path.read_text())


def encoder_from_spec(spec: dict, seed: int = 0, backbone: nn.Module | None = None,
                      allow_import: bool = False) -> Encoder:
    """The encoder `spec` (encoder.json) describes, freshly initialised from `seed`; a wrapped
    module's run needs its `backbone` (its weights are then re-initialised only by a checkpoint
    load, so pass a fresh module for a random-init encoder)."""
    model_cfg = ModelConfig(**spec["model"])
    backbone = given_backbone(model_cfg.backbone, backbone, allow_import, spec.get("backbone"))
    torch.manual_seed(seed)
    return Encoder(model_cfg, spec["in_chans"], spec["image_size"], spec["mean"], spec["std"],
                   backbone=backbone)


def load_encoder(run_dir: Path, backbone: nn.Module | None = None,
                 allow_import: bool = False) -> Encoder:
    """The trained encoder of a run (its newest verified checkpoint), in eval mode. A wrapped
    module's run needs `backbone=` (whose weights are replaced by the checkpoint's)."""
    encoder = encoder_from_spec(read_spec(run_dir), backbone=backbone, allow_import=allow_import)
    found = ckpt_io.find_checkpoint(Path(run_dir))
    if found is None:
        raise UserError(f"no complete checkpoint in {run_dir}/checkpoints; train the run first "
                        "(or resume it with resume=true)")
    holder = torch.nn.Module()
    holder.encoder = encoder
    ckpt_io.load_weights(found, {"model": holder}, strict=False)
    return encoder.eval()
