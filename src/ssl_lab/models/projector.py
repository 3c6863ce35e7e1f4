"""Projector heads built from a spec string.

Grammar: dash-separated output widths, one token per Linear layer, each an integer followed by
optional single-letter flags (order free, each at most once)::

    spec   := "" | "none" | token ("-" token)*
    token  := WIDTH FLAGS        e.g. 512, 512b, 64n, 128nl
    n      Linear without bias
    b      BatchNorm1d + ReLU after this Linear
    r      ReLU only (no BatchNorm) after this Linear
    l      plain Linear: no BatchNorm, no ReLU

Without b/r/l a hidden layer gets BN + ReLU and the last layer gets nothing. Examples:

    "512-512-128"  Linear(D,512)-BN-ReLU, Linear(512,512)-BN-ReLU, Linear(512,128)
    "512-128b"     ... Linear(512,128)-BN-ReLU (BN + ReLU on the last layer too)
    "64n-64"       Linear(D,64,bias=False)-BN-ReLU-Linear(64,64): the projector of Ghosh et
                   al. (papers.md §6, the fastssl code)
    "2048r-128"    Linear(D,2048)-ReLU-Linear(2048,128): SimCLR v1 (no BN)
    "128"          one Linear(D,128): a linear projector (papers.md §2)
    "" / "none"    identity: z = h, no layers

Layer names: `proj1` ... `projN`, the output of block k after its activation; `projN` = z.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ssl_lab.errors import UserError

_TOKEN = re.compile(r"^(\d+)([a-z]*)$")
_FLAGS = "nbrl"
_HELP = ("expected dash-separated widths with optional flags n (no bias), b (BN+ReLU), "
         "r (ReLU), l (linear), e.g. '512-512-128' or '64n-64', or 'none'")


@dataclass(frozen=True)
class LayerSpec:
    """One projector block: Linear(in, width, bias) then optional BatchNorm1d and ReLU."""

    width: int
    bias: bool = True
    bn: bool = False
    relu: bool = False


def parse_projector_spec(spec: str) -> list[LayerSpec]:
    """Parse a spec string (grammar in the module docstring); UserError quoting a bad spec."""
    text = (spec or "").strip().lower()
    if text in ("", "none"):
        return []
    tokens = [t.strip() for t in text.split("-")]
    return [_parse_token(tok, spec, last=i == len(tokens) - 1) for i, tok in enumerate(tokens)]


def _parse_token(tok: str, spec: str, last: bool) -> LayerSpec:
    m = _TOKEN.match(tok)
    bad = f"bad projector spec {spec!r}: token {tok!r}"
    if m is None or any(f not in _FLAGS for f in m.group(2)):
        raise UserError(f"{bad}; {_HELP}")
    width, flags = int(m.group(1)), m.group(2)
    if width < 1:
        raise UserError(f"{bad} has width 0; widths must be >= 1")
    if len(set(flags)) != len(flags) or sum(f in flags for f in "brl") > 1:
        raise UserError(f"{bad} repeats a flag or mixes b/r/l; {_HELP}")
    if "b" in flags or "r" in flags or "l" in flags:
        bn, relu = "b" in flags, "b" in flags or "r" in flags
    else:  # default: hidden layers Linear-BN-ReLU, the last layer a plain Linear
        bn = relu = not last
    return LayerSpec(width, bias="n" not in flags, bn=bn, relu=relu)


def _block(cin: int, s: LayerSpec) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(cin, s.width, bias=s.bias)]
    if s.bn:
        mods.append(nn.BatchNorm1d(s.width))
    if s.relu:
        mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class Projector(nn.Module):
    """h -> z through the blocks of `spec`; every block output is a named layer."""

    def __init__(self, in_dim: int, spec: str):
        super().__init__()
        if not isinstance(in_dim, int) or in_dim < 1:
            raise UserError(f"projector input width must be a positive integer (got {in_dim!r})")
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
                raise UserError(f"unknown projector layer {n!r}; valid layers: {valid}")
        return wanted
