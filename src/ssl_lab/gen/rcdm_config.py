"""RCDM's typed configuration: `rcdm train` (a run's config.yaml) and the `key=value`
arguments of `rcdm sample` and `rcdm score`.

`rcdm train ENCODER_RUN key=value ...` loads through the shared `config_io.load_typed`: with
`run.dir=X resume=true` the run's saved config.yaml is the base, ENCODER_RUN may be left out,
and any given key that differs from the saved one is refused unless it is in
`RESUME_SAFE_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_lab.config import RunConfig
from ssl_lab.config_io import from_dict, load_typed, parse_override, read_yaml, set_dotted
from ssl_lab.errors import UserError
from ssl_lab.gen import rcdm

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SPLITS = ("train", "val", "test")
# May differ from the saved config on resume: none of them changes a training step.
RESUME_SAFE_KEYS = ("train.budget_s", "train.threads", "train.log_every_steps",
                    "train.ckpt_every_steps", "train.preview", "run.name", "sample.*", "score.*")


@dataclass
class UNetConfig:
    size: int = 32  # canvas side: a multiple of 2^(levels-1); 28×28 images are padded to 32
    content: int = 0  # side the images are resized to before padding; 0 = their own size
    channels: str = "32-64-64"  # block_out_channels, one per level (GPU: e.g. 128-256-256-256)
    layers_per_block: int = 1
    attention: bool = False  # self-attention at the lowest resolution
    norm_groups: int = 8


@dataclass
class RCDMTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-4  # AdamW peak lr (not batch-scaled)
    weight_decay: float = 0.0
    warmup_steps: int = 200
    final_lr_frac: float = 0.1  # cosine decay to this fraction of the peak
    ema_decay: float = 0.998  # short CPU runs; long GPU runs want 0.9999
    grad_clip: float = 1.0
    # auto: bf16 where the hardware has it, else fp16 on a CUDA GPU; fp16 is loss-scaled
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    threads: int | None = None
    budget_s: float | None = None  # stop (and checkpoint) after this much training time
    ckpt_every_steps: int = 500
    log_every_steps: int = 50
    preview: bool = True  # a sample grid of 8 test images at the end (plots/preview.png)


@dataclass
class RCDMSampleConfig:
    k: int = 4  # samples per conditioning image
    steps: int = 50  # DDIM steps
    eta: float = 0.0  # DDIM η (0 = deterministic given the start noise)
    seed: int = 0
    batch_size: int = 256


@dataclass
class RCDMScoreConfig:
    n: int = 200  # held-out images: the retrieval gallery and the conditioning set
    split: str = "test"


@dataclass
class RCDMDataConfig:
    fraction: float = 1.0  # seeded subset of the encoder dataset's training split


@dataclass
class RCDMConfig:
    encoder: str = ""  # the encoder run directory (ENCODER_RUN), stored absolute
    layer: str = "backbone"  # stage1.., backbone, proj1..projN
    random_init: bool = False  # baseline: a random-init encoder of the same architecture
    seed: int = 0
    resume: bool = False
    run: RunConfig = field(default_factory=RunConfig)
    data: RCDMDataConfig = field(default_factory=RCDMDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: RCDMTrainConfig = field(default_factory=RCDMTrainConfig)
    sample: RCDMSampleConfig = field(default_factory=RCDMSampleConfig)
    score: RCDMScoreConfig = field(default_factory=RCDMScoreConfig)


def validate(cfg: RCDMConfig) -> None:
    t, s = cfg.train, cfg.sample
    checks = [(t.epochs > 0, "train.epochs must be > 0"),
              (t.batch_size > 0, "train.batch_size must be > 0"),
              (t.lr > 0, "train.lr must be > 0"),
              (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
              (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
              (t.ckpt_every_steps > 0, "train.ckpt_every_steps must be > 0"),
              (t.log_every_steps > 0, "train.log_every_steps must be > 0"),
              (t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}"),
              (t.budget_s is None or t.budget_s > 0, "train.budget_s must be > 0 or null"),
              (t.threads is None or t.threads > 0, "train.threads must be > 0 or null"),
              (0 < cfg.data.fraction <= 1, "data.fraction must be in (0, 1]"),
              (min(s.k, s.steps, s.batch_size) >= 1, "sample.k/steps/batch_size must be >= 1"),
              (s.steps <= rcdm.NUM_TRAIN_TIMESTEPS, "sample.steps must be <= 1000"),
              (s.eta >= 0, "sample.eta must be >= 0"),
              (cfg.score.n >= 2, "score.n must be >= 2"),
              (cfg.score.split in SPLITS, "score.split must be train, val or test"),
              (cfg.unet.size > 0 and cfg.unet.content >= 0,
               "unet.size must be > 0 and unet.content >= 0"),
              (cfg.unet.layers_per_block >= 1, "unet.layers_per_block must be >= 1"),
              (cfg.unet.norm_groups >= 1, "unet.norm_groups must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{message} (check the rcdm config)")
    rcdm.parse_channels(cfg.unet.channels)


def load_train_config(encoder_run: str | None, overrides: list[str] | tuple[str, ...] = ()
                      ) -> RCDMConfig:
    """`rcdm train [ENCODER_RUN] key=value ...` as a validated config. ENCODER_RUN (or
    `encoder=`) is stored absolute, so `sample`/`score` find it from any directory; on resume
    it may be left out, and a different one is refused."""
    overrides = list(overrides)
    given = [o for o in overrides if o.split("=", 1)[0].strip() == "encoder"]
    if given and encoder_run or len(given) > 1:
        raise UserError("give the encoder run once: as ENCODER_RUN or as encoder=, not both")
    if given:
        overrides.remove(given[0])
        encoder_run = str(parse_override(given[0])[1] or "")
    base = {"encoder": str(Path(encoder_run).resolve())} if encoder_run else None
    if base:
        _check_same_encoder(base["encoder"], overrides)
    return load_typed(RCDMConfig, None, overrides, RESUME_SAFE_KEYS, validate, base=base)


def _check_same_encoder(encoder: str, overrides: list[str]) -> None:
    """A resumed RCDM must keep its encoder: its features are what the model learnt from."""
    tree: dict[str, Any] = {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    probe = from_dict(tree, RCDMConfig)  # typed first: a typo is reported as such
    saved = Path(probe.run.dir) / "config.yaml" if probe.resume and probe.run.dir else None
    if saved is None or not saved.is_file():
        return
    stored = read_yaml(saved).get("encoder")
    if stored != encoder:
        raise UserError(f"resume: {probe.run.dir} was trained on encoder {stored}, not "
                        f"{encoder}; resume without ENCODER_RUN (or with the same one), or start "
                        "a new run.dir")


def read_run_config(run_dir: Path) -> RCDMConfig:
    """The saved config of an RCDM run (for sample / score)."""
    if not (run_dir / "rcdm.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not an RCDM run (no rcdm.json/config.yaml); pass a "
                        "directory made by `ssl-lab rcdm train`")
    return from_dict(read_yaml(run_dir / "config.yaml"), RCDMConfig)


# ----------------------------------------------------------------------------- sample / score


@dataclass
class SampleArgs:
    """`rcdm sample RUN key=value ...`; None = the run's sample.* setting."""

    images: str | None = None  # files / directory / .npy; otherwise split + n
    split: str | None = None  # default test
    n: int | None = None  # default 8
    k: int | None = None
    steps: int | None = None
    seed: int | None = None
    eta: float | None = None
    interp: int = 8  # points between the first two images' representations; 0 = none
    out: str | None = None  # default RUN/samples/<settings>
    batch_size: int | None = None


@dataclass
class ScoreArgs:
    """`rcdm score RUN key=value ...`; None = the run's score.* / sample.* setting."""

    n: int | None = None
    split: str | None = None
    k: int | None = None
    steps: int | None = None
    seed: int | None = None
    eta: float | None = None
    batch_size: int | None = None
    grid_rows: int = 8


def parse_args(cls: type, overrides: list[str] | tuple[str, ...]) -> Any:
    """key=value arguments typed against `cls` (unknown keys get a suggestion), then checked."""
    tree: dict[str, Any] = {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    args = from_dict(tree, cls)
    check_args(args)
    return args


def check_args(args: SampleArgs | ScoreArgs) -> None:
    """Every value a user can give is checked here: nothing falls back to a default silently."""
    at_least = {"k": 1, "steps": 1, "batch_size": 1, "n": 2 if isinstance(args, ScoreArgs) else 1}
    for key, low in at_least.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise UserError(f"{key} must be >= {low}, got {value}")
    if args.steps is not None and args.steps > rcdm.NUM_TRAIN_TIMESTEPS:
        raise UserError(f"steps must be <= {rcdm.NUM_TRAIN_TIMESTEPS}, got {args.steps}")
    if args.eta is not None and args.eta < 0:
        raise UserError(f"eta must be >= 0, got {args.eta}")
    if args.split is not None and args.split not in SPLITS:
        raise UserError(f"split must be train, val or test, got {args.split!r}")
    if isinstance(args, ScoreArgs):
        if args.grid_rows < 0:
            raise UserError(f"grid_rows must be >= 0, got {args.grid_rows}")
        return
    if args.interp < 0 or args.interp == 1:
        raise UserError(f"interp must be 0 (none) or >= 2 points, got {args.interp}")
    if args.images is not None and (args.split is not None or args.n is not None):
        raise UserError("images= and split=/n= exclude each other: sample given images, or n "
                        "held-out images of a split")
    if args.out is not None:
        check_new_folder(Path(args.out))


def check_new_folder(out: Path) -> None:
    """An explicit out= must not overwrite anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} already exists and is not an empty folder; choose a new "
                        "out= (nothing is overwritten)")
