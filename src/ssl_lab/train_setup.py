"""What a training run is built from: its data, views, model, optimizers and run directory,
every input validated and nothing written (`build`). The loop in ssl_lab.train runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ssl_lab import dist, runtime
from ssl_lab.config import Config
from ssl_lab.data.progressive import ResolutionSchedule, schedule_from_config
from ssl_lab.data.sources import DatasetSplits, default_view_size, load_dataset
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.errors import UserError
from ssl_lab.eval.online import OnlineProbes
from ssl_lab.methods import SSLModel, get_method
from ssl_lab.models.encoder import Encoder
from ssl_lab.optim import build_optimizer, scaled_lr
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import pick_device, resolve_precision

# ----------------------------------------------------------------------------- inputs


def encoder_spec(cfg: Config, data: DatasetSplits, size: int, mean, std, num_classes: int) -> dict:
    """Everything needed to rebuild the encoder without loading the training data."""
    return {"model": asdict(cfg.model), "in_chans": data.in_chans, "image_size": size,
            "mean": list(mean), "std": list(std), "num_classes": num_classes,
            "dataset": cfg.data.name, "target": cfg.data.target}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (on a strided subset: it is fast and
    the statistics of 10k images are within 1e-3 of the full set's)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float32) / 255.0
    flat = sample.reshape(-1, sample.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()


def view_size(cfg: Config, data: DatasetSplits) -> int:
    """`views.size`, or for 0 the dataset's default view size (data.sources.VIEW_SIZES)."""
    return cfg.views.size or default_view_size(data.name, data.image_size)


def load_training_data(cfg: Config) -> DatasetSplits:
    data = load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                        seed=cfg.seed, fraction=cfg.data.fraction)
    data = data.select_target(cfg.data.target)
    if len(data.train.images) < 2:
        raise UserError(f"dataset {cfg.data.name} has {len(data.train.images)} training images; "
                        "SSL needs at least 2 (check data.fraction and the data files)")
    return data


# ----------------------------------------------------------------------------- the setup


@dataclass
class Setup:
    cfg: Config
    run: RunDir
    device: torch.device
    amp_dtype: torch.dtype | None
    data: DatasetSplits
    model: SSLModel  # the module whose state is saved; hooks (begin_step, ...) are called on it
    forward: torch.nn.Module  # what runs the forward pass: `model`, or DDP around it
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    spec: dict  # encoder.json
    probes: OnlineProbes | None
    optimizer: torch.optim.Optimizer
    probe_optimizer: torch.optim.Optimizer | None
    views: ViewGenerator  # at the full view size
    small_views: ViewGenerator | None  # multi-crop
    batch_size: int  # global batch (all ranks): lr scaling and steps per epoch use it
    steps_per_epoch: int
    total_steps: int
    info: dist.DistInfo
    per_rank: int
    resolution: ResolutionSchedule | None = None  # progressive resolution; None: always full
    _views_by_size: dict[int, tuple[ViewGenerator, ViewGenerator | None]] = field(
        default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def views_at(self, epoch: int) -> tuple[ViewGenerator, ViewGenerator | None]:
        """The view generators of `epoch` (one pair per size: they keep per-size buffers)."""
        size = self.resolution.size(epoch) if self.resolution else self.views.size
        if size == self.views.size:
            return self.views, self.small_views
        if size not in self._views_by_size:
            # the full size's recipe throughout: crop scales must not jump when the size crosses 64
            self._views_by_size[size] = (
                ViewGenerator(self.views.recipe, size, self.views.n_views),
                _small_view_generator(self.cfg, size, self.views.recipe.fast))
        return self._views_by_size[size]


def build(cfg: Config, info: dist.DistInfo | None = None) -> Setup:
    """Everything a run needs, every input validated; writes nothing (see start)."""
    info = info or dist.DistInfo(0, 1, 0, pick_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime.keep_freed_memory()  # fresh view batches are not page-faulted in every step
    device = info.device
    amp_dtype = resolve_precision(cfg.train.precision, device)
    method = get_method(cfg.method.name)  # fail on bad names before loading anything
    get_recipe(cfg.views.recipe, **cfg.views.recipe_options())
    run = agreed(info, lambda: RunDir.check(cfg.run.dir, cfg.resume, _default_name(cfg)))
    data = load_training_data(cfg)
    size = view_size(cfg, data)
    views = ViewGenerator(get_recipe(cfg.views.recipe, size=size, **cfg.views.recipe_options()),
                          size, cfg.views.n)
    small_views = _small_view_generator(cfg, size, views.recipe.fast)
    batch_size = min(cfg.optim.batch_size, len(data.train.images))
    per_rank = dist.per_rank_batch(batch_size, info.world_size)
    steps_per_epoch = len(data.train.images) // batch_size
    total_steps = max(1, round(steps_per_epoch * cfg.train.epochs))  # epochs may be fractional
    resolution = _resolution_schedule(cfg, size, epochs_touched(total_steps, steps_per_epoch))
    num_classes = data.num_classes[0]
    mean, std = channel_stats(data.train.images)

    torch.manual_seed(cfg.seed)
    encoder = Encoder(cfg.model, data.in_chans, size, mean, std)
    model = SSLModel(encoder, method, cfg.method, num_classes)
    if info.distributed:  # global batch statistics, also on CPU (encoder, predictor, target)
        model = dist.convert_sync_batchnorm(model)
    model = model.to(device)
    probes = OnlineProbes(encoder.feature_dims, num_classes).to(device) if cfg.probe.online else None
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # in place (Module.compile): parameter names, checkpoints and the optimizer are unchanged;
        # each new view size (progressive resolution) recompiles once
        model.compile()
    optimizer = build_optimizer(model.trainable_modules(), cfg.optim, scaled_lr(cfg.optim))
    probe_optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg.probe.lr) if probes else None
    # fp16 needs loss scaling: small gradients underflow to zero in fp16 (bf16 has fp32's range)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Setup(cfg, run, device, amp_dtype, data, model, dist.wrap_ddp(model, info), scaler,
                 encoder_spec(cfg, data, size, mean, std, num_classes), probes, optimizer,
                 probe_optimizer, views, small_views, batch_size, steps_per_epoch, total_steps,
                 info, per_rank, resolution)


def _default_name(cfg: Config) -> str:
    return f"{cfg.method.name}-{cfg.data.name.split(':')[0]}"


def epochs_touched(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs a run of total_steps steps enters: a fractional train.epochs' partial last one
    counts (progressive resolution must reach full size in the epoch that really ends the run)."""
    return math.ceil(total_steps / steps_per_epoch)


def _resolution_schedule(cfg: Config, size: int, epochs: int) -> ResolutionSchedule | None:
    v = cfg.views
    schedule = schedule_from_config(v.min_size, size, v.ramp_start, v.ramp_end, v.size_step, epochs)
    if schedule is not None and cfg.model.backbone.startswith("vit"):
        raise UserError("views.min_size (progressive resolution) needs a ResNet backbone: a ViT's "
                        "position embeddings are fixed to one image size; set views.min_size=0")
    return schedule


def _small_view_generator(cfg: Config, size: int, fast: bool) -> ViewGenerator | None:
    """Multi-crop: k extra views at a smaller size from small crops (SwAV's 2 + k scheme), of
    the same kind (fast or exact) as the large views."""
    if not cfg.views.small_n:
        return None
    recipe = get_recipe(cfg.views.recipe, **{**cfg.views.recipe_options(), "fast": fast})
    if recipe.crop_scale is not None:
        recipe = replace(recipe, crop_scale=(0.05, cfg.views.small_scale))
    small_size = cfg.views.small_size or max(8, size // 2)
    return ViewGenerator(recipe, small_size, cfg.views.small_n)  # the recipe holds noise_std


def agreed(info: dist.DistInfo, decide):
    """Rank 0 decides (a default run name holds a timestamp; a lock has one holder); every
    rank gets the same answer or raises the same UserError."""
    answer = None
    if info.is_main:
        try:
            answer = decide()
        except UserError as exc:
            answer = exc
    answer = dist.broadcast_object(answer)
    if isinstance(answer, UserError):
        raise UserError(str(answer))
    return answer
