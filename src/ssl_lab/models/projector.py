"""Projector heads built from a spec string.

Grammar: dash-separated output widths, one token per Linear layer, each an integer followed by
optional single-letter flags (order free, each at most once, at most one of b/r/l/g/s/u/w,
except b with g)::

    spec   := "" | "none" | token ("-" token)*
    token  := WIDTH FLAGS        e.g. 512, 512b, 64n, 128nl, 2048g, 256u, 4096w
    n      Linear without bias
    b      BatchNorm1d + ReLU after this Linear
    r      ReLU only (no BatchNorm) after this Linear
    l      plain Linear: no BatchNorm, no ReLU
    g      GELU only after this Linear (DINO's head); with b: BatchNorm1d + GELU (DINO's
           head with use_bn_in_head)
    s      BatchNorm1d without affine parameters, no ReLU (the last layer of SimSiam's and
           MoCo v3's projectors)
    u      the output L2-normalised to unit length (DINO's bottleneck)
    w      weight-normalised Linear without bias whose weight rows have unit norm: the output
           is the cosine-like score of the input against WIDTH prototypes (DINO's last layer,
           weight norm with its gain fixed at 1)

Without b/r/l/g/s/u/w a hidden layer gets BN + ReLU and the last layer gets nothing. Layers
flagged g or u are initialised as DINO's head (truncated normal, std 0.02, zero bias); all
others keep torch's Linear initialisation. Examples:

    "512-512-128"  Linear(D,512)-BN-ReLU, Linear(512,512)-BN-ReLU, Linear(512,128)
    "512-128b"     ... Linear(512,128)-BN-ReLU (BN + ReLU on the last layer too)
    "64n-64"       Linear(D,64,bias=False)-BN-ReLU-Linear(64,64): the projector of Ghosh et
                   al. (NeurIPS 2024, the fastssl code)
    "2048r-128"    Linear(D,2048)-ReLU-Linear(2048,128): SimCLR v1 (no BN)
    "128"          one Linear(D,128): a linear projector (Expand or Narrow, Bordes et al. 2023)
    "2048n-2048n-2048ns"          SimSiam's projector (BN without affine on the output)
    "4096n-256ns"                 MoCo v3's ResNet projector
    "2048g-2048g-256u-65536w"     DINO's head: proj3 = the L2-normalised bottleneck,
                                  proj4 = the prototype scores (the logits)
    "2048bg-2048bg-256u-65536w"   the same with BatchNorm in its hidden layers
    "" / "none"    identity: z = h, no layers

Layer names: `proj1` ... `projN`, the output of block k after its activation (or
normalisation); `projN` = z.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError

_TOKEN = re.compile(r"^(\d+)([a-z]*)$")
_FLAGS = "nbrlgsuw"
_KINDS = "brlgsuw"  # what follows the Linear: at most one per token
_HELP = ("expected dash-separated widths with optional flags n (no bias), b (BN+ReLU), "
         "r (ReLU), l (linear), g (GELU), s (BN without affine), u (unit norm), "
         "w (weight-normalised prototypes), e.g. '512-512-128', '64n-64' or "
         "'2048g-2048g-256u-4096w', or 'none'")


@dataclass(frozen=True)
class LayerSpec:
    """One projector block: Linear(in, width, bias) (weight-normalised with `weight_norm`), then
    optional BatchNorm1d (with or without affine), ReLU or GELU, or L2 normalisation."""

    width: int
    bias: bool = True
    bn: bool = False
    relu: bool = False
    gelu: bool = False
    affine: bool = True  # of the BatchNorm
    unit_norm: bool = False
    weight_norm: bool = False


def parse_projector_spec(spec: str) -> list[LayerSpec]:
    """Parse a spec string (grammar in the module docstring); UserError quoting a bad spec."""
    text = (spec or "").strip().lower()
    if text in ("", "none"):
        return []
    tokens = [t.strip() for t in text.split("-")]
    return [_parse_token(tok, spec, last=i == len(tokens) - 1) for i, tok in enumerate(tokens)]


def _parse_token(tok: str, spec: str, last: bool) -> LayerSpec:
    m = _TOKEN.match(tok)
    bad = f"bad projector spec {short(spec)}: token {short(tok)}"
    if m is None or any(f not in _FLAGS for f in m.group(2)):
        raise UserError(f"{bad}; {_HELP}")
    width, flags = int(m.group(1)), m.group(2)
    if width < 1:
        raise UserError(f"{bad} has width 0; widths must be >= 1")
    kinds = "".join(sorted(f for f in flags if f in _KINDS))
    if len(set(flags)) != len(flags) or len(kinds) > 1 and kinds != "bg":
        raise UserError(f"{bad} repeats a flag or mixes {'/'.join(_KINDS)} (only b with g); "
                        f"{_HELP}")
    if not kinds:  # default: hidden layers Linear-BN-ReLU, the last layer a plain Linear
        return LayerSpec(width, bias="n" not in flags, bn=not last, relu=not last)
    if kinds == "bg":  # BatchNorm, then GELU instead of ReLU
        return LayerSpec(width, bias="n" not in flags, bn=True, gelu=True)
    return LayerSpec(width, bias="n" not in flags and kinds != "w", bn=kinds in "bs",
                     relu=kinds in "br", gelu=kinds == "g", affine=kinds != "s",
                     unit_norm=kinds == "u", weight_norm=kinds == "w")


class L2Norm(nn.Module):
    """Rows scaled to unit L2 norm (DINO's bottleneck normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class PrototypeLinear(nn.Linear):
    """Linear without bias whose weight rows are normalised to unit length at every forward:
    `torch.nn.utils.weight_norm` with its gain fixed at 1, as DINO's last layer with
    norm_last_layer=True. The stored `weight` is the direction parameter v."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


def _block(cin: int, s: LayerSpec) -> nn.Sequential:
    if s.weight_norm:
        return nn.Sequential(PrototypeLinear(cin, s.width))
    linear = nn.Linear(cin, s.width, bias=s.bias)
    if s.gelu or s.unit_norm:  # DINOHead._init_weights
        nn.init.trunc_normal_(linear.weight, std=0.02)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    mods: list[nn.Module] = [linear]
    if s.bn:
        mods.append(nn.BatchNorm1d(s.width, affine=s.affine))
    if s.relu:
        mods.append(nn.ReLU(inplace=True))
    if s.gelu:
        mods.append(nn.GELU())
    if s.unit_norm:
        mods.append(L2Norm())
    return nn.Sequential(*mods)


class Projector(nn.Module):
    """h -> z through the blocks of `spec`; every block output is a named layer."""

    def __init__(self, in_dim: int, spec: str):
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise UserError(f"projector input width must be a positive integer (got {short(in_dim)})")
        self.spec, self.in_dim = spec, in_dim
        layers = parse_projector_spec(spec)
        widths = [in_dim] + [s.width for s in layers]
        pairs = zip(widths[:-1], layers, strict=True)
        self.blocks = nn.ModuleList(_block(cin, s) for cin, s in pairs)
        self.feature_dims = {f"proj{i + 1}": s.width for i, s in enumerate(layers)}
        self.out_dim = widths[-1]

    @property
    def layer_names(self) -> list[str]:
        return list(self.feature_dims)

    @property
    def config(self) -> dict:
        return {"in_dim": self.in_dim, "spec": self.spec}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            h = blk(h)
        return h

    def forward_layers(self, h: torch.Tensor,
                       layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of every (or the requested) block by name; stops after the deepest one."""
        wanted = self.layer_names if layers is None else self._check(layers)
        if not wanted:
            return {}
        depth = max(self.layer_names.index(n) for n in wanted) + 1
        out = {}
        for i, blk in enumerate(self.blocks[:depth]):
            h = blk(h)
            out[f"proj{i + 1}"] = h
        return {n: out[n] for n in wanted}

    def _check(self, layers: Sequence[str] | str) -> list[str]:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        for n in wanted:
            if n not in self.feature_dims:
                valid = ", ".join(self.layer_names) or "none (identity projector)"
                raise UserError(f"unknown projector layer {short(n)}; valid layers: {valid}")
        return wanted
