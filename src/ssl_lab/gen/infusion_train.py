"""`ssl-lab infusion train`: infusion training through the shared run engine.

The run directory, writer lock, config loading, metrics logger and checkpoints are the
engine's (rundir, config, logger, checkpoint, gen/loop); what is infusion's own is the model
(operator + prior), its step and the per-epoch lower bound on validation images. A run holds
config.yaml (written first), shape.json, env.json, metrics.jsonl (loss, the NLL of the first
and last transitions, and at each epoch end `val_bound` / `val_bound_infusion`),
tensorboard/, checkpoints/ (operator + prior, Adam state) and summary.json. Each batch's masks
and noise come from (seed, step), each epoch's order from (seed, epoch): a resumed run ends
with the same weights, bit for bit, as a run that was never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import seeding
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import InfusionConfig
from ssl_lab.gen.infusion_model import Model, build_model, generator, load_data, to_pixels
from ssl_lab.gen.loop import Cadence, Outcome, run_loop
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import pick_device

MONITOR_SEED_OFFSET = 7  # the monitor's draws: fixed per run, apart from the training draws
MONITOR_SAMPLES = 4  # K of the per-epoch bound
MONITOR_STD = 0.02  # s of its infusion proposal


@dataclass
class Setup:
    cfg: InfusionConfig
    run: RunDir
    device: torch.device
    model: Model
    optimizer: torch.optim.Optimizer
    train_x: torch.Tensor  # every training image as pixels, on the device
    monitor_x: torch.Tensor  # the val images of the per-epoch bound
    weights: torch.Tensor  # w_t
    cadence: Cadence
    shape: tuple[int, int, int]


def build(cfg: InfusionConfig, run: RunDir, device: torch.device) -> Setup:
    """Data, model (the prior fitted to the training images) and optimizer; writes nothing."""
    data = load_data(cfg)
    train_x = to_pixels(data.train.images, device)
    shape = tuple(train_x.shape[1:])
    model = build_model(cfg, shape, device)
    model.prior.fit(train_x)
    optimizer = torch.optim.Adam(model.operator.parameters(), lr=cfg.optim.lr)
    batch_size = min(cfg.optim.batch_size, len(train_x))
    # batch norm needs > 1 row per step; the last partial batch is dropped (an epoch permutes)
    if batch_size < 2:
        raise UserError(f"{cfg.data.name} has {len(train_x)} training images; infusion training "
                        "needs at least 2 (raise data.fraction)")
    t = cfg.train
    cadence = Cadence(len(train_x), batch_size, len(train_x) // batch_size * t.epochs,
                      t.log_every_steps, t.ckpt_every_steps, t.budget_s, nan_hint="lower optim.lr")
    monitor_x = to_pixels(data.val.images[:t.monitor_n], device)
    weights = inf.loss_weights(cfg.infusion.steps, cfg.infusion.weighting)
    return Setup(cfg, run, device, model, optimizer, train_x, monitor_x, weights, cadence, shape)


class InfusionTrainer:
    """Infusion training's step for the shared loop."""

    def __init__(self, s: Setup):
        self.s = s
        self.last_nll = torch.zeros(1)  # NLL_t of the last step (logged, never synced per step)

    def train_step(self, step: int, indices: torch.Tensor) -> torch.Tensor:
        s = self.s
        x = s.train_x[indices]
        gen = seeding.step_generator(s.device, s.cfg.seed, step)
        chain = inf.training_chain(s.model.operator, s.model.prior, x, s.model.alphas, gen)
        loss, self.last_nll = inf.infusion_loss(chain, x, s.weights)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        return loss.detach()

    def save(self, step: int, train_time: float) -> None:
        s = self.s
        ckpt_io.save_training(s.run.path, step, s.model.modules(), {"optimizer": s.optimizer},
                              train_time, epoch=step // s.cadence.steps_per_epoch)

    def log_fields(self, step: int, epoch_end: bool) -> dict[str, float]:
        fields = {"nll_last": self.last_nll[-1].item(), "nll_first": self.last_nll[0].item()}
        return fields | (monitor_bounds(self.s) if epoch_end else {})


def monitor_bounds(s: Setup) -> dict[str, float]:
    """Mean lower bounds on a fixed val subset with fixed draws (K = 4): their rise tracks
    training. "val_bound" uses the model's own chain as proposal, "val_bound_infusion" the
    smoothed infusion chain (s = 0.02); see `infusion.lower_bound`."""
    if len(s.monitor_x) == 0:
        return {}
    out = {}
    for name, alphas in (("val_bound", torch.zeros_like(s.model.alphas)),
                         ("val_bound_infusion", s.model.alphas)):
        bound = inf.lower_bound(s.model.operator, s.model.prior, s.monitor_x, alphas,
                                samples=MONITOR_SAMPLES, infusion_std=MONITOR_STD,
                                generator=generator(s.device, s.cfg.seed + MONITOR_SEED_OFFSET))
        out[name] = bound.mean().item()
    return out


def train_infusion(cfg: InfusionConfig, stop_at_step: int | None = None) -> Path:
    """Train (or resume) an infusion run; returns its directory. `stop_at_step` simulates a
    crash after that many steps (tests use it): no final checkpoint, no summary."""
    wall_start = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    run = RunDir.check(cfg.run.dir, cfg.resume, f"infusion-{cfg.data.name.split(':')[0]}")
    with run.take(cfg.resume):
        s = build(cfg, run, device)
        out = Outcome(0, 0.0)
        if cfg.resume:
            out.step, out.train_time, _ = ckpt_io.restore_training(
                run.path, s.model.modules(), {"optimizer": s.optimizer})
        if out.step > s.cadence.total_steps:
            raise UserError(f"{run.path} is at step {out.step}, past train.epochs="
                            f"{cfg.train.epochs} ({s.cadence.total_steps} steps); raise "
                            "train.epochs or leave it as saved")
        run.write_start(cfg, "shape.json", list(s.shape), device, None, False, out.step)
        out = run_loop(run, InfusionTrainer(s), s.cadence, cfg.seed, device, out, "infusion",
                       stop_at_step)
        if not out.interrupted:
            summary = {"dataset": cfg.data.name, "steps": out.step,
                       "epochs": out.step / s.cadence.steps_per_epoch,
                       "train_time_s": out.train_time, "stopped_by_budget": out.stopped_by_budget,
                       "wall_s": time.perf_counter() - wall_start, "final": out.last_record}
            run.write_json("summary.json", summary)
    return run.path
