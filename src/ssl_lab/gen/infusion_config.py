"""Infusion training's typed configuration (`ssl-lab infusion train [CONFIG.yaml] key=value`)
and the `key=value` arguments of `infusion sample`.

Loading goes through the shared `config_io.load_typed`: with `run.dir=X resume=true` the run's
saved config.yaml is the base, and a given key that differs from it is refused unless it is in
`RESUME_SAFE_KEYS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_lab.config import SEED, SHARE, STEPS, UNIT, Range, above, check_ranges, check_text, closed
from ssl_lab.config_io import cut, from_dict, load_typed, parse_override, read_yaml, set_dotted, short
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


MAX_GRID = 100  # values in a σ grid: each one is a full Parzen pass over val


def parse_floats(text: str | None, key: str) -> list[float] | None:
    """"0.1,0.2" → [0.1, 0.2] (finite positive numbers, at most MAX_GRID); None stays None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).strip("[]").split(",")]
    except ValueError:
        values = []
    if not 0 < len(values) <= MAX_GRID or not all(0 < v < math.inf for v in values):
        raise UserError(f"config key '{key}' must be 1 to {MAX_GRID} finite positive numbers "
                        f"separated by commas (e.g. {key}=0.1,0.2), got {short(text)}")
    return values


def _list_as_text(text: str) -> str:
    """`score.sigmas=[0.1, 0.2]` (a YAML list) → `score.sigmas=0.1,0.2`: the config holds such
    grids as comma-separated text, like unet.channels or model.projector."""
    key, value = parse_override(text)
    if key in LIST_KEYS and isinstance(value, list):
        return f"{key}={','.join(str(v) for v in value)}"
    return text


BIG = 2**24
MANY = closed(1, 10**7)  # images or samples to score
# Every numeric key's allowed values (finite, and in this range); config_io.check_ranges.
RANGES: dict[str, Range] = {
    "seed": SEED, "data.fraction": SHARE,
    "data.val_fraction": Range(0, 1, open_low=True, open_high=True, why="σ is chosen on val"),
    "infusion.steps": closed(1, 1000), "infusion.alpha0": UNIT, "infusion.omega": UNIT,
    "infusion.hidden": closed(1, 65536), "infusion.layers": closed(1, 64),
    "infusion.var_scale": closed(0), "infusion.var_min": above(0),
    "optim.lr": above(0), "optim.batch_size": closed(1, BIG),
    "train.epochs": closed(1, 10**6), "train.budget_s": above(0),
    "train.ckpt_every_steps": STEPS, "train.log_every_steps": STEPS,
    "train.threads": closed(1, 4096), "train.monitor_n": closed(0, 10**7, "0 = off"),
    "score.parzen_samples": MANY, "score.test_n": MANY, "score.val_n": MANY,
    "score.bound_samples": closed(1, 10**4), "score.bound_n": MANY, "score.bound_val_n": MANY,
    "score.batch": closed(1, BIG),
}


def validate(cfg: InfusionConfig) -> None:
    """Choices, every numeric key's Range, and the score grids."""
    check_text(cfg, ("run.dir", "data.name", "data.root", "score.sigmas", "score.bound_stds"))
    check_ranges(cfg, RANGES)
    if cfg.infusion.operator not in ("mlp", "conv"):
        raise UserError(f"infusion.operator must be mlp or conv, got {short(cfg.infusion.operator)}")
    inf.loss_weights(1, cfg.infusion.weighting)  # raises on a bad name
    cfg.score.sigma_grid()
    cfg.score.bound_std_grid()


def load_infusion_config(path: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    """Defaults ← YAML file ← `key=value` (or, with resume=true on a started run.dir, that
    run's config.yaml ← the keys that may change on resume), validated."""
    overrides = [_list_as_text(o) for o in overrides]
    return load_typed(InfusionConfig, path, overrides, RESUME_SAFE_KEYS, validate)


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    """A trained run's config, with `score.*` (and `data.root`) overrides for `score`."""
    run_dir = Path(run_dir)
    check_infusion_run(run_dir)
    bad = [o for o in overrides if not o.startswith(("score.", "data.root="))]
    if bad:
        raise UserError(f"score takes only score.* (and data.root) overrides, got "
                        f"'{cut(bad[0], 60)}': the model's settings come from the run's config.yaml")
    tree: dict[str, Any] = read_yaml(run_dir / "config.yaml")
    try:
        validate(from_dict(tree, InfusionConfig))  # the saved config alone: damage is named so
    except UserError as exc:
        raise UserError(f"{cut(run_dir / 'config.yaml')} is not a valid infusion config ({exc}); "
                        "restore it or train again") from None
    for text in overrides:
        set_dotted(tree, *parse_override(_list_as_text(text)))
    cfg = from_dict(tree, InfusionConfig)
    validate(cfg)
    return cfg


def check_infusion_run(run_dir: Path) -> None:
    """`run_dir` must be a run of `ssl-lab infusion train` (config.yaml and shape.json); another
    command's run is named as such."""
    if (run_dir / "config.yaml").is_file() and (run_dir / "shape.json").is_file():
        return
    kind = ("it is an SSL run of `ssl-lab train`" if (run_dir / "encoder.json").is_file() else
            "it is an RCDM run" if (run_dir / "rcdm.json").is_file() else
            "no config.yaml and shape.json")
    raise UserError(f"{cut(run_dir)} is not an infusion run ({kind}); pass a directory made by "
                    "`ssl-lab infusion train`")


# ----------------------------------------------------------------------------- sample


@dataclass
class SampleArgs:
    """`infusion sample RUN key=value ...`."""

    n: int = 64  # samples in samples.png
    chains: int = 8  # rows of chain.png: one chain each, z_0 … x̂
    seed: int = 0
    out: str | None = None  # default RUN/samples/n<n>-chains<chains>-seed<seed>
    overwrite: bool = False  # write into an existing, non-empty output folder


SAMPLE_RANGES: dict[str, Range] = {"n": closed(1, 10**4), "chains": closed(1, 1024), "seed": SEED}


def parse_sample_args(overrides: list[str] | tuple[str, ...]) -> SampleArgs:
    """`infusion sample` key=value arguments, typed and checked."""
    tree: dict[str, Any] = {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    args = from_dict(tree, SampleArgs)
    check_sample_args(args)
    return args


def check_sample_args(args: SampleArgs) -> None:
    """Every value is checked before anything is loaded; an explicit out= must be new unless
    overwrite=true."""
    check_text(args, ("out",), "{}")
    check_ranges(args, SAMPLE_RANGES, "{}")
    if args.out is not None and not args.overwrite:
        _check_new_folder(Path(args.out))


def sample_folder(run_dir: Path, args: SampleArgs) -> Path:
    """Where `infusion sample` writes: out=, else RUN/samples/n<n>-chains<chains>-seed<seed>."""
    if args.out is not None:
        return Path(args.out)
    return Path(run_dir) / "samples" / f"n{args.n}-chains{args.chains}-seed{args.seed}"


def _check_new_folder(out: Path) -> None:
    from ssl_lab.gen.rcdm_config import check_new_folder  # one rule for both sample commands

    check_new_folder(out)
