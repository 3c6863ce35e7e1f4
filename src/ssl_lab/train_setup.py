"""What a training run is built from: its data, views, model, optimizers and run directory,
every input validated and nothing written (`build`). The loop in ssl_lab.train_loop runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ssl_lab import dist, runtime
from ssl_lab.config import Config, validate
from ssl_lab.config_io import cut, short
from ssl_lab.data.progressive import ResolutionSchedule, schedule_from_config
from ssl_lab.data.sources import DatasetSplits, default_view_size, load_dataset
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.errors import UserError
from ssl_lab.eval.online import OnlineProbes
from ssl_lab.methods import SSLModel, get_method
from ssl_lab.models.encoder import IMPORT_PREFIX, WRAPPED, Encoder, given_backbone
from ssl_lab.optim import build_optimizer, scaled_lr
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import pick_device, resolve_precision

# ----------------------------------------------------------------------------- inputs


def encoder_spec(cfg: Config, data: DatasetSplits, size: int, mean, std, num_classes: int,
                 backbone: torch.nn.Module | None = None) -> dict:
    """Everything needed to rebuild the encoder without loading the training data (a wrapped
    module's run records what was wrapped, for the reader: it is never imported from here)."""
    spec = {"model": asdict(cfg.model), "in_chans": data.in_chans, "image_size": size,
            "mean": list(mean), "std": list(std), "num_classes": num_classes,
            "dataset": cfg.data.name, "target": cfg.data.target}
    return spec | ({"backbone": backbone.config} if backbone is not None else {})


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (on a strided subset: it is fast and
    the statistics of 10k images are within 1e-3 of the full set's)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float32) / 255.0
    flat = sample.reshape(-1, sample.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()


def view_size(cfg: Config, data: DatasetSplits, backbone: torch.nn.Module | None = None) -> int:
    """`views.size`, or for 0: a wrapped module's input size, else the dataset's default view
    size (data.sources.VIEW_SIZES)."""
    if cfg.views.size:
        return cfg.views.size
    if backbone is not None and hasattr(backbone, "input_size"):
        return int(backbone.input_size)
    return default_view_size(data.name, data.image_size)


def load_training_data(cfg: Config, data: DatasetSplits | None = None) -> DatasetSplits:
    """The run's data: `data` when given (ssl_lab.data.from_arrays / from_dataset), else
    `data.name` loaded; at least 2 images to train on."""
    if data is None:
        data = load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                            seed=cfg.seed, fraction=cfg.data.fraction,
                            image_size=cfg.data.image_size)
    elif cfg.data.fraction < 1:
        raise UserError("data.fraction subsamples a named dataset; with data= given, pass the "
                        "subset you want to train on (or set data.fraction=1)")
    data = data.select_target(cfg.data.target)
    if len(data.ssl_train) < 2:
        raise UserError(f"dataset {data.name} has {len(data.ssl_train)} training images; "
                        "SSL needs at least 2 (check data.fraction and the data files)")
    return data


def resolve_inputs(cfg: Config, backbone: torch.nn.Module | None, data: DatasetSplits | None,
                   allow_import: bool) -> tuple[Config, torch.nn.Module | None]:
    """The config as the run records it when the caller brings its own backbone or data: the
    data's name, `model.backbone: module` (Expand/Narrow does not apply to a wrapped module)."""
    if data is not None:
        cfg = replace(cfg, data=replace(cfg.data, name=data.name))
    if backbone is not None and cfg.model.backbone.startswith(IMPORT_PREFIX):
        raise UserError(f"model.backbone={short(cfg.model.backbone)} and backbone= both name the "
                        "backbone; pass only one")
    backbone = given_backbone(WRAPPED if backbone is not None else cfg.model.backbone, backbone,
                              allow_import)
    if backbone is None:
        return cfg, None
    if cfg.model.last_width is not None and not getattr(backbone, "supports_last_width", False):
        print(f"note: model.last_width={cfg.model.last_width} does not apply to a wrapped module "
              "(Expand/Narrow rebuilds a built-in backbone's last block); it is used as it is")
    name = cfg.model.backbone if cfg.model.backbone.startswith(IMPORT_PREFIX) else WRAPPED
    return replace(cfg, model=replace(cfg.model, backbone=name, last_width=None, width=1.0)), \
        backbone


def check_labels(cfg: Config, data: DatasetSplits, method) -> None:
    """Label-free data is fine for SSL; what needs labels must have them or fail up front."""
    if method.uses_labels and not (data.ssl_train.labels >= 0).all():
        raise UserError(f"method.name={cfg.method.name} needs a label for every training image, "
                        f"and {data.name} has unlabelled ones; choose a label-free method")
    if cfg.eval.enabled and not cfg.eval.data and not data.has_labels:
        raise UserError(f"{cut(data.name)} cannot be probed: it {data.probe_gap()}; set "
                        "eval.data=NAME (a labelled dataset, e.g. stl10) or eval.enabled=false")


# ----------------------------------------------------------------------------- rules on data size


def fit_batch(cfg: Config, n_train: int, world_size: int = 1, say: bool = True) -> Config:
    """The config the run uses: a batch larger than the training set becomes the largest batch
    the set fills (a multiple of the world size). The capped batch IS the run's batch: config.yaml
    records it and the lr is scaled from it (optim.lr x batch / 256), with one note line."""
    asked = cfg.optim.batch_size
    if asked <= n_train:
        return cfg
    batch = n_train - n_train % world_size
    if batch < max(2, world_size):
        raise UserError(f"optim.batch_size={asked}: the {n_train} training images cannot make a "
                        f"batch of 2 or more on each of {world_size} processes; use more data "
                        "(data.fraction) or fewer processes")
    used = replace(cfg, optim=replace(cfg.optim, batch_size=batch))
    if say:
        print(f"note: optim.batch_size={asked} is larger than the {n_train} training images: the "
              f"run uses a batch of {batch} (recorded in config.yaml), and the lr is scaled from "
              f"it: {cfg.optim.lr:g} x {batch}/256 = {scaled_lr(used.optim):.4g}")
    return used


def _steps(cfg: Config, n_train: int, info: dist.DistInfo):
    """(config as run, global batch, per-rank batch, steps per epoch, total steps), after the
    rules between the batch and the data's size."""
    cfg = fit_batch(cfg, n_train, info.world_size, info.is_main)  # the lr follows the used batch
    batch_size = cfg.optim.batch_size
    check_negatives(cfg, batch_size)
    per_rank = dist.per_rank_batch(batch_size, info.world_size)
    steps_per_epoch = n_train // batch_size
    total_steps = max(1, round(steps_per_epoch * cfg.train.epochs))  # epochs may be fractional
    if info.is_main:
        note_short_run(cfg, steps_per_epoch, total_steps)
    return cfg, batch_size, per_rank, steps_per_epoch, total_steps


def check_negatives(cfg: Config, batch_size: int) -> None:
    """simclr's method.negatives=k draws k embeddings of OTHER images per anchor: the global
    batch must hold that many (every view, multi-crop included, of the batch's other images)."""
    k = cfg.method.negatives
    if cfg.method.name != "simclr" or not isinstance(k, int):
        return
    views = cfg.views.n + cfg.views.small_n
    available = views * (batch_size - 1)
    if k > available:
        raise UserError(f"method.negatives={k} is more than the {available} embeddings of other "
                        f"images each anchor has ({views} views x (batch {batch_size} - 1)); "
                        f"set method.negatives <= {available} or raise optim.batch_size")


def note_short_run(cfg: Config, steps_per_epoch: int, total_steps: int) -> None:
    """A warm-up as long as the run leaves no cosine decay: allowed (tiny test runs), but said."""
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    if warmup >= total_steps > 1:
        print(f"note: optim.warmup_epochs={cfg.optim.warmup_epochs} ({warmup} steps) covers the "
              f"whole run ({total_steps} steps): the lr only warms up, with no cosine decay; "
              "lower optim.warmup_epochs or raise train.epochs")


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
    # what the caller brought (ssl_lab.train's backbone= and data=): the evaluation needs them
    given_backbone: torch.nn.Module | None = None
    given_data: DatasetSplits | None = None
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


def build(cfg: Config, info: dist.DistInfo | None = None, backbone: torch.nn.Module | None = None,
          data: DatasetSplits | None = None, allow_import: bool = False) -> Setup:
    """Everything a run needs, every input validated; writes nothing (see start). `backbone`
    (ssl_lab.models.from_module) and `data` (ssl_lab.data.from_arrays / from_dataset) replace
    model.backbone and data.name."""
    validate(cfg)  # again: a Config built in Python has not been through load_config
    info = info or dist.DistInfo(0, 1, 0, pick_device())
    cfg, backbone = resolve_inputs(cfg, backbone, data, allow_import)
    given_data = data
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime.keep_freed_memory()  # fresh view batches are not page-faulted in every step
    device = info.device
    amp_dtype = resolve_precision(cfg.train.precision, device)
    method = get_method(cfg.method.name)  # fail on bad names before loading anything
    get_recipe(cfg.views.recipe, **cfg.views.recipe_options())
    run = agreed(info, lambda: RunDir.check(cfg.run.dir, cfg.resume, _default_name(cfg)))
    data = load_training_data(cfg, data)
    check_labels(cfg, data, method)
    size = view_size(cfg, data, backbone)
    views = ViewGenerator(get_recipe(cfg.views.recipe, size=size, **cfg.views.recipe_options()),
                          size, cfg.views.n)
    small_views = _small_view_generator(cfg, size, views.recipe.fast)
    cfg, batch_size, per_rank, steps_per_epoch, total_steps = _steps(cfg, len(data.ssl_train),
                                                                     info)
    resolution = _resolution_schedule(cfg, size, epochs_touched(total_steps, steps_per_epoch))
    num_classes = data.num_classes[0]
    mean, std = _normalisation(data, backbone)

    torch.manual_seed(cfg.seed)
    encoder = Encoder(cfg.model, data.in_chans, size, mean, std, backbone=backbone)
    model = SSLModel(encoder, method, cfg.method, num_classes)
    if info.distributed:  # global batch statistics, also on CPU (encoder, predictor, target)
        model = dist.convert_sync_batchnorm(model)
    model = model.to(device)
    probes = _online_probes(cfg, data, encoder, num_classes, device)
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
                 encoder_spec(cfg, data, size, mean, std, num_classes, backbone), probes, optimizer,
                 probe_optimizer, views, small_views, batch_size, steps_per_epoch, total_steps,
                 info, per_rank, resolution, given_backbone=backbone, given_data=given_data)


def _normalisation(data: DatasetSplits, backbone: torch.nn.Module | None):
    """A wrapped module's own mean/std (it may be pretrained on them), else the data's."""
    if backbone is not None and hasattr(backbone, "mean"):
        if getattr(backbone, "in_chans", data.in_chans) != data.in_chans:
            raise UserError(f"the backbone takes {backbone.in_chans}-channel images but "
                            f"{data.name} has {data.in_chans} channels; wrap it with "
                            f"in_chans={data.in_chans} or convert the images")
        return list(backbone.mean), list(backbone.std)
    return channel_stats(data.ssl_train.images)


def _online_probes(cfg: Config, data: DatasetSplits, encoder: Encoder, num_classes: int,
                   device: torch.device) -> OnlineProbes | None:
    if not cfg.probe.online:
        return None
    if num_classes < 1 or not (data.ssl_train.labels >= 0).any():
        print(f"note: {data.name} has no labels to train on: online probes are off")
        return None
    return OnlineProbes(encoder.feature_dims, num_classes).to(device)


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
