"""RCDM (Bordes, Balestriero, Vincent, TMLR 2022, arXiv 2112.09164): a diffusion model
conditioned on a frozen representation h(x), to *see* what a layer of an SSL encoder keeps.

The UNet and the noise schedules are the field's library (`diffusers`); this module keeps only
what is specific to RCDM: the conditioning (a Linear from standardised h to the time-embedding
width, added to the timestep embedding, with scale-shift group norm in every res-block, as in
the authors' ADM code), the ε-prediction loss, DDIM sampling, interpolation, and faithfulness
by retrieval. The config is in `rcdm_config.py`, training in `rcdm_train.py`, sampling and
scoring in `rcdm_sample.py` / `rcdm_score.py`, the command line in `rcdm_run.py`.

Images travel as uint8 (N, H, W, C) like everywhere in ssl-lab; the UNet sees them on a
"canvas": resized to `content` pixels, padded with black to `size` (a multiple of
2^(levels-1), e.g. Fashion-MNIST 28 → 32), scaled to [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.runtime import autocast

NUM_TRAIN_TIMESTEPS = 1000  # RCDM / DDPM: 1000-step linear β schedule


# ----------------------------------------------------------------------------- canvas


def to_canvas(images: torch.Tensor, content: int, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, size, size) in [-1, 1], content centred on black."""
    x = images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != content or x.shape[-2] != content:
        x = F.interpolate(x, size=(content, content), mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    lo = (size - content) // 2
    hi = size - content - lo
    return F.pad(x, (lo, hi, lo, hi), value=-1.0)


def from_canvas(x: torch.Tensor, content: int) -> torch.Tensor:
    """float (..., C, size, size) in [-1, 1] → uint8 (..., content, content, C): the centre crop,
    quantised like a saved PNG, so scoring re-encodes exactly what a user would look at."""
    size = x.shape[-1]
    lo = (size - content) // 2
    crop = x[..., lo:lo + content, lo:lo + content]
    u8 = ((crop.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.movedim(-3, -1).contiguous()


# ----------------------------------------------------------------------------- model


def parse_channels(spec: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in str(spec).split("-"))
    except ValueError:
        channels = ()
    if not channels or min(channels) <= 0:
        raise UserError(f"unet.channels must look like '32-64-64' (one width per level), "
                        f"got {short(spec)}")
    return channels


def build_unet(size: int, in_channels: int, channels: Sequence[int], layers_per_block: int = 1,
               attention: bool = False, norm_groups: int = 8):
    """A diffusers UNet2DModel whose time embedding also takes our conditioning vector
    (`class_embed_type="identity"`: `class_labels` is added to the time embedding as is) and
    whose res-blocks modulate their group norm by that embedding (scale-shift, i.e. AdaGN)."""
    from diffusers import UNet2DModel  # heavy import (seconds): only when a model is built

    levels = len(channels)
    unit = 2 ** (levels - 1)  # each level but the last halves the resolution
    if size % unit:
        raise UserError(f"unet.size={size} must be a multiple of 2^(levels-1)={unit} for {levels} "
                        f"levels; use e.g. unet.size={math.ceil(size / unit) * unit}")
    bad = [c for c in channels if c % norm_groups]
    if bad:
        raise UserError(f"unet.channels {list(channels)} must be multiples of unet.norm_groups="
                        f"{norm_groups}; change one or the other")
    attn = [attention and i == levels - 1 for i in range(levels)]
    return UNet2DModel(
        sample_size=size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        add_attention=attention, attention_head_dim=min(channels[-1], 32),
        norm_num_groups=norm_groups, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity")


class RCDM(nn.Module):
    """ε(x_t, t, h): the UNet plus our conditioning Linear(feature_dim → time-embedding width).

    h is standardised with the training set's per-dimension statistics (buffers, so they travel
    with the checkpoint): layers differ in scale by orders of magnitude (pooled ReLU maps vs a
    projector's output), and this lets one learning rate serve every layer and the random-init
    baseline alike.
    """

    def __init__(self, unet: nn.Module, feature_dim: int):
        super().__init__()
        self.unet = unet
        time_dim = unet.time_embedding.linear_2.out_features
        self.cond = nn.Linear(feature_dim, time_dim)
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))

    def set_feature_stats(self, feats: torch.Tensor) -> None:
        feats = feats.float()
        self.feat_mean.copy_(feats.mean(0))
        # Dead units (constant over the data) would otherwise be blown up by a tiny std.
        floor = 1e-3 * feats.std().clamp_min(1e-6)
        self.feat_std.copy_(feats.std(0).clamp_min(floor))

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return self.cond((h.float() - self.feat_mean) / self.feat_std)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=self.embed(h)).sample


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                         prediction_type="epsilon")


def sample_scheduler(steps: int):
    from diffusers import DDIMScheduler

    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"steps must be in [1, {NUM_TRAIN_TIMESTEPS}], got {steps}")
    sched = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                          prediction_type="epsilon", clip_sample=True)
    sched.set_timesteps(steps)
    return sched


# ----------------------------------------------------------------------------- training


def diffusion_loss(model: RCDM, scheduler, x0: torch.Tensor, h: torch.Tensor,
                   gen: torch.Generator, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ε-prediction MSE at a uniformly drawn timestep (computed in float32 under autocast)."""
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    with autocast(x0.device, amp_dtype):
        eps = model(x_t, t, h)
    return F.mse_loss(eps.float(), noise)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay: short CPU runs would otherwise sample from weights that are
    still mostly the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def ddim_sample(model: RCDM, h: torch.Tensor, x_T: torch.Tensor, steps: int, eta: float = 0.0,
                gen: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
                batch_size: int = 256) -> torch.Tensor:
    """Denoise the given start noise x_T (M, C, S, S) conditioned on h (M, D); [-1, 1] floats.

    The noise is an input so that callers can hold it fixed while h varies (interpolation,
    "does conditioning matter" checks)."""
    model.eval()
    out = []
    for start in range(0, len(h), batch_size):
        sched = sample_scheduler(steps)
        x = x_T[start:start + batch_size].clone()
        emb_h = h[start:start + batch_size]
        for t in sched.timesteps:
            with autocast(x.device, amp_dtype):
                eps = model(x, t.to(x.device), emb_h).float()
            x = sched.step(eps, t, x, eta=eta, generator=gen).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def start_noise(n: int, k: int, shape: Sequence[int], seed: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(n*k, *shape) Gaussian noise; sample j of every image shares the same draw, so rows of a
    grid differ only by their conditioning."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((k, *shape), generator=gen)
    return noise.repeat(n, *([1] * len(shape))).to(device)


def sample_k(model: RCDM, h: torch.Tensor, k: int, shape: Sequence[int], steps: int, seed: int,
             eta: float = 0.0, amp_dtype: torch.dtype | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """k samples per representation: (N, k, C, S, S) in [-1, 1], a function of `seed` only."""
    device = h.device
    x_T = start_noise(len(h), k, shape, seed, device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    flat = ddim_sample(model, h.repeat_interleave(k, 0), x_T, steps, eta, gen, amp_dtype,
                       batch_size)
    return flat.view(len(h), k, *shape)


def interpolate(model: RCDM, h_a: torch.Tensor, h_b: torch.Tensor, points: int, k: int,
                shape: Sequence[int], steps: int, seed: int, eta: float = 0.0,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Samples along the straight line h_a → h_b: (k, points, C, S, S); row j keeps one noise
    draw, so a row shows what changes with the representation alone."""
    alphas = torch.linspace(0, 1, points, device=h_a.device)
    h = torch.lerp(h_a[None].float(), h_b[None].float(), alphas[:, None])  # (points, D)
    x_T = start_noise(1, k, shape, seed, h.device).repeat_interleave(points, 0)
    gen = torch.Generator(device=h.device).manual_seed(seed + 1)
    flat = ddim_sample(model, h.repeat(k, 1), x_T, steps, eta, gen, amp_dtype)
    return flat.view(k, points, *shape)


# ----------------------------------------------------------------------------- scoring


# Cosines closer than this are ties. Representations arrive in float32, whose rounding moves a
# direction by ~1e-7 (a row and a positive multiple of it, 3·g rounded, are not exactly
# parallel), and BLAS rounds identical gallery columns differently depending on the matrix
# shape; differences below 1e-6 say nothing about which image is closer.
TIE_TOL = 1e-6


def retrieval_ranks(query: torch.Tensor, gallery: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of gallery[target[i]] among all gallery rows by cosine similarity to
    query[i]. Ties (cosines within TIE_TOL) share the average rank: a collapsed (constant or
    one-direction) representation then scores chance, (N + 1) / 2, not a flattering rank 1."""
    q = F.normalize(query.double(), dim=1)
    g = F.normalize(gallery.double(), dim=1)
    sims = q @ g.T  # (M, N)
    own = sims.gather(1, target.view(-1, 1))
    greater = (sims > own + TIE_TOL).sum(1).double()
    ties = ((sims - own).abs() <= TIE_TOL).sum(1).double() - 1  # minus the target itself
    return (1.0 + greater + ties / 2).float()


def median(x: torch.Tensor) -> float:
    """The median (the mean of the two middle values for an even count; torch.median returns
    the lower one)."""
    return torch.quantile(x.double(), 0.5).item()


def retrieval_report(ranks: torch.Tensor, n: int) -> dict[str, float]:
    ranks = ranks.float()
    return {"mean_rank": ranks.mean().item(), "median_rank": median(ranks),
            "top1": (ranks <= 1).float().mean().item(), "top5": (ranks <= 5).float().mean().item(),
            "n": n, "queries": len(ranks), "chance_mean_rank": (n + 1) / 2,
            "chance_top1": 1 / n, "chance_top5": min(5, n) / n}


def diversity(samples: torch.Tensor) -> torch.Tensor:
    """Per conditioning image: pixel std across its k samples, averaged over pixels ([0, 1]
    units). samples: (N, k, ...) uint8 or float in [0, 1]."""
    x = samples.float() / 255 if samples.dtype == torch.uint8 else samples.float()
    return x.std(1, unbiased=False).flatten(1).mean(1)


# ----------------------------------------------------------------------------- grids


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: Path, scale: int = 2, gap: int = 2,
              gap_after: int | None = 1) -> Path:
    """A PNG of uint8 (H, W, C) tiles, one list per row; a wider gap after column `gap_after`
    separates the conditioning image from its samples."""
    from PIL import Image

    h, w, c = rows[0][0].shape
    cols = max(len(r) for r in rows)
    extra = gap * 2 if gap_after is not None else 0
    height, width = len(rows) * (h + gap) + gap, cols * (w + gap) + gap + extra
    canvas = np.full((height, width, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            x0 = gap + j * (w + gap) + (extra if gap_after is not None and j >= gap_after else 0)
            y0 = gap + i * (h + gap)
            canvas[y0:y0 + h, x0:x0 + w] = tile
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path

