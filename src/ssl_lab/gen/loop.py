"""The training loop of the generative applications (`rcdm train`, `infusion train`).

Both train on images held in memory, one seeded permutation per epoch
(`seeding.epoch_permutation`), and draw each step's noise from `seeding.step_generator`; so a
run resumed from any checkpoint replays exactly what the uninterrupted run would have seen.
This loop owns the cadence (log window, checkpoints, time budget, NaN stop); each application
brings only its step, its checkpoint contents and its extra metrics (`GenTrainer`).
Logging goes through the shared `MetricsLogger` (metrics.jsonl, TensorBoard, progress bar).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ssl_lab import seeding
from ssl_lab.errors import UserError
from ssl_lab.logger import MetricsLogger, nan_message
from ssl_lab.rundir import RunDir


class GenTrainer(Protocol):
    """What an application plugs into `run_loop`."""

    def train_step(self, step: int, indices: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the images `indices`; returns the loss (no host sync)."""

    def save(self, step: int, train_time: float) -> None:
        """Write a checkpoint of everything `step` depends on."""

    def log_fields(self, step: int, epoch_end: bool) -> dict[str, float]:
        """Extra scalars for this log record (e.g. the lr; validation bounds at epoch ends)."""


@dataclass(frozen=True)
class Cadence:
    """Sizes and rhythm of a run (all in steps, except the budget)."""

    n_items: int  # training images: each epoch permutes them
    batch_size: int
    total_steps: int
    log_every: int
    ckpt_every: int
    budget_s: float | None = None  # stop (and checkpoint) once training used this many seconds
    nan_hint: str = "lower the learning rate"

    @property
    def steps_per_epoch(self) -> int:  # the last partial batch of an epoch is dropped
        return self.n_items // self.batch_size


@dataclass
class Outcome:
    step: int
    train_time: float
    last_record: dict[str, Any] = field(default_factory=dict)
    stopped_by_budget: bool = False
    interrupted: bool = False  # stop_at_step was reached (a simulated crash: no final save)


def batch_indices(perm: torch.Tensor, step: int, cadence: Cadence) -> torch.Tensor:
    """The images of `step`: its slice of the epoch's permutation."""
    i = step % cadence.steps_per_epoch
    return perm[i * cadence.batch_size:(i + 1) * cadence.batch_size]


def run_loop(run: RunDir, trainer: GenTrainer, cadence: Cadence, seed: int,
             device: torch.device, out: Outcome, desc: str,
             stop_at_step: int | None = None) -> Outcome:
    """Train from `out.step` to `cadence.total_steps` (or the budget). A checkpoint is always
    preceded by a log record, whose NaN check keeps non-finite weights off disk."""
    log = MetricsLogger(run, cadence.total_steps, out.step, desc)
    perm, perm_epoch = torch.empty(0), -1
    try:
        while out.step < cadence.total_steps:
            t0 = time.perf_counter()
            epoch = out.step // cadence.steps_per_epoch
            if epoch != perm_epoch:
                perm = seeding.epoch_permutation(cadence.n_items, seed, epoch).to(device)
                perm_epoch = epoch
            log.add_step(trainer.train_step(out.step, batch_indices(perm, out.step, cadence)))
            out.step += 1
            out.train_time += time.perf_counter() - t0
            over_budget = cadence.budget_s is not None and out.train_time >= cadence.budget_s
            epoch_end = out.step % cadence.steps_per_epoch == 0
            ckpt_due = (out.step % cadence.ckpt_every == 0 or over_budget
                        or out.step == cadence.total_steps)
            if out.step % cadence.log_every == 0 or epoch_end or ckpt_due:
                out.last_record = _log_window(run, trainer, cadence, log, out, epoch_end)
            if stop_at_step is not None and out.step >= stop_at_step:
                out.interrupted = True
                return out
            if ckpt_due:
                trainer.save(out.step, out.train_time)
            if over_budget:
                out.stopped_by_budget = True
                log.note(f"train.budget_s={cadence.budget_s} reached at step {out.step}")
                break
    finally:
        log.close()
    return out


def _log_window(run: RunDir, trainer: GenTrainer, cadence: Cadence, log: MetricsLogger,
                out: Outcome, epoch_end: bool) -> dict[str, Any]:
    mean_loss, elapsed = log.close_window()
    if not math.isfinite(mean_loss):
        raise UserError(nan_message(run.path, out.step, log.last_window_steps, cadence.nan_hint))
    rate = log.last_window_steps * cadence.batch_size / max(elapsed, 1e-9)
    record = {"step": out.step, "epoch": out.step / cadence.steps_per_epoch, "loss": mean_loss,
              "images_per_s": rate, "train_time_s": out.train_time,
              **trainer.log_fields(out.step, epoch_end)}
    log.log(record, loss=f"{mean_loss:.4g}", img_s=f"{rate:.0f}")
    return record
