"""Infusion training's typed configuration (`ssl-lab infusion train [CONFIG.yaml] key=value`)
and the `key=value` arguments of `infusion sample`.

Loading goes through the shared `config_io.load_typed`: with `run.dir=X resume=true` the run's
saved config.yaml is the base, and a given key that differs from it is refused unless it is in
`RESUME_SAFE_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_lab.config_io import from_dict, load_typed, parse_override, read_yaml, set_dotted
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf

DEFAULT_BOUND_STDS = (0.005, 0.01, 0.02, 0.05)
LIST_KEYS = ("score.sigmas", "score.bound_stds")  # comma-separated numbers
# May differ from the saved config on resume. train.epochs too: Adam runs at a constant lr and
# each epoch's order depends on (seed, epoch) only, so a longer run equals a fresh longer run.
RESUME_SAFE_KEYS = ("train.epochs", "train.budget_s", "train.threads", "train.log_every_steps",
                    "train.ckpt_every_steps", "train.monitor_n", "data.root", "score.*")


@dataclass
class RunSection:
    dir: str | None = None  # default: runs/infusion-<data>-<UTC timestamp>


@dataclass
class DataSection:
    name: str = "fashion-mnist"
    root: str | None = None
    fraction: float = 1.0
    val_fraction: float = 0.1


@dataclass
class InfusionSection:
    steps: int = 10  # T
    alpha0: float = 0.02  # α_t = α_0 + ω·t
    omega: float = 0.02
    operator: str = "mlp"  # mlp (paper) | conv (small, for RGB)
    hidden: int = 1200  # MLP units / conv channels
    layers: int = 2
    weighting: str = "linear"  # w_t: linear (t/T, authors) | uniform | last
    var_scale: float = 0.1  # variance = sigmoid · var_scale + var_min
    var_min: float = 1e-4


@dataclass
class OptimSection:
    lr: float = 1e-3  # Adam
    batch_size: int = 512


@dataclass
class TrainSection:
    epochs: int = 100
    budget_s: float | None = None  # stop (and checkpoint) after this much training time
    ckpt_every_steps: int = 500
    log_every_steps: int = 50
    threads: int | None = None
    monitor_n: int = 128  # val images for the per-epoch lower bound (0 = off)


@dataclass
class ScoreSection:
    parzen_samples: int = 10000  # generated samples = Parzen centers
    test_n: int | None = None  # test images scored (None = all)
    val_n: int = 1000  # val images used to choose σ (and the bound's s)
    sigmas: str | None = None  # Parzen σ grid, "0.05,0.1,..."; None = 14 log-spaced in [0.05, 1]
    bound_samples: int = 10  # K importance samples per image
    bound_n: int = 1000  # test images for the bound (it costs K·T operator passes each)
    bound_stds: str | None = None  # grid for s, the smoothed infusion's std (None: 0.005..0.05)
    bound_val_n: int = 200  # val images to choose the bound's proposal
    batch: int = 1024

    def sigma_grid(self) -> list[float]:
        return parse_floats(self.sigmas, "score.sigmas") or inf.default_sigmas()

    def bound_std_grid(self) -> list[float]:
        return parse_floats(self.bound_stds, "score.bound_stds") or list(DEFAULT_BOUND_STDS)


@dataclass
class InfusionConfig:
    seed: int = 0
    resume: bool = False
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    infusion: InfusionSection = field(default_factory=InfusionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    score: ScoreSection = field(default_factory=ScoreSection)


def parse_floats(text: str | None, key: str) -> list[float] | None:
    """"0.1,0.2" → [0.1, 0.2] (positive numbers); None stays None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).strip("[]").split(",")]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise UserError(f"config key '{key}' must be positive numbers separated by commas "
                        f"(e.g. {key}=0.1,0.2), got {text!r}")
    return values


def _list_as_text(text: str) -> str:
    """`score.sigmas=[0.1, 0.2]` (a YAML list) → `score.sigmas=0.1,0.2`: the config holds such
    grids as comma-separated text, like unet.channels or model.projector."""
    key, value = parse_override(text)
    if key in LIST_KEYS and isinstance(value, list):
        return f"{key}={','.join(str(v) for v in value)}"
    return text


def validate(cfg: InfusionConfig) -> None:
    positive = {"infusion.steps": cfg.infusion.steps, "infusion.hidden": cfg.infusion.hidden,
                "infusion.layers": cfg.infusion.layers, "optim.lr": cfg.optim.lr,
                "optim.batch_size": cfg.optim.batch_size, "train.epochs": cfg.train.epochs,
                "train.ckpt_every_steps": cfg.train.ckpt_every_steps,
                "train.log_every_steps": cfg.train.log_every_steps,
                "infusion.var_min": cfg.infusion.var_min,
                "score.parzen_samples": cfg.score.parzen_samples,
                "score.bound_samples": cfg.score.bound_samples, "score.batch": cfg.score.batch,
                "score.val_n": cfg.score.val_n, "score.bound_n": cfg.score.bound_n,
                "score.bound_val_n": cfg.score.bound_val_n}
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0, got {value!r}")
    for key, value in {"infusion.alpha0": cfg.infusion.alpha0,
                       "infusion.omega": cfg.infusion.omega}.items():
        if not 0 <= value <= 1:
            raise UserError(f"config key '{key}' must be in [0, 1], got {value!r}")
    _check_optional(cfg)
    if cfg.infusion.operator not in ("mlp", "conv"):
        raise UserError(f"infusion.operator must be mlp or conv, got {cfg.infusion.operator!r}")
    inf.loss_weights(1, cfg.infusion.weighting)  # raises on a bad name
    if not 0 < cfg.data.fraction <= 1:
        raise UserError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1) (σ is chosen on val), "
                        f"got {cfg.data.val_fraction}")


def _check_optional(cfg: InfusionConfig) -> None:
    t, sc = cfg.train, cfg.score
    if t.budget_s is not None and t.budget_s <= 0:
        raise UserError(f"train.budget_s must be > 0 or null, got {t.budget_s}")
    if t.threads is not None and t.threads <= 0:
        raise UserError(f"train.threads must be > 0 or null, got {t.threads}")
    if t.monitor_n < 0:
        raise UserError(f"train.monitor_n must be >= 0, got {t.monitor_n}")
    if sc.test_n is not None and sc.test_n <= 0:
        raise UserError(f"score.test_n must be > 0 or null, got {sc.test_n}")
    sc.sigma_grid()
    sc.bound_std_grid()


def load_infusion_config(path: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    """Defaults ← YAML file ← `key=value` (or, with resume=true on a started run.dir, that
    run's config.yaml ← the keys that may change on resume), validated."""
    overrides = [_list_as_text(o) for o in overrides]
    return load_typed(InfusionConfig, path, overrides, RESUME_SAFE_KEYS, validate)


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    """A trained run's config, with `score.*` (and `data.root`) overrides for `score`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not an infusion run (no config.yaml); pass a directory "
                        "made by `ssl-lab infusion train`")
    bad = [o for o in overrides if not o.startswith(("score.", "data.root="))]
    if bad:
        raise UserError(f"score takes only score.* (and data.root) overrides, got '{bad[0]}': "
                        "the model's settings come from the run's config.yaml")
    tree: dict[str, Any] = read_yaml(run_dir / "config.yaml")
    for text in overrides:
        set_dotted(tree, *parse_override(_list_as_text(text)))
    cfg = from_dict(tree, InfusionConfig)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- sample


@dataclass
class SampleArgs:
    """`infusion sample RUN key=value ...`."""

    n: int = 64  # samples in samples.png
    chains: int = 8  # rows of chain.png: one chain each, z_0 … x̂
    seed: int = 0
    out: str | None = None  # default RUN/samples/n<n>-chains<chains>-seed<seed>


def parse_sample_args(overrides: list[str] | tuple[str, ...]) -> SampleArgs:
    tree: dict[str, Any] = {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    args = from_dict(tree, SampleArgs)
    check_sample_args(args)
    return args


def check_sample_args(args: SampleArgs) -> None:
    for key in ("n", "chains"):
        if getattr(args, key) < 1:
            raise UserError(f"{key} must be >= 1, got {getattr(args, key)}")
    out = Path(args.out) if args.out is not None else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} already exists and is not an empty folder; choose a new "
                        "out= (nothing is overwritten)")
