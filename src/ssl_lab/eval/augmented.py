"""`eval.linear=augmented`: the linear evaluation of the SSL papers, on one layer.

Frozen encoder (eval mode: BatchNorm statistics stay as trained), a linear head on the raw
features of `eval.aug_layer` (default `backbone`), initialised N(0, 0.01²) with a zero bias,
trained with SGD (momentum 0.9, no weight decay, lr = eval.aug_lr x batch / 256, cosine decay
to 0 per step) for `eval.aug_epochs` epochs of shuffled batches of `eval.aug_batch_size`
train images, each seen as a random-resized crop (scale 0.08-1, aspect 3/4-4/3) with a random
horizontal flip, made in batches on the device by `data.views.ViewGenerator`. Val and test
images are seen once, as the centre view: the whole image resized to the encoder's input (what
the frozen probes see). Nothing is chosen: val and test are both reported after the last
epoch. The defaults follow MoCo v3 and DINO's linear evaluation (SGD, momentum 0.9, no weight
decay, cosine; MoCo v3: 90 epochs at lr 0.1 x batch / 256; DINO: 100 epochs) and solo-learn's
batch of 256 and lr 0.1 (its ImageNet BYOL linear config; solo-learn decays in steps).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.data.sources import DatasetSplits
from ssl_lab.data.views import Recipe, ViewGenerator
from ssl_lab.errors import UserError
from ssl_lab.eval.features import release_pages
from ssl_lab.eval.inputs import match_channels, to_model_input
from ssl_lab.models.encoder import Encoder
from ssl_lab.runtime import autocast

CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's default, as the papers use it
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0
_RECIPE = Recipe("linear-eval", crop_scale=CROP_SCALE, flip_p=0.5)


def check_layer(encoder: Encoder, layer: str) -> None:
    if layer not in encoder.feature_dims:
        raise UserError(f"eval.aug_layer={short(layer)} is not a layer of this encoder; valid "
                        f"layers: {', '.join(encoder.layer_names)}")


@torch.no_grad()
def _features(encoder: Encoder, x: torch.Tensor, layer: str, device: torch.device,
              amp_dtype: torch.dtype | None) -> torch.Tensor:
    with autocast(device, amp_dtype):
        return encoder.features(x.contiguous(memory_format=torch.channels_last), [layer])[
            layer].float()


def _rows(images, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images[idx]))


def _train_epoch(encoder: Encoder, head: nn.Linear, opt: torch.optim.Optimizer, split,
                 views: ViewGenerator, gens: tuple[torch.Generator, torch.Generator],
                 sched: tuple[int, int, float], layer: str, device: torch.device,
                 amp_dtype: torch.dtype | None, batch_size: int) -> tuple[int, float]:
    """One epoch of shuffled batches; returns the step count after it and the mean loss."""
    step, total, peak_lr = sched
    perm = torch.randperm(len(split), generator=gens[0]).numpy()
    losses = []
    for start in range(0, len(perm), batch_size):
        idx = np.sort(perm[start:start + batch_size])  # file order: sequential store reads
        for group in opt.param_groups:
            group["lr"] = peak_lr * 0.5 * (1 + math.cos(math.pi * step / total))
        images = _rows(split.images, idx).to(device)
        x = match_channels(views(images, gens[1])[0], encoder.in_chans)
        feats = _features(encoder, x, layer, device, amp_dtype)
        labels = torch.from_numpy(split.labels[idx]).to(device, torch.long)
        loss = F.cross_entropy(head(feats), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 32 == 0:  # a packed store's read pages leave this process's RSS
            release_pages(split.images)
    return step, float(np.mean(losses)) if losses else float("nan")


@torch.no_grad()
def _accuracy(encoder: Encoder, head: nn.Linear, split, layer: str, device: torch.device,
              amp_dtype: torch.dtype | None, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(split), batch_size):
        images = torch.from_numpy(np.ascontiguousarray(split.images[start:start + batch_size]))
        x = to_model_input(images.to(device), encoder.in_chans, encoder.image_size)
        pred = head(_features(encoder, x, layer, device, amp_dtype)).argmax(1)
        labels = torch.from_numpy(split.labels[start:start + batch_size]).to(device)
        correct += int((pred == labels).sum())
    return correct / len(split) if len(split) else float("nan")


def augmented_linear(encoder: Encoder, data: DatasetSplits, cfg, device: torch.device,
                     amp_dtype: torch.dtype | None) -> dict:
    """Train the head as the module docstring says; val and test top-1 after the last epoch
    and the settings that produced them (eval.json's "augmented" entry)."""
    e = cfg.eval
    check_layer(encoder, e.aug_layer)
    start = time.perf_counter()
    encoder = encoder.to(device).eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # seeded head, caller's RNG untouched
        torch.manual_seed(cfg.seed)
        head = nn.Linear(encoder.feature_dims[e.aug_layer], data.num_classes[0]).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = e.aug_lr * e.aug_batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    gens = (torch.Generator().manual_seed(cfg.seed),
            torch.Generator(device=device).manual_seed(cfg.seed))
    views = ViewGenerator(_RECIPE, encoder.image_size, n_views=1)
    steps = e.aug_epochs * math.ceil(len(data.train) / e.aug_batch_size)
    step, loss = 0, float("nan")
    for _ in range(e.aug_epochs):
        step, loss = _train_epoch(encoder, head, opt, data.train, views, gens, (step, steps, lr),
                                  e.aug_layer, device, amp_dtype, e.aug_batch_size)
    scores = {s: _accuracy(encoder, head, getattr(data, s), e.aug_layer, device, amp_dtype,
                           e.batch_size) for s in ("val", "test")}
    return {"protocol": "augmented", "layer": e.aug_layer, "val": scores["val"],
            "test": scores["test"], "train_loss": loss, "epochs": e.aug_epochs,
            "batch_size": e.aug_batch_size, "lr": lr, "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY, "crop_scale": list(CROP_SCALE), "flip_p": 0.5,
            "seconds": time.perf_counter() - start}
