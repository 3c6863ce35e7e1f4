"""ResNet-18/34/50 backbones with per-stage features and a `last_width` knob.

Submodules are named exactly like torchvision's ResNet (conv1, bn1, layer1..layer4, blocks with
conv1/bn1/conv2/bn2(/conv3/bn3)/downsample.0/.1; no fc), so a released torchvision ResNet
state dict without `fc.*` loads with `strict=True` when `stem="imagenet"` and `width=1`.

- `stem="cifar"`: 3x3 conv stride 1, no max-pool (small images); `"imagenet"`: 7x7 stride 2
  conv + 3x3 stride 2 max-pool.
- `width` multiplies the base channels 64/128/256/512 (rounded, at least 1).
- `last_width` (Expand or Narrow, Bordes et al. 2023): only the LAST residual block of stage 4
  changes: its output conv (BasicBlock conv2 / Bottleneck conv3) and BN write `last_width`
  channels, with a 1x1 conv + BN projection shortcut when its input width differs. Every other
  parameter keeps its shape, so runs with different D differ in that one block only.
- `zero_init_residual=True` (default, as in most SSL recipes, e.g. VICReg/Barlow Twins):
  the last BN gamma of every residual branch starts at 0, so each block starts as its
  shortcut; torchvision's own default is False. It is recorded in `config`.

Layer names: `stage1`, `stage2`, `stage3` (global-average-pooled stage outputs) and
`backbone` (pooled stage 4, reported once under that name).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.models.base import Backbone
from ssl_lab.models.small_conv import SmallMapConv2d

STEMS = ("cifar", "small", "imagenet")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return SmallMapConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return SmallMapConv2d(cin, cout, 1, stride=stride, bias=False)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """Projection shortcut (torchvision's `downsample`) when the identity cannot be added."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, out: int | None = None):
        super().__init__()
        out = planes * self.expansion if out is None else out
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, out, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, out: int | None = None):
        super().__init__()
        out = planes * self.expansion if out is None else out
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, out, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
STAGE_NAMES = ("stage1", "stage2", "stage3", "backbone")


def stage_planes(width: float) -> list[int]:
    """Inner widths of the four stages: round(base * width), at least 1."""
    return [max(1, round(base * width)) for base in (64, 128, 256, 512)]


class _SpatialMean(torch.autograd.Function):
    """x.mean((2, 3)) whose backward hands back a broadcast view of grad / (H*W). The built-in
    backward materialises that tensor in NCHW order; against a channels_last activation the
    next op (the last ReLU's backward) then runs a slow mixed-layout loop. Values
    and gradients are bit for bit the built-in's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = ctx.shape
        return (grad / (h * w))[:, :, None, None].expand(n, c, h, w)


def pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over H, W: (N, C), for any memory format (no .view on conv outputs)."""
    return _SpatialMean.apply(x)


class ResNet(Backbone):
    def __init__(
        self,
        name: str = "resnet18",
        *,
        width: float = 1.0,
        last_width: int | None = None,
        in_chans: int = 3,
        image_size: int = 32,
        stem: str = "cifar",
        zero_init_residual: bool = True,
    ):
        super().__init__()
        check_args(name, width, last_width, in_chans, stem)
        block, blocks = ARCHS[name]
        planes = stage_planes(width)
        outs = [p * block.expansion for p in planes]
        if last_width is not None:
            outs[3] = last_width
        # image_size is unused by a ResNet; it is kept so every backbone's config has it
        self.config = dict(name=name, width=width, last_width=last_width, in_chans=in_chans,
                           image_size=image_size, stem=stem,
                           zero_init_residual=zero_init_residual)
        self.embed_dim = outs[3]
        self.feature_dims = dict(zip(STAGE_NAMES, outs, strict=True))

        self._build_stem(in_chans, planes[0], stem)
        cin = planes[0]
        for i in range(4):
            stage = make_stage(block, cin, planes[i], blocks[i], stride=1 if i == 0 else 2,
                               last_out=last_width if i == 3 else None)
            self.add_module(f"layer{i + 1}", stage)
            cin = outs[i]
        self._init_weights(zero_init_residual)

    def _build_stem(self, in_chans: int, cout: int, stem: str) -> None:
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, cout, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "small":  # 3x3 stride 2: 28-64 px images at a quarter of the cifar cost
            self.conv1 = nn.Conv2d(in_chans, cout, 3, stride=2, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = conv3x3(in_chans, cout)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_bn.weight)

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled stage-4 map (N, embed_dim, H', W')."""
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.forward_features(x))

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled (N, C) features by name; stages deeper than the deepest request never run."""
        wanted = self.check_layers(layers)
        if not wanted:
            return {}
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        depth = self.depth_of(wanted)
        for name, stage in zip(STAGE_NAMES[:depth], self.stages()[:depth], strict=True):
            x = stage(x)
            if name in wanted:
                out[name] = pool(x)
        return {n: out[n] for n in wanted}


def make_stage(block: type[nn.Module], cin: int, planes: int, n: int, stride: int,
               last_out: int | None = None) -> nn.Sequential:
    """`n` blocks; the first may stride, the last writes `last_out` channels if given."""
    out = planes * block.expansion
    layers = []
    for i in range(n):
        is_last = i == n - 1
        layers.append(block(cin, planes, stride if i == 0 else 1,
                            out=last_out if is_last and last_out is not None else out))
        cin = out
    return nn.Sequential(*layers)


def check_args(name: str, width: float, last_width: int | None, in_chans: int,
               stem: str) -> None:
    if name not in ARCHS:
        raise UserError(f"unknown ResNet {short(name)}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise UserError(f"unknown stem {short(stem)}; choose one of {', '.join(STEMS)}")
    if not width > 0:
        raise UserError(f"model.width must be > 0 (got {width})")
    if last_width is not None and (not isinstance(last_width, int) or last_width < 1):
        raise UserError(f"model.last_width must be a positive integer or null (got {short(last_width)})")
    if in_chans < 1:
        raise UserError(f"in_chans must be >= 1 (got {in_chans})")
