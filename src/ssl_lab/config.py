"""The training run's typed configuration: one dataclass per section (run, data, views, model,
method, optim, train, probe, eval), the keys that may change on resume, and the value checks
(the Range mechanism every command's config uses, and this config's table of ranges).
The machinery (YAML, key=value, resume against a saved config) is ssl_lab.config_io.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_lab.config_io import flatten, leaf_hints, load_typed, short, to_dict, union_members
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


# ----------------------------------------------------------------------------- ranges
# The mechanism every command's config uses (rcdm_config and infusion_config have their own
# tables); the training run's table, RANGES, follows below.


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: finite, in [low, high] (`open_low` / `open_high`
    exclude that bound); `why` is said with a refusal. Each config keeps a table
    {key: Range} that covers every numeric key (tests enumerate the dataclasses)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False
    why: str = ""

    def __str__(self) -> str:
        right = ")" if self.open_high or self.high == math.inf else "]"
        return f"{'(' if self.open_low else '['}{_bound(self.low)}, {_bound(self.high)}{right}"

    def problem(self, value: int | float) -> str | None:
        """None if `value` is allowed, else what it must be ("must be >= 2")."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if value < self.low or self.open_low and value == self.low:
            return f"must be {'>' if self.open_low else '>='} {_bound(self.low)}"
        if value > self.high or self.open_high and value == self.high:
            return f"must be {'<' if self.open_high else '<='} {_bound(self.high)}"
        return None


def closed(low: float, high: float = math.inf, why: str = "") -> Range:
    """[low, high]."""
    return Range(low, high, why=why)


def above(low: float, high: float = math.inf, why: str = "") -> Range:
    """(low, high]: e.g. above(0) for a positive number."""
    return Range(low, high, open_low=True, why=why)


SEED = closed(0, 2**32 - 1, "derived seeds (seed x 1000003 + step) must fit torch's 64 bits")
UNIT = closed(0, 1)  # a fraction or a momentum
SHARE = above(0, 1)  # a share of something that must not be empty (data.fraction)
STEPS = closed(1, 2**31 - 1)  # a count of steps (how often to log or checkpoint)


MAX_TEXT = 256  # a name, a spec, a list of layers
MAX_PATH = 4096  # PATH_MAX on Linux: paths (and data.name=imagefolder:PATH) may be this long


def check_text(cfg: Any, paths: tuple[str, ...] = (), label: str = "config key '{}'") -> None:
    """Every string value of `cfg` is at most MAX_TEXT characters (MAX_PATH for the keys in
    `paths`): nothing downstream has to guard its messages against a megabyte value."""
    for key, value in flatten(to_dict(cfg)).items():
        limit = MAX_PATH if key in paths else MAX_TEXT
        if isinstance(value, str) and len(value) > limit:
            raise UserError(f"{label.format(key)} is {len(value)} characters long; at most "
                            f"{limit} are allowed, got {short(value)}")


def _bound(x: float) -> str:
    if x == math.inf:
        return "inf"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_ranges(cfg: Any, table: dict[str, Range], label: str = "config key '{}'") -> None:
    """Refuse the first value of `cfg` (a dataclass tree) outside its key's Range: one line
    naming the key (`label` formats it), the rule, the allowed range and the value (cut). A
    null or a string where the annotation allows one is not a number to check; any other
    non-number (a config built in Python skips from_dict's types) is refused too."""
    flat = flatten(to_dict(cfg))
    hints = leaf_hints(type(cfg))
    for key, rule in table.items():
        value, members = flat[key], union_members(hints[key])
        if value is None and type(None) in members or isinstance(value, str) and str in members:
            continue
        null = " or null" if type(None) in members else ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{label.format(key)} expects a number{null}, got {short(value)}")
        problem = rule.problem(value)
        if problem:
            why = f"; {rule.why}" if rule.why else ""
            raise UserError(f"{label.format(key)} {problem} (allowed: {rule}{null}{why}), "
                            f"got {short(value)}")


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "optim.name": ("sgd", "adamw", "lars"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.on_nan": ("stop", "skip"),
    "eval.precision": ("fp32", "train"),
    "eval.feature_dtype": ("float32", "float16"),
    "eval.linear": ("frozen", "augmented"),
    "method.beta_scaling": ("none", "inverse_dim"),
    "model.stem": ("cifar", "small", "imagenet"),
    "model.pool": ("cls", "mean"),
}

SIDE = closed(0, 4096)  # an image or view side in pixels (0 = the default); 4096² x 3 B = 48 MiB
POSITIVE = above(0)
NON_NEGATIVE = closed(0)
BIG = 2**24  # batch sizes and similar counts: far above any real setting, still allocatable

# Every numeric key's allowed values (finite, and in this range); config_io.check_ranges.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "data.fraction": SHARE, "data.val_fraction": Range(0, 1, open_high=True),
    "data.prefetch": closed(0, 64), "data.image_size": SIDE,
    "views.n": closed(2, 64, "joint-embedding SSL compares views"),
    "views.size": SIDE, "views.noise_std": closed(0, 10), "views.small_n": closed(0, 64),
    "views.small_size": SIDE, "views.small_scale": above(0.05, 1),
    "views.crop_min_scale": SHARE, "views.min_size": SIDE,
    "views.ramp_start": closed(0, 10**6), "views.ramp_end": closed(0, 10**6),
    "views.size_step": closed(1, 4096),
    # ViT sizes (0 = the preset's): ViT-g has 40 blocks, 16 heads, width 1408
    "model.width": above(0, 8), "model.last_width": closed(1, 65536), "model.patch_size": SIDE,
    "model.depth": closed(0, 128), "model.heads": closed(0, 256), "model.embed_dim": closed(0, 16384),
    "method.temperature": POSITIVE, "method.negatives": closed(1, BIG),
    "method.lambd": NON_NEGATIVE, "method.beta": NON_NEGATIVE,
    "method.beta_ref_dim": closed(1, 2**20), "method.sim_weight": NON_NEGATIVE,
    "method.var_weight": NON_NEGATIVE, "method.cov_weight": NON_NEGATIVE,
    "method.momentum": UNIT, "method.student_temp": POSITIVE, "method.teacher_temp": POSITIVE,
    "method.warmup_teacher_temp": POSITIVE, "method.warmup_teacher_temp_epochs": NON_NEGATIVE,
    "method.center_momentum": UNIT, "method.freeze_last_layer_epochs": NON_NEGATIVE,
    "method.clip_grad": NON_NEGATIVE,
    "optim.lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE,
    "optim.batch_size": closed(2, BIG, "BatchNorm and contrastive losses need 2 images a batch"),
    "optim.warmup_epochs": closed(0, 10**6), "optim.momentum": UNIT,
    "optim.final_lr_frac": closed(0, 1, "the cosine ends at this fraction of the peak lr"),
    "train.epochs": above(0, 10**6), "train.budget_s": POSITIVE, "train.ckpt_every_steps": STEPS,
    "train.log_every_steps": STEPS, "train.threads": closed(1, 4096),
    "probe.lr": POSITIVE,
    "eval.knn_k": closed(1, BIG), "eval.knn_temperature": POSITIVE, "eval.train_fraction": SHARE,
    "eval.batch_size": closed(1, BIG), "eval.ram_budget_mb": closed(1, 2**30),
    "eval.aug_epochs": closed(1, 10**5), "eval.aug_batch_size": closed(1, BIG),
    "eval.aug_lr": POSITIVE,
}


# string keys that hold paths (data.name: imagefolder:PATH, model.backbone: import:module:factory)
PATH_KEYS = ("run.dir", "data.name", "data.root", "model.backbone", "eval.data", "eval.feature_dir")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express: choices, every numeric key's Range, and the
    rules between keys that need no data (train_setup checks those that do). Names of methods,
    backbones, recipes and data are checked where they are looked up, against their registries."""
    flat = flatten(to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, "
                            f"got {short(flat[key])}")
    check_text(cfg, PATH_KEYS)
    check_ranges(cfg, RANGES)
    if cfg.views.ramp_end is not None and cfg.views.ramp_end < cfg.views.ramp_start:
        raise UserError(f"views.ramp_end ({cfg.views.ramp_end}) must be >= views.ramp_start "
                        f"({cfg.views.ramp_start}) or null")
    if isinstance(cfg.method.negatives, str) and cfg.method.negatives != "all":
        raise UserError(f"method.negatives must be 'all' or an int >= 1, got "
                        f"{short(cfg.method.negatives)}")
    _check_widths(cfg)


MAX_WIDTH = 2**17  # a projector / predictor layer: DINO's 65536 prototypes fit, 10**30 does not


def _check_widths(cfg: Config) -> None:
    """Layer widths are sized from text: bound them before any tensor is allocated."""
    from ssl_lab.models.projector import parse_projector_spec  # models import this module

    for key, spec in (("model.projector", cfg.model.projector),
                      ("method.predictor", cfg.method.predictor)):
        widths = [layer.width for layer in parse_projector_spec(spec)]
        if widths and max(widths) > MAX_WIDTH:
            raise UserError(f"config key '{key}' has a layer of width {short(max(widths), 30)}; "
                            f"widths must be <= {MAX_WIDTH}, got {short(spec)}")
