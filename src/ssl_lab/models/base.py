"""What every backbone shares: declared widths, layer names, and name checking.

A backbone declares `embed_dim` and `feature_dims` from its constructor arguments, so probes,
eval, export and RCDM can size their heads before any image goes through the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError


class Backbone(nn.Module):
    """Base class: subclasses set `embed_dim`, `feature_dims` and `config` in `__init__`
    and implement `forward_features` and `features`."""

    embed_dim: int
    feature_dims: dict[str, int]  # ordered shallow -> deep, ends with "backbone"
    config: dict
    # `last_width` (Expand or Narrow) rebuilds the last block, which only a built-in backbone can
    supports_last_width: bool = True
    # input statistics the backbone expects (a wrapped pretrained net); None: the dataset's
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def layer_names(self) -> list[str]:
        """Layer names, shallow -> deep, ending with "backbone"."""
        return list(self.feature_dims)

    def check_layers(self, layers: Sequence[str] | str) -> list[str]:
        """Return the requested names as a list; UserError on a name this backbone lacks."""
        wanted = [layers] if isinstance(layers, str) else list(layers)
        unknown = [n for n in wanted if n not in self.feature_dims]
        if unknown:
            raise UserError(
                f"unknown layer {short(unknown[0])} for {self.config['name']}; "
                f"valid layers: {', '.join(self.layer_names)}"
            )
        return wanted

    def depth_of(self, wanted: Sequence[str]) -> int:
        """How many layer stages must run to produce every wanted name (1-based)."""
        order = self.layer_names
        return max(order.index(n) for n in wanted) + 1

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover
