"""`ssl-lab rcdm train | sample | score`: config, run directory, training loop and commands.

An RCDM run directory mirrors an encoder run: config.yaml (re-runnable), rcdm.json (what is
needed to rebuild the model: UNet shape, canvas, layer, encoder), env.json, metrics.jsonl,
tensorboard/, checkpoints/ (model + EMA weights, resumable bit-for-bit like `ssl-lab train`),
summary.json, plots/preview.png; `sample` writes samples/<name>/, `score` writes score.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import runtime
from ssl_lab.config import RunConfig, from_dict, parse_override, read_yaml, set_dotted
from ssl_lab.config import load_config as load_encoder_config
from ssl_lab.data.loader import epoch_permutation
from ssl_lab.errors import UserError
from ssl_lab.eval.run import encoder_from_spec, extract_features, load_encoder, read_spec
from ssl_lab.gen import rcdm
from ssl_lab.methods import Encoder
from ssl_lab.optim import lr_at, set_lr
from ssl_lab.runtime import env_info, pick_device, resolve_precision, write_text_atomic
from ssl_lab.train import step_generator

FEATURE_BATCH = 512
SELECT_SEED = 0  # which held-out images `split=... n=...` shows: fixed, so sample and score agree


# ----------------------------------------------------------------------------- config


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
    precision: str = "auto"  # auto (bf16 on CPUs that have it: ~2× here) | bf16 | fp16 | fp32
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
    encoder: str = ""  # the encoder run directory (ENCODER_RUN)
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


def parse_typed(cls: type, tree: dict[str, Any], overrides: list[str]) -> Any:
    """`key=value` overrides onto `tree`, then typed and checked against `cls` (config.from_dict:
    unknown keys get the closest valid one suggested; YAML's `1e-3` is read as a float)."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return from_dict(tree, cls)


def validate(cfg: RCDMConfig) -> None:
    t, s = cfg.train, cfg.sample
    checks = [(t.epochs > 0, "train.epochs must be > 0"),
              (t.batch_size > 0, "train.batch_size must be > 0"),
              (t.lr > 0, "train.lr must be > 0"),
              (0 <= t.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
              (t.ckpt_every_steps > 0, "train.ckpt_every_steps must be > 0"),
              (t.log_every_steps > 0, "train.log_every_steps must be > 0"),
              (t.precision in ("auto", "bf16", "fp16", "fp32"),
               "train.precision must be one of auto, bf16, fp16, fp32"),
              (t.budget_s is None or t.budget_s > 0, "train.budget_s must be > 0 or null"),
              (0 < cfg.data.fraction <= 1, "data.fraction must be in (0, 1]"),
              (min(s.k, s.steps, s.batch_size) >= 1, "sample.k/steps/batch_size must be >= 1"),
              (cfg.score.n >= 2, "score.n must be >= 2"),
              (cfg.unet.size > 0 and cfg.unet.content >= 0,
               "unet.size must be > 0 and unet.content >= 0"),
              (cfg.unet.layers_per_block >= 1, "unet.layers_per_block must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{message} (check the rcdm config)")
    rcdm.parse_channels(cfg.unet.channels)


def save_rcdm_config(cfg: RCDMConfig, path: Path) -> None:
    import dataclasses

    import yaml

    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- building


@dataclass
class Built:
    """Everything `train`, `sample` and `score` share: the frozen encoder, the model, the canvas."""

    cfg: RCDMConfig
    spec: dict  # rcdm.json
    encoder: Encoder
    model: rcdm.RCDM
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.spec["in_channels"], self.spec["size"], self.spec["size"])

    @property
    def content(self) -> int:
        return self.spec["content"]


def make_encoder(cfg: RCDMConfig, enc_spec: dict) -> Encoder:
    if cfg.random_init:
        encoder = encoder_from_spec(enc_spec, seed=cfg.seed).eval()
    else:
        encoder = load_encoder(Path(cfg.encoder))
    if cfg.layer not in encoder.feature_dims:
        raise UserError(f"layer={cfg.layer!r} is not a layer of this encoder; choose one of "
                        f"{', '.join(encoder.layer_names)}")
    return encoder.requires_grad_(False)


def make_spec(cfg: RCDMConfig, enc_spec: dict, encoder: Encoder) -> dict:
    content = cfg.unet.content or enc_spec["image_size"]
    if content > cfg.unet.size:
        raise UserError(f"unet.content={content} does not fit in unet.size={cfg.unet.size}; raise "
                        "unet.size or set unet.content smaller")
    found = None if cfg.random_init else ckpt_io.find_checkpoint(Path(cfg.encoder))
    return {"encoder": str(Path(cfg.encoder).resolve()), "encoder_checkpoint": str(found) if found
            else None, "layer": cfg.layer, "random_init": cfg.random_init, "seed": cfg.seed,
            "feature_dim": encoder.feature_dims[cfg.layer], "in_channels": enc_spec["in_chans"],
            "size": cfg.unet.size, "content": content, "channels": list(rcdm.parse_channels(
                cfg.unet.channels)), "layers_per_block": cfg.unet.layers_per_block,
            "attention": cfg.unet.attention, "norm_groups": cfg.unet.norm_groups,
            "dataset": enc_spec["dataset"]}


def make_model(spec: dict) -> rcdm.RCDM:
    unet = rcdm.build_unet(spec["size"], spec["in_channels"], spec["channels"],
                           spec["layers_per_block"], spec["attention"], spec["norm_groups"])
    return rcdm.RCDM(unet, spec["feature_dim"])


def encoder_data(cfg: RCDMConfig, fraction: float = 1.0):
    """The encoder's dataset, split exactly as the encoder run split it."""
    from ssl_lab.data.sources import load_dataset

    enc_cfg = load_encoder_config(Path(cfg.encoder) / "config.yaml")
    data = load_dataset(enc_cfg.data.name, enc_cfg.data.root,
                        val_fraction=enc_cfg.data.val_fraction, seed=enc_cfg.seed,
                        fraction=fraction)
    return data.select_target(enc_cfg.data.target)


def check_encoder_dir(path: str) -> Path:
    enc_dir = Path(path)
    if not path or not enc_dir.is_dir():
        raise UserError(f"encoder run {path!r} does not exist; pass a directory made by "
                        "`ssl-lab train` as ENCODER_RUN")
    read_spec(enc_dir)  # a clear error when it is not a run directory
    return enc_dir


def load_run(run_dir: Path) -> Built:
    """A trained RCDM run for sampling/scoring: the EMA weights and its encoder."""
    run_dir = Path(run_dir)
    if not (run_dir / "rcdm.json").is_file():
        raise UserError(f"{run_dir} is not an RCDM run (no rcdm.json); pass a directory made by "
                        "`ssl-lab rcdm train`")
    cfg = parse_typed(RCDMConfig, read_yaml(run_dir / "config.yaml"), [])
    spec = json.loads((run_dir / "rcdm.json").read_text())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_encoder_dir(cfg.encoder)
    encoder = make_encoder(cfg, read_spec(Path(cfg.encoder)))
    model = make_model(spec)
    found = ckpt_io.find_checkpoint(run_dir)
    if found is None:
        raise UserError(f"no complete checkpoint in {run_dir}/checkpoints; train it first")
    modules = {"ema": model} | ({"encoder": encoder} if cfg.random_init else {})
    ckpt_io.load_weights(found, modules)
    device = pick_device()
    return Built(cfg, spec, encoder.eval(), model.to(device).eval(), device,
                 resolve_precision(cfg.train.precision, device))


# ----------------------------------------------------------------------------- training


def prepare_run_dir(cfg: RCDMConfig) -> Path:
    tag = "random" if cfg.random_init else cfg.layer
    if cfg.resume and cfg.run.dir and not Path(cfg.run.dir, "config.yaml").is_file():
        return Path(cfg.run.dir)  # resume=true on a run not started yet starts it (see docs)
    return runtime.prepare_run_dir(cfg.run.dir, cfg.resume, f"rcdm-{tag}")


def train_config(encoder_run: str, overrides: list[str]) -> RCDMConfig:
    """Defaults ← (on resume) the run's config.yaml ← key=value; ENCODER_RUN sets `encoder`."""
    tree: dict[str, Any] = {}
    probe = parse_typed(RCDMConfig, {}, overrides)
    if probe.resume and probe.run.dir and (Path(probe.run.dir) / "config.yaml").is_file():
        tree = read_yaml(Path(probe.run.dir) / "config.yaml")
        stored = Path(tree.get("encoder", "")).resolve()
        if encoder_run and Path(encoder_run).resolve() != stored:
            raise UserError(f"{probe.run.dir} was trained on encoder {stored}, not {encoder_run}; "
                            "resume with the same ENCODER_RUN")
    # Absolute, so `sample`/`score` find the encoder from any working directory.
    encoder = encoder_run or tree.get("encoder", "")
    tree["encoder"] = str(Path(encoder).resolve()) if encoder else ""
    cfg = parse_typed(RCDMConfig, tree, overrides)
    validate(cfg)
    return cfg


def _modules(cfg: RCDMConfig, model, ema, encoder) -> dict[str, torch.nn.Module]:
    return {"model": model, "ema": ema} | ({"encoder": encoder} if cfg.random_init else {})


def train_rcdm(cfg: RCDMConfig, stop_at_step: int | None = None) -> Path:
    """Train (or resume) an RCDM run; returns its directory. `stop_at_step` simulates a crash."""
    wall_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    amp_dtype = resolve_precision(cfg.train.precision, device)
    enc_spec = read_spec(check_encoder_dir(cfg.encoder))
    encoder = make_encoder(cfg, enc_spec)
    run_dir = prepare_run_dir(cfg)
    spec = make_spec(cfg, enc_spec, encoder)
    data = encoder_data(cfg, cfg.data.fraction)
    torch.manual_seed(cfg.seed)
    model = make_model(spec).to(device)
    # Features once: the encoder is frozen and RCDM conditions on h(x) of the very image x.
    feats = extract_features(encoder, data.train.images, [cfg.layer], FEATURE_BATCH, device,
                             amp_dtype, desc="features/train")[cfg.layer].to(device)
    model.set_feature_stats(feats)
    model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    modules = _modules(cfg, model, ema, encoder)
    step, train_time = 0, 0.0
    found = ckpt_io.find_checkpoint(run_dir) if cfg.resume else None
    if found is not None:
        ckpt_io.load_weights(found, modules)
        state = ckpt_io.load_state(found)
        optimizer.load_state_dict(state["optimizer"])
        step, train_time = int(state["step"]), float(state["train_time_s"])
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: every input has been validated
    if step == 0:
        save_rcdm_config(cfg, run_dir / "config.yaml")
        (run_dir / "rcdm.json").write_text(json.dumps(spec, indent=1))
    (run_dir / "env.json").write_text(json.dumps(env_info(device), indent=1))
    loop = Loop(cfg, run_dir, device, amp_dtype, model, ema, optimizer, modules,
                torch.from_numpy(np.asarray(data.train.images)).to(device), feats, spec)
    step, train_time, last_loss, stopped = loop.run(step, train_time, stop_at_step)
    if stop_at_step is not None and step >= stop_at_step:
        return run_dir
    summary = {"layer": cfg.layer, "random_init": cfg.random_init, "encoder": spec["encoder"],
               "dataset": spec["dataset"], "train_images": len(feats), "steps": step,
               "epochs": step / loop.steps_per_epoch, "train_s": train_time,
               "final_loss": last_loss,
               "images_per_s": step * loop.batch_size / max(train_time, 1e-9),
               "stopped_by_budget": stopped, "precision": str(amp_dtype),
               "threads": torch.get_num_threads()}
    if cfg.train.preview:
        built = Built(cfg, spec, encoder, ema, device, amp_dtype)
        test = data.test.images[select_indices(len(data.test.images), 8)]
        result = sample_images(built, test, cfg.sample.k, cfg.sample.steps, cfg.sample.seed,
                               cfg.sample.eta)
        summary["preview"] = str(save_sample_grid(result, run_dir / "plots" / "preview.png"))
    summary["wall_s"] = time.perf_counter() - wall_start
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"summary: {run_dir / 'summary.json'}")
    return run_dir


@dataclass
class Loop:
    cfg: RCDMConfig
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    model: rcdm.RCDM
    ema: rcdm.RCDM
    optimizer: torch.optim.Optimizer
    modules: dict
    images: torch.Tensor  # uint8 (N, H, W, C) on the device
    feats: torch.Tensor  # (N, D)
    spec: dict

    def __post_init__(self) -> None:
        self.batch_size = min(self.cfg.train.batch_size, len(self.images))
        self.steps_per_epoch = len(self.images) // self.batch_size
        self.total_steps = self.steps_per_epoch * self.cfg.train.epochs
        # Capped so that short runs (tests, CPU budgets) still reach their peak lr.
        self.warmup = min(self.cfg.train.warmup_steps, self.total_steps // 5)
        self.scheduler = rcdm.train_scheduler()

    def save(self, step: int, train_time: float) -> None:
        state = {"step": step, "epoch": step // self.steps_per_epoch, "train_time_s": train_time,
                 "optimizer": self.optimizer.state_dict()}
        ckpt_io.save_checkpoint(self.run_dir, step, self.modules, state)

    def batch(self, step: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = step % self.steps_per_epoch
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
        x0 = rcdm.to_canvas(self.images[idx], self.spec["content"], self.spec["size"])
        return x0.contiguous(memory_format=torch.channels_last), self.feats[idx]

    def step(self, step: int, perm: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        x0, h = self.batch(step, perm)
        set_lr(self.optimizer, lr_at(step, self.total_steps, self.warmup, t.lr, t.final_lr_frac))
        # Noise and timesteps are a function of (seed, step): a resumed run replays them exactly.
        gen = step_generator(self.device, self.cfg.seed, step)
        loss = rcdm.diffusion_loss(self.model, self.scheduler, x0, h, gen, self.amp_dtype)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rcdm.ema_update(self.ema, self.model, rcdm.ema_decay_at(step, t.ema_decay))
        return loss.detach()

    def run(self, step: int, train_time: float, stop_at_step: int | None
            ) -> tuple[int, float, float, bool]:
        t = self.cfg.train
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed in finally)
        bar = tqdm(total=self.total_steps, initial=step, desc="rcdm", unit="step",
                   dynamic_ncols=True)
        perm, perm_epoch, last_saved, stopped = None, -1, step, False
        loss_sum, window, window_start, mean_loss = 0.0, 0, time.perf_counter(), float("nan")
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                epoch = step // self.steps_per_epoch
                if epoch != perm_epoch:
                    perm = epoch_permutation(len(self.images), self.cfg.seed, epoch).to(self.device)
                    perm_epoch = epoch
                loss_sum += self.step(step, perm).item()
                step, window = step + 1, window + 1
                train_time += time.perf_counter() - t0
                bar.update(1)
                over_budget = t.budget_s is not None and train_time >= t.budget_s
                if step % t.log_every_steps == 0 or step == self.total_steps or over_budget:
                    mean_loss = loss_sum / window
                    if not np.isfinite(mean_loss):
                        raise UserError(f"RCDM loss became NaN/inf by step {step}; lower train.lr "
                                        "or use train.precision=fp32")
                    rate = window * self.batch_size / (time.perf_counter() - window_start)
                    record = {"step": step, "epoch": step / self.steps_per_epoch, "loss": mean_loss,
                              "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": rate}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(key, value, step)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
                    loss_sum, window, window_start = 0.0, 0, time.perf_counter()
                if stop_at_step is not None and step >= stop_at_step:
                    return step, train_time, mean_loss, False
                if step % t.ckpt_every_steps == 0 or over_budget:
                    self.save(step, train_time)
                    last_saved = step
                if over_budget:
                    stopped = True
                    tqdm.write(f"train.budget_s={t.budget_s} reached at step {step}")
                    break
            if last_saved != step:
                self.save(step, train_time)
        finally:
            bar.close()
            metrics.close()
            writer.close()
        return step, train_time, mean_loss, stopped


# ----------------------------------------------------------------------------- sampling


def select_indices(n_total: int, n: int) -> np.ndarray:
    """The first n of a fixed permutation: a class-mixed subset, the same for sample and score."""
    perm = np.random.default_rng(SELECT_SEED).permutation(n_total)
    return np.sort(perm[:min(n, n_total)])


def render(built: Built, images: np.ndarray) -> np.ndarray:
    """Images as the generator's canvas shows them (resized to `content`), uint8 NHWC."""
    x = rcdm.to_canvas(torch.from_numpy(images), built.content, built.spec["size"])
    return rcdm.from_canvas(x, built.content).numpy()


def features(built: Built, images: np.ndarray, desc: str = "features") -> torch.Tensor:
    layer = built.spec["layer"]
    return extract_features(built.encoder, images, [layer], FEATURE_BATCH, built.device,
                            built.amp_dtype, desc=desc)[layer]


def sample_images(built: Built, images: np.ndarray, k: int, steps: int, seed: int, eta: float = 0.0,
                  batch_size: int = 256) -> dict[str, np.ndarray]:
    """k samples for each uint8 image: {'conditioning', 'samples' (N, k, c, c, C), 'features'}."""
    h = features(built, images).to(built.device)
    out = rcdm.sample_k(built.model, h, k, built.shape, steps, seed, eta, built.amp_dtype,
                        batch_size)
    return {"conditioning": render(built, images), "features": h.cpu().numpy(),
            "samples": rcdm.from_canvas(out, built.content).numpy()}


def save_sample_grid(result: dict[str, np.ndarray], path: Path, rows: int | None = None) -> Path:
    cond, samples = result["conditioning"], result["samples"]
    n = len(cond) if rows is None else min(rows, len(cond))
    return rcdm.save_grid([[cond[i], *samples[i]] for i in range(n)], path)


def interpolation(built: Built, a: np.ndarray, b: np.ndarray, points: int, k: int, steps: int,
                  seed: int, eta: float, path: Path) -> tuple[Path, np.ndarray]:
    h = features(built, np.stack([a, b])).to(built.device)
    out = rcdm.interpolate(built.model, h[0], h[1], points, k, built.shape, steps, seed, eta,
                           built.amp_dtype)
    tiles = rcdm.from_canvas(out, built.content).numpy()  # (k, points, c, c, C)
    ends = render(built, np.stack([a, b]))
    rows = [[ends[0], *tiles[j], ends[1]] for j in range(k)]
    grid = rcdm.save_grid(rows, path, gap_after=None)
    return grid, tiles


def load_images(spec: str, in_chans: int, size: int) -> np.ndarray:
    """`images=` : comma-separated image files, a directory of them, or a uint8 .npy
    (N, H, W[, C]); returned as uint8 (N, size, size, in_chans) for the encoder."""
    from PIL import Image

    paths = [Path(p) for p in spec.split(",") if p]
    if len(paths) == 1 and paths[0].suffix == ".npy":
        arr = np.load(paths[0], allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
            raise UserError(f"{paths[0]} must hold uint8 images (N, H, W[, C]), got {arr.dtype} "
                            f"{arr.shape}")
        return arr if arr.ndim == 4 else arr[..., None]
    if len(paths) == 1 and paths[0].is_dir():
        paths = sorted(p for p in paths[0].iterdir()
                       if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise UserError(f"images={spec!r}: no such image file(s) {missing[:3]}; pass image paths "
                        "separated by commas, a directory, or a .npy")
    mode = "L" if in_chans == 1 else "RGB"
    out = []
    for p in paths:
        try:
            img = Image.open(p).convert(mode).resize((size, size), Image.BILINEAR)
        except OSError as exc:
            raise UserError(f"cannot read image {p} ({exc})") from None
        arr = np.asarray(img, dtype=np.uint8)
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(out)


@dataclass
class SampleArgs:
    images: str | None = None  # files / directory / .npy; otherwise split + n
    split: str = "test"
    n: int = 8
    k: int | None = None  # None: the run's sample.* settings
    steps: int | None = None
    seed: int | None = None
    eta: float | None = None
    interp: int = 8  # points between the first two images' representations; 0 = none
    out: str | None = None
    batch_size: int = 256


def held_out(built: Built, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "val", "test"):
        raise UserError(f"split must be train, val or test, got {split!r}")
    data = encoder_data(built.cfg)
    images = getattr(data, split).images
    idx = select_indices(len(images), n)
    return images[idx], idx


def sample_command(run_dir: Path, args: SampleArgs) -> dict[str, Path]:
    built = load_run(run_dir)
    s = built.cfg.sample
    k, steps = args.k or s.k, args.steps or s.steps
    seed = s.seed if args.seed is None else args.seed
    eta = s.eta if args.eta is None else args.eta
    if args.images:
        enc = read_spec(Path(built.cfg.encoder))
        images, idx = load_images(args.images, enc["in_chans"], enc["image_size"]), None
        tag = "images"
    else:
        (images, idx), tag = held_out(built, args.split, args.n), f"{args.split}-n{args.n}"
    name = f"{tag}-k{k}-steps{steps}-seed{seed}"
    out = Path(args.out) if args.out else run_dir / "samples" / name
    result = sample_images(built, images, k, steps, seed, eta, args.batch_size)
    paths = {"grid": save_sample_grid(result, out / "grid.png")}
    arrays = dict(result)
    if args.interp >= 2 and len(images) >= 2:
        paths["interp"], arrays["interp"] = interpolation(built, images[0], images[1], args.interp,
                                                           k, steps, seed, eta, out / "interp.png")
    if idx is not None:
        arrays["indices"] = idx
    meta = {"k": k, "steps": steps, "seed": seed, "eta": eta, "layer": built.spec["layer"]}
    paths["arrays"] = save_npz(out / "samples.npz", arrays, meta)
    return paths


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoreArgs:
    n: int | None = None  # None: the run's score.* / sample.* settings
    split: str | None = None
    k: int | None = None
    steps: int | None = None
    seed: int | None = None
    eta: float | None = None
    batch_size: int = 256
    grid_rows: int = 8


def pixel_vectors(images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
    """Pixels minus the gallery's mean image: cosine on raw pixels would otherwise be dominated
    by what every image shares (the black background)."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    return torch.from_numpy(x - mean)


def score_command(run_dir: Path, args: ScoreArgs) -> dict:
    """Faithfulness by retrieval and diversity on n held-out images; writes score.json."""
    start = time.perf_counter()
    built = load_run(run_dir)
    s, sc = built.cfg.sample, built.cfg.score
    n, split = args.n or sc.n, args.split or sc.split
    k, steps = args.k or s.k, args.steps or s.steps
    seed = s.seed if args.seed is None else args.seed
    eta = s.eta if args.eta is None else args.eta
    if n < 2:
        raise UserError(f"n must be >= 2 for retrieval, got {n}")
    images, idx = held_out(built, split, n)
    n = len(images)
    result = sample_images(built, images, k, steps, seed, eta, args.batch_size)
    samples = result["samples"]  # (n, k, c, c, C) uint8
    flat = samples.reshape(n * k, *samples.shape[2:])
    query = features(built, flat, desc="features/samples")
    # The gallery is the held-out images as the generator's canvas renders them: at a reduced
    # `content` resolution a sample cannot be sharper than that, and must not be ranked against it.
    gallery = features(built, result["conditioning"], desc="features/gallery")
    target = torch.arange(n).repeat_interleave(k)
    mean_img = result["conditioning"].reshape(n, -1).astype(np.float32).mean(0) / 255
    pix_ranks = rcdm.retrieval_ranks(pixel_vectors(flat, mean_img),
                                     pixel_vectors(result["conditioning"], mean_img), target)
    div = rcdm.diversity(torch.from_numpy(samples))
    data_std = rcdm.diversity(torch.from_numpy(result["conditioning"])[None]).item()
    report = {"layer": built.spec["layer"], "random_init": built.spec["random_init"],
              "encoder": built.spec["encoder"], "split": split, "k": k, "steps": steps,
              "seed": seed, "eta": eta,
              "retrieval": rcdm.retrieval_report(rcdm.retrieval_ranks(query, gallery, target), n),
              "retrieval_pixels": rcdm.retrieval_report(pix_ranks, n),
              "diversity": {"mean": div.mean().item(), "median": div.median().item()},
              "data_pixel_std": data_std}
    out = run_dir / "score"
    save_sample_grid(result, out / "grid.png", rows=args.grid_rows)
    meta = {key: value for key, value in report.items() if not isinstance(value, dict)}
    save_npz(out / "samples.npz", {**result, "indices": idx, "diversity": div.numpy()}, meta)
    report["score_s"] = time.perf_counter() - start
    write_text_atomic(run_dir / "score.json", json.dumps(report, indent=1))
    return report


def format_score(report: dict) -> str:
    r, p = report["retrieval"], report["retrieval_pixels"]
    return "\n".join([
        f"retrieval in {report['layer']} space (N={r['n']}, {r['queries']} samples): mean rank "
        f"{r['mean_rank']:.1f} (chance {r['chance_mean_rank']:.1f}), "
        f"median {r['median_rank']:.1f}, "
        f"top-1 {100 * r['top1']:.1f}% (chance {100 * r['chance_top1']:.1f}%), top-5 "
        f"{100 * r['top5']:.1f}% (chance {100 * r['chance_top5']:.1f}%)",
        f"retrieval in pixel space: mean rank {p['mean_rank']:.1f}, top-1 {100 * p['top1']:.1f}%",
        f"diversity (pixel std across k={report['k']} samples): {report['diversity']['mean']:.4f} "
        f"(std across different images: {report['data_pixel_std']:.4f})"])


# ----------------------------------------------------------------------------- CLI


def cmd_train(ns: argparse.Namespace) -> None:
    train_rcdm(train_config(ns.encoder_run, ns.overrides))


def cmd_sample(ns: argparse.Namespace) -> None:
    run_dir = runtime.existing_run_dir(ns.run_dir, "ssl-lab rcdm train")
    paths = sample_command(run_dir, parse_typed(SampleArgs, {}, ns.overrides))
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_score(ns: argparse.Namespace) -> None:
    run_dir = runtime.existing_run_dir(ns.run_dir, "ssl-lab rcdm train")
    report = score_command(run_dir, parse_typed(ScoreArgs, {}, ns.overrides))
    print(format_score(report))
    print(f"score: {run_dir / 'score.json'}")


def add_commands(sub) -> None:
    """Add `rcdm {train,sample,score}` to an argparse subparsers object."""
    parser = sub.add_parser("rcdm", help="diffusion model conditioned on a frozen representation "
                                         "(RCDM): train, sample, score")
    rsub = parser.add_subparsers(dest="rcdm_command", required=True)
    p = rsub.add_parser("train", help="train a diffusion model on an encoder's features")
    p.add_argument("encoder_run", help="encoder run directory (made by `ssl-lab train`)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. layer=proj2 train.epochs=5 "
                   "unet.channels=64-128-128 run.dir=... resume=true")
    p.set_defaults(func=cmd_train)
    p = rsub.add_parser("sample", help="k samples per conditioning image, as a grid and arrays")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="images=a.png,b.png | split=test n=8; k= steps= "
                   "seed= eta= interp= out=")
    p.set_defaults(func=cmd_sample)
    p = rsub.add_parser("score", help="faithfulness by retrieval and diversity -> score.json")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="n= split= k= steps= seed= eta=")
    p.set_defaults(func=cmd_score)
