"""The training run's typed configuration: one dataclass per section (run, data, views, model,
method, optim, train, probe, eval), the keys that may change on resume, and the value checks.
The machinery (YAML, key=value, resume against a saved config) is ssl_lab.config_io.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssl_lab.config_io import flatten, load_typed, to_dict
from ssl_lab.errors import UserError


@dataclass
class RunConfig:
    dir: str | None = None  # default: runs/<method>-<data>-<UTC timestamp>
    name: str | None = None  # optional label stored in summary.json


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None
    fraction: float = 1.0  # seeded subset of the training split
    target: str | None = None  # label column of multi-factor data (e.g. shapes: colour)
    val_fraction: float = 0.1
    prefetch: int = 2  # packed stores: batches read ahead in a background thread (0 = inline)
    # imagefolder: images are resized (shorter side, then centre crop) to this many pixels;
    # 0 = keep each source's size (imagefolder: up to 224 px)
    image_size: int = 0


@dataclass
class ViewsConfig:
    recipe: str = "simclr"
    n: int = 4  # 4 views of 128 images beat 2 of 256 at the same views per step (docs/RESULTS.md)
    size: int = 0  # 0 = the dataset's default view size (data.sources.VIEW_SIZES, else its image size)
    noise_std: float = 0.1
    # fast views (Recipe.fast: crop, blur and one colour matrix as bf16 GEMMs, one clamp);
    # null = by view size: on above 64 px, off at <= 64 px (every small-image result here)
    fast: bool | None = None
    small_n: int = 0  # multi-crop: extra small views per image (SwAV-style), 0 = off
    small_size: int = 0  # their size in pixels (0 = half the view size, at least 8)
    small_scale: float = 0.4  # their crops cover (0.05, small_scale) of the image
    # the crops' smallest area fraction (null = the recipe's: 0.2, or 0.08 above 64 px)
    crop_min_scale: float | None = None
    # shrinking crops low-pass filtered as torchvision >= 0.17 and PIL do (false: plain bilinear)
    antialias: bool = False
    # progressive resolution (FFCV-SSL): views grow from min_size (0 = off) to the view size
    # between epochs ramp_start and ramp_end (null = the last epoch), in multiples of size_step
    min_size: int = 0
    ramp_start: int = 0
    ramp_end: int | None = None
    size_step: int = 8

    def recipe_options(self) -> dict:
        """The keyword arguments of `data.views.get_recipe` that this section sets."""
        return {"noise_std": self.noise_std, "fast": self.fast,
                "crop_min_scale": self.crop_min_scale, "antialias": self.antialias}


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: float = 0.25
    last_width: int | None = 1024  # Expand/Narrow: a wide last block probes better (docs/RESULTS.md)
    stem: str = "small"
    projector: str = "512-512-128"
    # ViT only (0 = the preset's): patch size, blocks, heads, token width; pool: cls | mean
    patch_size: int = 0
    depth: int = 0
    heads: int = 0
    embed_dim: int = 0
    pool: str = "cls"


@dataclass
class MethodConfig:
    name: str = "simclr"
    temperature: float = 0.2  # simclr / supcon / mocov3
    negatives: str | int = "all"  # simclr: "all" or k negatives per anchor
    lambd: float = 0.0051  # barlow_twins
    beta: float = 0.0051  # multiview_barlow
    beta_scaling: str = "none"  # "none" | "inverse_dim": beta = beta * beta_ref_dim / d
    beta_ref_dim: int = 128
    sim_weight: float = 25.0  # vicreg family
    var_weight: float = 25.0
    cov_weight: float = 1.0
    predictor: str = "512"  # byol / mocov3 / simsiam: hidden widths; the output has z's width
    momentum: float = 0.996  # byol / mocov3 / dino: target EMA, cosine-scheduled to 1
    predictor_fixed_lr: bool = False  # simsiam: the predictor keeps the peak lr (no schedule)
    student_temp: float = 0.1  # dino
    teacher_temp: float = 0.04  # dino: the teacher temperature after its warm-up
    warmup_teacher_temp: float = 0.04  # dino: ... at step 0, linear to teacher_temp
    warmup_teacher_temp_epochs: float = 0.0  # dino: length of that warm-up (0 = none)
    center_momentum: float = 0.9  # dino: EMA of the teacher-output center
    freeze_last_layer_epochs: float = 1.0  # dino: the head's last layer is not updated before
    clip_grad: float = 0.0  # any method: per-parameter gradient-norm clip (DINO: 3.0), 0 = off


@dataclass
class OptimConfig:
    name: str = "adamw"  # sgd | adamw | lars
    lr: float = 8e-3  # base lr for a batch of 256: the used lr is lr * batch_size / 256
    weight_decay: float = 1e-4
    batch_size: int = 128  # images per step (x views.n views)
    warmup_epochs: float = 0.5
    momentum: float = 0.9  # sgd / lars
    final_lr_frac: float = 0.001  # cosine decays to this fraction of the peak lr


@dataclass
class TrainConfig:
    epochs: float = 2.25  # may be fractional: training ends after round(epochs x steps per epoch) steps
    budget_s: float | None = None  # stop (and checkpoint) once training has used this many seconds
    ckpt_every_steps: int = 500
    log_every_steps: int = 50
    precision: str = "auto"  # auto (bf16 where supported) | bf16 | fp16 | fp32
    channels_last: bool = True
    compile: bool = False
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    on_nan: str = "stop"  # stop | skip


@dataclass
class ProbeConfig:
    online: bool = True
    lr: float = 1e-3


@dataclass
class EvalConfig:
    enabled: bool = True  # evaluate offline at the end of `train`
    # the labelled dataset the offline probes use (null = data.name): e.g. SSL on an unlabelled
    # image folder, probes on stl10
    data: str | None = None
    mlp: bool = False
    knn_k: int = 200
    knn_temperature: float = 0.1
    baselines: bool = True  # random-init encoder and raw-pixel probes (cached)
    # probes train on this seeded (nested) share of the labelled train split; <1 for cheap
    # study sweeps. val and test are never subsampled.
    train_fraction: float = 1.0
    batch_size: int = 1024
    # fp32 features by default: bf16 keeps 8 mantissa bits, which merges nearly collinear
    # features (narrow or barely trained encoders; docs/RESULTS.md). "train" = train.precision.
    precision: str = "fp32"
    layers: str | None = None  # comma-separated layers to probe, e.g. "backbone,proj1"; null = all
    # a layer whose probes fit this many MB is probed in RAM (full-batch L-BFGS on tensors);
    # a larger one is streamed block by block from its feature file (docs/eval.md, "Memory")
    ram_budget_mb: int = 2048
    feature_dtype: str = "float32"  # feature files: float32 | float16 (half the disk, rounded)
    feature_dir: str | None = None  # where the feature files go (null: inside the run directory)
    keep_features: bool = False  # keep them (<feature_dir or run>/features/...), else removed
    # "frozen": the per-layer probes only; "augmented" adds the papers' linear evaluation (SGD
    # on random-resized-crop + flip views of the train images) of the layer eval.aug_layer
    linear: str = "frozen"
    aug_layer: str = "backbone"
    aug_epochs: int = 100
    aug_batch_size: int = 256
    aug_lr: float = 0.1  # for a batch of 256: the used lr is aug_lr * aug_batch_size / 256


@dataclass
class Config:
    seed: int = 0
    resume: bool = False
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys that may differ from a run's saved config on resume: where files are, how often to log or
# checkpoint, how long to run now, threads, and the offline evaluation at the end. None of them
# changes a training step. train.epochs may be raised (resume_conflicts says what that means).
RESUME_SAFE_KEYS = ("train.budget_s", "train.threads", "train.log_every_steps",
                    "train.ckpt_every_steps", "data.root", "data.prefetch", "run.name", "eval.*")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, then validated. With resume=true and a
    run.dir that holds a run, the base is that run's config.yaml instead of the defaults."""
    return load_typed(Config, path, overrides, RESUME_SAFE_KEYS, validate)


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "optim.name": ("sgd", "adamw", "lars"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.on_nan": ("stop", "skip"),
    "eval.precision": ("fp32", "train"),
    "method.beta_scaling": ("none", "inverse_dim"),
    "model.stem": ("cifar", "small", "imagenet"),
    "model.pool": ("cls", "mean"),
}


_POSITIVE = ("optim.lr", "optim.batch_size", "train.epochs", "views.n", "train.ckpt_every_steps",
             "train.log_every_steps", "method.temperature", "probe.lr", "eval.batch_size",
             "eval.knn_k", "eval.knn_temperature", "model.width", "method.beta_ref_dim",
             "views.size_step", "method.student_temp", "method.teacher_temp",
             "method.warmup_teacher_temp", "eval.ram_budget_mb", "eval.aug_epochs",
             "eval.aug_batch_size", "eval.aug_lr")
_NON_NEGATIVE = ("optim.weight_decay", "optim.warmup_epochs", "views.noise_std", "views.size",
                 "views.small_n", "views.small_size", "views.min_size", "views.ramp_start",
                 "data.prefetch", "method.lambd", "method.beta", "method.warmup_teacher_temp_epochs",
                 "method.freeze_last_layer_epochs", "method.clip_grad", "data.image_size",
                 "model.patch_size", "model.depth", "model.heads", "model.embed_dim")
_UNIT = ("method.momentum", "method.center_momentum")  # in [0, 1]


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; names of methods/backbones/recipes/data are
    checked where they are looked up, against the registries that define them."""
    flat = flatten(to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, got {flat[key]!r}")
    for keys, ok, rule in ((_POSITIVE, lambda v: v > 0, "> 0"),
                           (_NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
                           (_UNIT, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for key in keys:
            if not ok(flat[key]):
                raise UserError(f"config key '{key}' must be {rule}, got {flat[key]!r}")
    _check_ranges(cfg)


def _check_ranges(cfg: Config) -> None:
    if cfg.views.n < 2:
        raise UserError(f"views.n must be >= 2 (joint-embedding SSL compares views), got {cfg.views.n}")
    if cfg.views.crop_min_scale is not None and not 0 < cfg.views.crop_min_scale <= 1:
        raise UserError(f"views.crop_min_scale must be in (0, 1], got {cfg.views.crop_min_scale}")
    if not 0.05 < cfg.views.small_scale <= 1:
        raise UserError(f"views.small_scale must be in (0.05, 1], got {cfg.views.small_scale}")
    if not 0 < cfg.data.fraction <= 1:
        raise UserError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if not 0 < cfg.eval.train_fraction <= 1:
        raise UserError(f"eval.train_fraction must be in (0, 1], got {cfg.eval.train_fraction}")
    for key, choices in (("feature_dtype", ("float32", "float16")),
                         ("linear", ("frozen", "augmented"))):
        if getattr(cfg.eval, key) not in choices:
            raise UserError(f"config key 'eval.{key}' must be one of {', '.join(choices)}, "
                            f"got {getattr(cfg.eval, key)!r}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.views.ramp_end is not None and cfg.views.ramp_end < cfg.views.ramp_start:
        raise UserError(f"views.ramp_end ({cfg.views.ramp_end}) must be >= views.ramp_start "
                        f"({cfg.views.ramp_start}) or null")
    if cfg.model.last_width is not None and cfg.model.last_width <= 0:
        raise UserError(f"model.last_width must be a positive int or null, got {cfg.model.last_width}")
    if cfg.train.budget_s is not None and cfg.train.budget_s <= 0:
        raise UserError(f"train.budget_s must be > 0 or null, got {cfg.train.budget_s}")
    neg = cfg.method.negatives
    if isinstance(neg, str) and neg != "all" or isinstance(neg, int) and neg < 1:
        raise UserError(f"method.negatives must be 'all' or an int >= 1, got {neg!r}")
