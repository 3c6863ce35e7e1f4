"""The encoder every method shares (input normalisation -> backbone -> projector) and the
functions that rebuild a run's encoder from its `encoder.json` and newest checkpoint.

A run of a built-in backbone (`model.backbone=resnet18`, ...) rebuilds from its files alone. A
run of a wrapped module (`ssl_lab.models.from_module`, recorded as `model.backbone: module`)
needs that backbone passed again (`backbone=`): a run directory never makes ssl-lab import or
call code it names. `model.backbone=import:package.module:factory` is imported only when the
caller opts in (`allow_import=True`, or `--allow-import` on the command line).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config import ModelConfig
from ssl_lab.config_io import from_dict, short
from ssl_lab.errors import UserError
from ssl_lab.models import Projector, build_backbone
from ssl_lab.runtime import path_kind, read_json, short_path


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
        raise UserError(f"model.backbone={short(name)} is not a built-in backbone: pass the wrapped "
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
            raise UserError(f"model.backbone={short(name)} would import and run code; ssl-lab only does "
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
    """A run's encoder.json, checked (see `check_spec`): a damaged file is one line naming it."""
    path = Path(run_dir) / "encoder.json"
    if path_kind(path, "the run directory") != "file":
        raise UserError(f"{run_dir} is not an ssl-lab run directory (no encoder.json); pass the "
                        "directory that `ssl-lab train` created")
    return check_spec(read_json(path, "encoder.json", "restore it from a copy or train the run "
                                "again"), path)


# key -> what it must be, for the message; the checks are in check_spec
SPEC_KEYS = {"model": "a mapping of model.* keys", "in_chans": "an integer in 1..1024",
             "image_size": "an integer in 1..4096", "mean": "a list of in_chans numbers",
             "std": "a list of in_chans positive numbers", "dataset": "a dataset name",
             "backbone": "null or a mapping (a wrapped module's record)"}


def check_spec(spec: Any, path: Path) -> dict:
    """An encoder spec (encoder.json, or an export's copy of it) with every key the rebuild
    reads, of the right type: one line naming the file and the key otherwise."""
    fix = "restore it from a copy or train the run again"
    if not isinstance(spec, dict):
        raise UserError(f"{short_path(path)} holds {type(spec).__name__}, not an encoder spec "
                        f"(a JSON object); {fix}")
    missing = [k for k in SPEC_KEYS if k not in spec and k != "backbone"]  # backbone: optional
    if missing:
        raise UserError(f"{short_path(path)} has no '{missing[0]}' ({SPEC_KEYS[missing[0]]}): the "
                        f"file is damaged; {fix}")
    chans, mean, std = spec["in_chans"], spec["mean"], spec["std"]
    checks = {"in_chans": _int_in(chans, 1, 1024), "image_size": _int_in(spec["image_size"], 1, 4096),
              "mean": _numbers(mean, chans), "std": _numbers(std, chans) and all(v > 0 for v in std),
              "dataset": isinstance(spec["dataset"], str),
              "backbone": isinstance(spec.get("backbone"), (dict, type(None)))}
    bad = next((k for k, ok in checks.items() if not ok), None)
    if bad:
        raise UserError(f"{short_path(path)}: '{bad}' is {short(spec[bad])}, need "
                        f"{SPEC_KEYS[bad]}: the file is damaged; {fix}")
    try:
        from_dict(spec["model"], ModelConfig, "model.")
    except UserError as exc:
        raise UserError(f"{short_path(path)} is damaged ({exc}); {fix}") from None
    return spec


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _numbers(values: Any, n: Any) -> bool:
    return isinstance(values, list) and len(values) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values)


def encoder_from_spec(spec: dict, seed: int = 0, backbone: nn.Module | None = None,
                      allow_import: bool = False) -> Encoder:
    """The encoder `spec` (encoder.json) describes, freshly initialised from `seed`; a wrapped
    module's run needs its `backbone` (its weights are then re-initialised only by a checkpoint
    load, so pass a fresh module for a random-init encoder)."""
    model_cfg = from_dict(spec["model"], ModelConfig, "model.")
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
