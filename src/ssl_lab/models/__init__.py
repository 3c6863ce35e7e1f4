"""Backbones and projectors.

Every backbone built by `build_backbone` exposes (timm-like):

- `embed_dim`, `feature_dims` ({layer name: width}, shallow -> deep, ending with "backbone")
  and `layer_names`, all DECLARED from the constructor arguments (never a dummy forward);
- `forward(x)` -> (N, embed_dim), `forward_features(x)` -> unpooled last map / tokens,
  `features(x, layers)` -> {name: pooled (N, C)} computing only as deep as needed;
- `config`: JSON-serialisable constructor arguments; `build_backbone(**config)` rebuilds it.

Layer names, used by every probe, evaluation and plot: ResNet `stage1`..`stage3` + `backbone`;
ViT `block1`..`blockL` + `backbone`; projector `proj1`..`projN`.

ViTs: `vit` is a toy for small images on a CPU (patch 4, dim 192, depth 6, heads 3);
`vit_tiny`, `vit_small`, `vit_base` are ViT-Ti/16, ViT-S/16, ViT-B/16. `patch_size`, `dim`,
`depth`, `heads`, `mlp_ratio` and `pool` override a preset.

`from_module(net, layers={...})` wraps any `nn.Module` (its widths measured by one dummy
forward, the only exception to "declared"); it has no `build_backbone` name and no
`last_width` (`supports_last_width` is False).
"""

from __future__ import annotations

from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.models.base import Backbone
from ssl_lab.models.projector import LayerSpec, Projector, parse_projector_spec
from ssl_lab.models.resnet import ARCHS as RESNETS
from ssl_lab.models.resnet import ResNet
from ssl_lab.models.vit import PRESETS as VITS
from ssl_lab.models.vit import ViT
from ssl_lab.models.wrap import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModuleBackbone,
    from_module,
    load_factory,
)

BACKBONES: tuple[str, ...] = (*RESNETS, *VITS)

# options each family accepts beyond the common keyword arguments of build_backbone
_EXTRA = {
    "resnet": ("zero_init_residual",),
    "vit": ("patch_size", "dim", "depth", "heads", "mlp_ratio", "pool"),
}


def build_backbone(name: str, *, width: float = 1.0, last_width: int | None = None,
                   in_chans: int = 3, image_size: int = 32, stem: str = "cifar",
                   **kwargs) -> nn.Module:
    """Build a backbone by name (one of BACKBONES); UserError on an unknown name or option.

    ViT options (`patch_size`, `dim`, `depth`, `heads`, `mlp_ratio`, `pool`) override the
    preset's. `stem` only applies to ResNets (a ViT has a patch embedding instead and ignores it).
    """
    family = "resnet" if name in RESNETS else "vit" if name in VITS else None
    if family is None:
        raise UserError(f"unknown backbone {short(name)}; choose one of {', '.join(BACKBONES)}")
    unknown = sorted(set(kwargs) - set(_EXTRA[family]))
    if unknown:
        raise UserError(f"unknown option {short(unknown[0])} for backbone {name}; "
                        f"valid extra options: {', '.join(_EXTRA[family])}")
    common = dict(width=width, last_width=last_width, in_chans=in_chans, image_size=image_size)
    if family == "resnet":
        return ResNet(name, stem=stem, **common, **kwargs)
    return ViT(name, **common, **kwargs)


__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "ModuleBackbone",
    "LayerSpec",
    "Projector",
    "ResNet",
    "ViT",
    "build_backbone",
    "from_module",
    "load_factory",
    "parse_projector_spec",
]
