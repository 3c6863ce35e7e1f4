"""Vision Transformers with per-block features and a `last_width` knob.

Conv patch embedding (with bias), a CLS token, learned position embeddings (1 + T tokens),
`depth` pre-norm blocks (multi-head self-attention through `F.scaled_dot_product_attention`
with a biased qkv, MLP ratio 4, GELU) and a final LayerNorm: timm's VisionTransformer
without its classifier head. Parameter names follow timm (patch_embed.proj, cls_token,
pos_embed, blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm), so at 224 px the
counts equal timm's minus the head: ViT-S/16 21,665,664 and ViT-B/16 85,798,656.

Presets (`patch_size`, `dim`, `depth`, `heads`, each overridable by keyword):

- `vit`: the toy for small images on a CPU: patch 4 (64 tokens + CLS at 32 px), dim 192,
  depth 6, heads 3 (ViT-Ti's width and heads at half its depth);
- `vit_tiny` ViT-Ti/16 (192, 12, 3), `vit_small` ViT-S/16 (384, 12, 6), `vit_base` ViT-B/16
  (768, 12, 12): patch 16, for 224 px images.

`width` multiplies `dim`, rounded to a multiple of `heads`.

`pool="cls"` reads the CLS token, `pool="mean"` the mean of the patch tokens (CLS excluded).
Layer names: `block1` ... `blockL` (pooled output of each block, before the final norm) and
`backbone` (pooled output of the final LayerNorm).

`last_width` (Expand or Narrow, Bordes et al. 2023): the LAST block's MLP writes `last_width`
channels and its residual goes through a Linear(dim -> last_width); the final LayerNorm has
`last_width` channels; `embed_dim = last_width`. Nothing else changes shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.models.base import Backbone

POOLS = ("cls", "mean")
PRESETS: dict[str, dict] = {
    "vit": dict(patch_size=4, dim=192, depth=6, heads=3),
    "vit_tiny": dict(patch_size=16, dim=192, depth=12, heads=3),
    "vit_small": dict(patch_size=16, dim=384, depth=12, heads=6),
    "vit_base": dict(patch_size=16, dim=768, depth=12, heads=12),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `out != dim` makes the MLP residual go through a Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, out: int | None = None):
        super().__init__()
        out = dim if out is None else out
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, round(dim * mlp_ratio), out)
        self.res_proj = nn.Linear(dim, out) if out != dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        res = x if self.res_proj is None else self.res_proj(x)
        return res + self.mlp(self.norm2(x))


def scaled_dim(dim: int, width: float, heads: int) -> int:
    """dim * width rounded to a multiple of heads (at least one channel per head)."""
    return max(1, round(dim * width / heads)) * heads


class ViT(Backbone):
    """A ViT preset (see PRESETS) whose `patch_size`, `dim`, `depth` and `heads` any keyword
    overrides; see the module docstring for layer names, pooling and `last_width`."""

    def __init__(
        self,
        name: str = "vit",
        *,
        width: float = 1.0,
        last_width: int | None = None,
        in_chans: int = 3,
        image_size: int = 32,
        patch_size: int | None = None,
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
    ):
        super().__init__()
        if name not in PRESETS:
            raise UserError(f"unknown ViT {short(name)}; choose one of {', '.join(PRESETS)}")
        given = dict(patch_size=patch_size, dim=dim, depth=depth, heads=heads)
        arch = {k: PRESETS[name][k] if v is None else v for k, v in given.items()}
        check_args(width, last_width, in_chans, image_size, pool, **arch)
        self.config = dict(name=name, width=width, last_width=last_width, in_chans=in_chans,
                           image_size=image_size, **arch, mlp_ratio=mlp_ratio, pool=pool)
        self.image_size, self.pool = image_size, pool
        d, depth = scaled_dim(arch["dim"], width, arch["heads"]), arch["depth"]
        self.embed_dim = d if last_width is None else last_width
        names = [f"block{i + 1}" for i in range(depth)] + ["backbone"]
        dims = [d] * (depth - 1) + [self.embed_dim, self.embed_dim]
        self.feature_dims = dict(zip(names, dims, strict=True))

        p = arch["patch_size"]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, d, p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // p) ** 2, d))
        self.blocks = nn.ModuleList(
            Block(d, arch["heads"], mlp_ratio, out=self.embed_dim if i == depth - 1 else None)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(self.embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + CLS tokens with position embeddings: (N, 1 + T, dim)."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise UserError(
                f"this ViT was built for {self.image_size}x{self.image_size} images but got "
                f"{x.shape[-2]}x{x.shape[-1]}; rebuild it with image_size={x.shape[-1]}"
            )
        # flatten(2) copies when the input is channels_last: no .view on conv outputs
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.pool == "cls" else x[:, 1:].mean(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens (N, 1 + T, embed_dim), CLS first."""
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.forward_features(x))

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled (N, C) features by name; blocks deeper than the deepest request never run."""
        wanted = self.check_layers(layers)
        if not wanted:
            return {}
        out: dict[str, torch.Tensor] = {}
        x = self.tokens(x)
        for i, blk in enumerate(self.blocks[: self.depth_of(wanted)]):
            x = blk(x)
            if f"block{i + 1}" in wanted:
                out[f"block{i + 1}"] = self.pooled(x)
        if "backbone" in wanted:
            out["backbone"] = self.pooled(self.norm(x))
        return {n: out[n] for n in wanted}


def check_args(width: float, last_width: int | None, in_chans: int, image_size: int, pool: str,
               *, patch_size: int, dim: int, depth: int, heads: int) -> None:
    """UserError naming the first invalid ViT argument and how to fix it."""
    if pool not in POOLS:
        raise UserError(f"unknown ViT pool {short(pool)}; choose one of {', '.join(POOLS)}")
    if not width > 0:
        raise UserError(f"model.width must be > 0 (got {width})")
    if last_width is not None and (not isinstance(last_width, int) or last_width < 1):
        raise UserError(f"model.last_width must be a positive integer or null (got {short(last_width)})")
    for key, v in dict(in_chans=in_chans, patch_size=patch_size, dim=dim, depth=depth,
                       heads=heads).items():
        if not isinstance(v, int) or v < 1:
            raise UserError(f"ViT {key} must be a positive integer (got {short(v)})")
    if image_size % patch_size:
        raise UserError(
            f"image_size {image_size} is not divisible by patch_size {patch_size}; "
            "choose a patch size that divides the image size (or the toy ViT `vit`, patch 4)"
        )
    if dim % heads:
        raise UserError(f"ViT dim {dim} is not divisible by heads {heads}; "
                        "choose a dim that is a multiple of the number of heads")
