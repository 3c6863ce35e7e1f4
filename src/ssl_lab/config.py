"""Typed configuration: dataclasses, YAML files and `key=value` overrides.

A config is a tree of dataclasses. Every leaf has a type annotation that is *checked* when a
value arrives from YAML or the command line, and every key must exist: a typo is an error, not
a silently ignored setting. `to_dict` / `from_dict` round-trip, so the `config.yaml` written into
a run directory re-runs the same experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ssl_lab.errors import UserError
from ssl_lab.runtime import write_text_atomic


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


# ----------------------------------------------------------------------------- conversion


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type = Config, prefix: str = "", root: type | None = None
              ) -> Any:
    """Build a dataclass tree from a nested dict, rejecting unknown keys and wrong types.
    `root` is the top-level config class (for suggestions); it defaults to `cls`."""
    root = root or cls
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise UserError(_unknown_key_message(dotted, root))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, f"{dotted}.", root)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_message(dotted: str, root: type) -> str:
    close = difflib.get_close_matches(dotted, all_keys(root), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see the config table in README.md"
    return f"unknown config key '{dotted}'{hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a leaf annotation; ints are accepted where floats are expected."""
    options = _union_members(hint)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    lenient = _lenient(value, options)
    if lenient is not None:
        return lenient
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise UserError(f"config key '{key}' expects {expected}, got {value!r}")


def _lenient(value: Any, options: tuple) -> Any:
    """Second chance for YAML's quirks: PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`)
    and `model.projector=128` as an int; both mean what the user typed."""
    if float in options and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if str in options and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value) with the value read as YAML (so 3 is int, null is None)."""
    if "=" not in text:
        raise UserError(f"argument '{text}' is not key=value (example: optim.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]`: the first argument without '=' is the config file."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument '{stray[0]}': give the YAML file first, then "
                        "key=value (quote a list that contains spaces: 'key=[a, b]')")
    return None, args


def pop_options(args: list[str], defaults: dict[str, Any], command: str) -> tuple[dict, list[str]]:
    """A command's own `name=value` options (every command takes key=value, as `train`):
    ({name: value read as YAML, else the default}, the remaining arguments). Option names have
    no dot, so they never collide with config keys."""
    options, rest = dict(defaults), []
    for text in args:
        key, value = parse_override(text) if "=" in text else (None, None)
        if key is None or "." in key or key in ("seed", "resume"):
            rest.append(text)
        elif key in defaults:
            options[key] = value
        else:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown {command} option '{key}'{hint} (options: "
                            f"{', '.join(f'{k}=' for k in defaults)})")
    return options, rest


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def packaged_configs() -> Path:
    """The recipes that ship inside the package (the repository's configs/ links to them)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path as given, else a packaged recipe by name: `simclr`, `simclr.yaml` and
    `configs/simclr.yaml` all work from any directory, also from an installed wheel."""
    path = Path(path)
    if path.is_file() or len(path.parts) > 2 or len(path.parts) == 2 and path.parts[0] != "configs":
        return path
    packaged = packaged_configs() / f"{path.stem}.yaml"
    return packaged if path.suffix in ("", ".yaml") and packaged.is_file() else path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in packaged_configs().glob("*.yaml")))
        raise UserError(f"config file {path} not found; pass an existing YAML file or a packaged "
                        f"recipe ({names})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of config sections")
    return data


# Keys that may differ from a run's saved config on resume: where files are, how often to log or
# checkpoint, how long to run now, threads, and the offline evaluation at the end. None of them
# changes a training step. train.epochs may be raised (resume_conflicts says what that means).
RESUME_SAFE_KEYS = ("train.budget_s", "train.threads", "train.log_every_steps",
                    "train.ckpt_every_steps", "data.root", "data.prefetch", "run.name", "eval.*")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, then validated. With resume=true and a
    run.dir that holds a run, the base is that run's config.yaml instead of the defaults."""
    return load_typed(Config, path, overrides, RESUME_SAFE_KEYS, validate)


def load_typed(cls: type, path: str | Path | None, overrides: list[str] | tuple = (),
               safe_keys: tuple[str, ...] = (), check=None, base: dict | None = None) -> Any:
    """Any command's typed config tree (a dataclass with `resume` and `run.dir`): `base` (or
    the defaults) ← YAML file ← `key=value`; on resume the run's own config.yaml is the base
    and what was given must agree with it (resume_conflicts). `check` validates values."""
    given: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        set_dotted(given, *parse_override(text))
    tree = _merge(base or {}, given)
    cfg = from_dict(tree, cls)  # the user's own input is typed and checked first
    saved = Path(cfg.run.dir) / "config.yaml" if cfg.resume and cfg.run.dir else None
    if saved is not None and saved.is_file():
        saved_tree = _saved_tree(saved)
        try:
            saved_cfg = from_dict(saved_tree, cls)
        except UserError as exc:
            raise UserError(f"cannot resume: {saved} is not a config of this command ({exc})"
                            ) from None
        typed = flatten(to_dict(cfg))  # what was given, as typed values (128 -> "128")
        given_keys = [k for k in flatten(tree) if k in typed]
        resume_conflicts(to_dict(saved_cfg), {k: typed[k] for k in given_keys}, safe_keys, saved)
        cfg = from_dict(_merge(to_dict(saved_cfg), tree), cls)
    if check is not None:
        check(cfg)
    return cfg


def _saved_tree(path: Path) -> dict[str, Any]:
    try:
        return read_yaml(path)
    except UserError as exc:
        raise UserError(f"cannot resume: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot resume: {path} is unreadable ({exc}); restore it or start a "
                        "new run.dir") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def resume_conflicts(saved: dict[str, Any], given: dict[str, Any], safe_keys: tuple[str, ...],
                     path: Path) -> None:
    """Refuse (one line, exit 2) a resume whose given keys differ from the saved run's, except
    `safe_keys` (a trailing `.*` covers a section) and a raised train.epochs."""
    saved_flat = flatten(saved)
    for key, value in given.items():
        if key in ("resume", "run.dir") or _is_safe(key, safe_keys) or key not in saved_flat:
            continue
        old = saved_flat[key]
        if _same(old, value):
            continue
        if key == "train.epochs" and isinstance(value, (int, float)) and value > old:
            sys.stderr.write(f"ssl-lab: train.epochs raised from {old} to {value} on resume: the "
                             "lr schedule (warm-up + cosine) is recomputed for the new length from "
                             "the resumed step on, so the lr jumps and the run no longer equals a "
                             f"fresh {value}-epoch run\n")
            continue
        raise UserError(f"resume: {key} is {_short(old)} in {path} but {_short(value)} was given; "
                        f"drop {key} to continue the run as saved, or start a new run.dir (README, "
                        "'Resume', lists the keys that may change)")


def _is_safe(key: str, safe_keys: tuple[str, ...]) -> bool:
    return any(key == s or s.endswith(".*") and key.startswith(s[:-1]) for s in safe_keys)


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(
            old, bool) and not isinstance(new, bool):
        return float(old) == float(new)
    return old == new


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved config as YAML, written whole or not at all."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "optim.name": ("sgd", "adamw", "lars"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.on_nan": ("stop", "skip"),
    "eval.precision": ("fp32", "train"),
    "method.beta_scaling": ("none", "inverse_dim"),
    "model.stem": ("cifar", "small", "imagenet"),
}


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; names of methods/backbones/recipes/data are
    checked where they are looked up, against the registries that define them."""
    flat = flatten(to_dict(cfg))
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, got {flat[key]!r}")
    positive = ["optim.lr", "optim.batch_size", "train.epochs", "views.n", "train.ckpt_every_steps",
                "train.log_every_steps", "method.temperature", "probe.lr", "eval.batch_size",
                "eval.knn_k", "eval.knn_temperature", "model.width", "method.beta_ref_dim",
                "views.size_step"]
    for key in positive:
        if not flat[key] > 0:
            raise UserError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    non_negative = ["optim.weight_decay", "optim.warmup_epochs", "views.noise_std", "views.size",
                    "views.small_n", "views.small_size", "views.min_size", "views.ramp_start",
                    "data.prefetch", "method.lambd", "method.beta"]
    for key in non_negative:
        if flat[key] < 0:
            raise UserError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
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
    for key in ("ram_budget_mb", "aug_epochs", "aug_batch_size", "aug_lr"):
        if not getattr(cfg.eval, key) > 0:
            raise UserError(f"config key 'eval.{key}' must be > 0, got {getattr(cfg.eval, key)!r}")
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
    if not 0 <= cfg.method.momentum <= 1:
        raise UserError(f"method.momentum must be in [0, 1], got {cfg.method.momentum}")
    for key in ("method.student_temp", "method.teacher_temp", "method.warmup_teacher_temp"):
        if not flat[key] > 0:
            raise UserError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    for key in ("method.warmup_teacher_temp_epochs", "method.freeze_last_layer_epochs",
                "method.clip_grad"):
        if flat[key] < 0:
            raise UserError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
    if not 0 <= cfg.method.center_momentum <= 1:
        raise UserError(f"method.center_momentum must be in [0, 1], got {cfg.method.center_momentum}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
