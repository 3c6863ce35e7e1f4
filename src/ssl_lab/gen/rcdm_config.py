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

from ssl_lab.config import SEED, SHARE, STEPS, UNIT, Range, RunConfig, above, check_ranges, check_text, closed
from ssl_lab.config_io import cut, from_dict, load_typed, parse_override, read_yaml, set_dotted, short
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


SIDE = closed(1, 1024)  # a U-Net canvas side in pixels
BIG = 2**24
ETA = closed(0, 1, "DDIM: 0 = deterministic, 1 = DDPM's noise; above 1 the update is undefined")
# Every numeric key's allowed values (finite, and in this range); config_io.check_ranges.
RANGES: dict[str, Range] = {
    "seed": SEED, "data.fraction": SHARE,
    "unet.size": SIDE, "unet.content": closed(0, 1024), "unet.layers_per_block": closed(1, 16),
    "unet.norm_groups": closed(1, 1024),
    "train.epochs": closed(1, 10**6), "train.batch_size": closed(1, BIG), "train.lr": above(0),
    "train.weight_decay": closed(0), "train.warmup_steps": closed(0, 2**31 - 1),
    "train.final_lr_frac": UNIT, "train.ema_decay": Range(0, 1, open_high=True),
    "train.grad_clip": closed(0, why="0 = off"), "train.threads": closed(1, 4096),
    "train.budget_s": above(0), "train.ckpt_every_steps": STEPS, "train.log_every_steps": STEPS,
    "sample.k": closed(1, 1024), "sample.steps": closed(1, rcdm.NUM_TRAIN_TIMESTEPS),
    "sample.eta": ETA, "sample.seed": SEED, "sample.batch_size": closed(1, BIG),
    "score.n": closed(2, 10**6),
}


def validate(cfg: RCDMConfig) -> None:
    """Choices, every numeric key's Range, and the U-Net's channel spec."""
    check_text(cfg, ("encoder", "run.dir"))
    check_ranges(cfg, RANGES)
    if cfg.train.precision not in PRECISIONS:
        raise UserError(f"config key 'train.precision' must be one of {', '.join(PRECISIONS)}, "
                        f"got {short(cfg.train.precision)}")
    if cfg.score.split not in SPLITS:
        raise UserError(f"config key 'score.split' must be train, val or test, got "
                        f"{short(cfg.score.split)}")
    channels = rcdm.parse_channels(cfg.unet.channels)
    if len(channels) > 8 or max(channels) > 8192:  # sized from text: bounded before allocating
        raise UserError(f"config key 'unet.channels' allows at most 8 levels of at most 8192 "
                        f"channels, got {short(cfg.unet.channels)}")


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
    """The saved config of an RCDM run (for sample / score), checked as `rcdm train` checks it."""
    if not (run_dir / "rcdm.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{cut(run_dir)} is not an RCDM run (no rcdm.json/config.yaml); pass a "
                        "directory made by `ssl-lab rcdm train`")
    try:
        cfg = from_dict(read_yaml(run_dir / "config.yaml"), RCDMConfig)
        validate(cfg)
    except UserError as exc:
        raise UserError(f"{cut(run_dir / 'config.yaml')} is damaged ({exc}); restore it from a "
                        "copy or train the RCDM again") from None
    return cfg


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
    overwrite: bool = False  # write into an existing, non-empty output folder


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


# The arguments' ranges: those of the run's sample.* / score.* keys, and their own.
ARG_RANGES: dict[str, Range] = {
    "n": closed(1, 10**4), "k": RANGES["sample.k"], "steps": RANGES["sample.steps"],
    "seed": SEED, "eta": ETA, "batch_size": RANGES["sample.batch_size"],
    "interp": closed(0, 64, "0 = none, else >= 2 points"),
}
SCORE_RANGES = {**{k: v for k, v in ARG_RANGES.items() if k != "interp"},
                "n": RANGES["score.n"], "grid_rows": closed(0, 64)}


def check_args(args: SampleArgs | ScoreArgs) -> None:
    """Every value a user can give is checked here: nothing falls back to a default silently."""
    check_text(args, ("images", "out"), "{}")
    check_ranges(args, SCORE_RANGES if isinstance(args, ScoreArgs) else ARG_RANGES, "{}")
    if args.split is not None and args.split not in SPLITS:
        raise UserError(f"split must be train, val or test, got {short(args.split)}")
    if isinstance(args, ScoreArgs):
        return
    if args.interp == 1:
        raise UserError("interp must be 0 (none) or >= 2 points, got 1")
    if args.images is not None and (args.split is not None or args.n is not None):
        raise UserError("images= and split=/n= exclude each other: sample given images, or n "
                        "held-out images of a split")
    if args.images is not None and not args.images.strip(" ,"):
        raise UserError("images= is empty; pass image paths separated by commas, a directory, "
                        "or a .npy")
    if args.out is not None and not args.overwrite:
        check_new_folder(Path(args.out))


def sample_folder(run_dir: Path, args: SampleArgs, sample: RCDMSampleConfig) -> Path:
    """Where `rcdm sample` writes: out=, else RUN/samples/<what>-k<k>-steps<steps>-seed<seed>
    (<what>: images, or <split>-n<n>) with the run's sample.* for what was not given."""
    if args.out is not None:
        return Path(args.out)
    what = "images" if args.images else f"{args.split or 'test'}-n{args.n or 8}"
    k = sample.k if args.k is None else args.k
    steps = sample.steps if args.steps is None else args.steps
    seed = sample.seed if args.seed is None else args.seed
    return Path(run_dir) / "samples" / f"{what}-k{k}-steps{steps}-seed{seed}"


def check_new_folder(out: Path) -> None:
    """An output folder must be new (or empty) unless overwrite=true is given."""
    try:
        used = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as exc:  # a name too long, a folder that cannot be listed
        raise UserError(f"out={cut(out)} cannot be used ({exc.strerror or exc}); choose another "
                        "out=") from None
    if used:
        raise UserError(f"out={cut(out)} already exists and is not an empty folder; choose a new "
                        "out=, or give overwrite=true to replace its files")
