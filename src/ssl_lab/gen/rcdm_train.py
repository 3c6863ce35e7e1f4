"""`ssl-lab rcdm train`: an RCDM on a frozen encoder's features, through the shared run engine.

The run directory, writer lock, config loading, metrics logger and checkpoints are the
engine's (rundir, config, logger, checkpoint, gen/loop); what is RCDM's own is the model, its
diffusion step and the preview at the end. The run directory holds config.yaml (written
first), rcdm.json (what rebuilds the model: UNet shape, canvas, layer, encoder), env.json,
metrics.jsonl, tensorboard/, checkpoints/ (model + EMA, AdamW, and the GradScaler under fp16;
for random_init also the encoder), summary.json and plots/preview.png. Noise, timesteps and
data order are functions of (seed, step) and (seed, epoch): a resumed run is bit-exact on CPU.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import seeding
from ssl_lab.config_io import short
from ssl_lab.data.splits import DatasetSplits
from ssl_lab.errors import UserError
from ssl_lab.eval.run import extract_features
from ssl_lab.gen import rcdm
from ssl_lab.gen.loop import Cadence, Outcome, run_loop
from ssl_lab.gen.rcdm_build import (
    FEATURE_BATCH,
    Built,
    check_encoder_dir,
    encoder_channels,
    encoder_data,
    make_encoder,
    make_model,
    make_spec,
)
from ssl_lab.gen.rcdm_config import RCDMConfig
from ssl_lab.gen.rcdm_sample import sample_images, save_sample_grid, select_indices
from ssl_lab.models.encoder import Encoder
from ssl_lab.optim import lr_at, set_lr
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import pick_device, precision_name, read_json, resolve_precision, short_path

PREVIEW_IMAGES = 8


@dataclass
class Plan:
    """Everything checked before the run directory is touched (cheap: no data, no features)."""

    cfg: RCDMConfig
    run: RunDir
    device: torch.device
    amp_dtype: torch.dtype | None
    encoder: Encoder
    spec: dict  # rcdm.json


@dataclass
class Setup:
    """A run ready to train: model, EMA, optimizer, scaler, images and their features."""

    plan: Plan
    model: rcdm.RCDM
    ema: rcdm.RCDM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only: small gradients underflow in fp16
    images: torch.Tensor  # uint8 (N, H, W, C) on the device
    feats: torch.Tensor  # h(x) of every training image (N, D) on the device
    test_images: np.ndarray  # for the preview
    cadence: Cadence
    warmup: int

    @property
    def cfg(self) -> RCDMConfig:
        return self.plan.cfg

    def modules(self) -> dict[str, torch.nn.Module]:
        extra = {"encoder": self.plan.encoder} if self.cfg.random_init else {}
        return {"model": self.model, "ema": self.ema} | extra

    def stateful(self) -> dict:
        # a disabled scaler has no state: not saving it lets a resumed run change nothing
        return {"optimizer": self.optimizer,
                "scaler": self.scaler if self.scaler.is_enabled() else None}


def plan_run(cfg: RCDMConfig, backbone: torch.nn.Module | None = None,
             allow_import: bool = False) -> Plan:
    """Validate the inputs (encoder run, layer, canvas, run directory, a resumed run's spec);
    writes nothing."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    amp_dtype = resolve_precision(cfg.train.precision, device)
    enc_spec = check_encoder_dir(cfg.encoder)
    encoder = make_encoder(cfg, enc_spec, backbone, allow_import)
    tag = "random" if cfg.random_init else cfg.layer
    run = RunDir.check(cfg.run.dir, cfg.resume, f"rcdm-{tag}")
    spec = make_spec(cfg, enc_spec, encoder)
    _check_saved_spec(run, spec)
    return Plan(cfg, run, device, amp_dtype, encoder, spec)


def _check_saved_spec(run: RunDir, spec: dict) -> None:
    """A resumed run must see the same encoder weights (e.g. not an encoder trained further
    since): its features are what the model learnt from."""
    path = run.path / "rcdm.json"
    if not run.started or not path.is_file():
        return
    saved = read_json(path, "RCDM spec", "start a new run.dir")
    if not isinstance(saved, dict):
        raise UserError(f"{short_path(path)} is not a JSON object: the RCDM spec is damaged; start "
                        "a new run.dir")
    for key, value in spec.items():
        if saved.get(key) != value:
            raise UserError(f"resume: {key} is {short(saved.get(key))} in {short_path(path)} but "
                            f"{short(value)} now; the encoder run changed since this RCDM was "
                            "trained; start a new run.dir")


def training_data(plan: Plan, data: DatasetSplits | None = None) -> DatasetSplits:
    """The encoder run's data (or `data`), checked before the run directory is made."""
    cfg = plan.cfg
    data = encoder_data(cfg, cfg.data.fraction, data)
    if len(data.train.images) == 0:
        raise UserError(f"data.fraction={cfg.data.fraction} leaves no training image of "
                        f"{plan.spec['dataset']}; raise data.fraction")
    if len(data.test.images) == 0 and cfg.train.preview:
        raise UserError(f"{plan.spec['dataset']} has no test images for the preview; set "
                        "train.preview=false")
    return data


def build(plan: Plan, data: DatasetSplits) -> Setup:
    """Model and features of the checked `data` (the encoder is frozen: h(x) is computed once)."""
    cfg, device = plan.cfg, plan.device
    torch.manual_seed(cfg.seed)
    model = make_model(plan.spec).to(device)
    feats = extract_features(plan.encoder, data.train.images, [cfg.layer], FEATURE_BATCH, device,
                             plan.amp_dtype, desc="features/train")[cfg.layer].to(device)
    model.set_feature_stats(feats)
    model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp_dtype == torch.float16)
    images = torch.from_numpy(encoder_channels(data.train.images, plan.spec["in_channels"]))
    images = images.to(device)
    t = cfg.train
    batch_size = min(t.batch_size, len(images))
    total = len(images) // batch_size * t.epochs
    cadence = Cadence(len(images), batch_size, total, t.log_every_steps, t.ckpt_every_steps,
                      t.budget_s, nan_hint="lower train.lr or use train.precision=fp32")
    # Capped so that short runs (tests, CPU budgets) still reach their peak lr.
    warmup = min(t.warmup_steps, total // 5)
    return Setup(plan, model, ema, optimizer, scaler, images, feats, data.test.images, cadence,
                 warmup)


class RCDMTrainer:
    """RCDM's step for the shared loop: ε-prediction on the canvas, EMA after each update."""

    def __init__(self, s: Setup):
        self.s = s
        self.noise_schedule = rcdm.train_scheduler()

    def train_step(self, step: int, indices: torch.Tensor) -> torch.Tensor:
        s, t = self.s, self.s.cfg.train
        spec = s.plan.spec
        x0 = rcdm.to_canvas(s.images[indices], spec["content"], spec["size"])
        x0 = x0.contiguous(memory_format=torch.channels_last)
        set_lr(s.optimizer, lr_at(step, s.cadence.total_steps, s.warmup, t.lr, t.final_lr_frac))
        # Noise and timesteps are a function of (seed, step): a resumed run replays them exactly.
        gen = seeding.step_generator(s.plan.device, s.cfg.seed, step)
        loss = rcdm.diffusion_loss(s.model, self.noise_schedule, x0, s.feats[indices], gen,
                                   s.plan.amp_dtype)
        s.scaler.scale(loss).backward()  # a disabled scaler (bf16/fp32) changes nothing
        if t.grad_clip > 0:
            s.scaler.unscale_(s.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), t.grad_clip)
        s.scaler.step(s.optimizer)  # fp16: skipped when the gradients overflowed
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        rcdm.ema_update(s.ema, s.model, rcdm.ema_decay_at(step, t.ema_decay))
        return loss.detach()

    def save(self, step: int, train_time: float) -> None:
        ckpt_io.save_training(self.s.plan.run.path, step, self.s.modules(), self.s.stateful(),
                              train_time, epoch=step // self.s.cadence.steps_per_epoch)

    def log_fields(self, step: int, epoch_end: bool) -> dict[str, float]:
        fields = {"lr": self.s.optimizer.param_groups[0]["lr"]}
        if self.s.scaler.is_enabled():
            fields["grad_scale"] = self.s.scaler.get_scale()
        return fields


def train_rcdm(cfg: RCDMConfig, stop_at_step: int | None = None, *,
               backbone: torch.nn.Module | None = None, data: DatasetSplits | None = None,
               allow_import: bool = False) -> Path:
    """Train (or resume) an RCDM run; returns its directory. An encoder run of a wrapped module
    needs its `backbone`, one trained on Python data its `data` (ssl_lab.data). `stop_at_step`
    simulates a crash after that many steps (tests use it): no final checkpoint, no summary."""
    wall_start = time.perf_counter()
    plan = plan_run(cfg, backbone, allow_import)
    data = training_data(plan, data)  # every input checked: only now is the directory made
    created = not plan.run.path.exists()
    try:
        with plan.run.take(cfg.resume):
            s = build(plan, data)
            out = Outcome(0, 0.0)
            if cfg.resume:
                out.step, out.train_time, _ = ckpt_io.restore_training(
                    plan.run.path, s.modules(), s.stateful())
            plan.run.write_start(cfg, "rcdm.json", plan.spec, plan.device, plan.amp_dtype,
                                 s.scaler.is_enabled(), out.step)
            out = run_loop(plan.run, RCDMTrainer(s), s.cadence, cfg.seed, plan.device, out,
                           "rcdm", stop_at_step)
            if not out.interrupted:
                finish(s, out, wall_start)
    except BaseException:  # a Ctrl-C carries the run directory (RunDir.take sets it)
        if created and plan.run.path.is_dir() and not any(plan.run.path.iterdir()):
            plan.run.path.rmdir()  # failed before anything was written: leave no directory
        raise
    return plan.run.path


def finish(s: Setup, out: Outcome, wall_start: float) -> None:
    """summary.json (and plots/preview.png)."""
    cfg, plan = s.cfg, s.plan
    summary = {"layer": cfg.layer, "random_init": cfg.random_init, "encoder": plan.spec["encoder"],
               "dataset": plan.spec["dataset"], "run_name": cfg.run.name,
               "train_images": len(s.feats), "steps": out.step,
               "epochs": out.step / s.cadence.steps_per_epoch, "train_s": out.train_time,
               "final_loss": out.last_record.get("loss"),
               "images_per_s": out.step * s.cadence.batch_size / max(out.train_time, 1e-9),
               "stopped_by_budget": out.stopped_by_budget,
               "precision": precision_name(plan.amp_dtype), "grad_scaler": s.scaler.is_enabled(),
               "threads": torch.get_num_threads()}
    if cfg.train.preview:
        built = Built(cfg, plan.spec, plan.encoder, s.ema, plan.device, plan.amp_dtype)
        test = encoder_channels(s.test_images[select_indices(len(s.test_images), PREVIEW_IMAGES)],
                                plan.spec["in_channels"])
        result = sample_images(built, test, cfg.sample.k, cfg.sample.steps, cfg.sample.seed,
                               cfg.sample.eta, cfg.sample.batch_size)
        summary["preview"] = str(save_sample_grid(result, plan.run.plots / "preview.png"))
    summary["wall_s"] = time.perf_counter() - wall_start
    plan.run.write_json("summary.json", summary)
    print(f"summary: {plan.run.summary}")
