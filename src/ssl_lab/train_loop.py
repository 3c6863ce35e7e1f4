"""The training loop: one explicit loop, nanoGPT style, from config to run directory.

Everything random is a function of (seed, epoch) for the data order and (seed, step) for the
views (ssl_lab.seeding), so a run resumed from any checkpoint replays exactly the batches and
views the uninterrupted run would have seen: on CPU the final weights are bit-identical.
The run directory, lock, logger and checkpoints are the shared engine's (rundir, logger,
checkpoint); what is this loop's own is the model, its step and the evaluation at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import dist, seeding
from ssl_lab.config import RESUME_SAFE_KEYS, Config
from ssl_lab.config_io import flatten, read_yaml, resume_conflicts, to_dict
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.splits import DatasetSplits
from ssl_lab.errors import UserError
from ssl_lab.eval.metrics import rankme
from ssl_lab.logger import MetricsLogger, nan_message
from ssl_lab.methods import Progress, get_method
from ssl_lab.optim import lr_at, scaled_lr, set_lr
from ssl_lab.runtime import autocast
from ssl_lab.train_setup import Setup, agreed, build, epochs_touched

# ----------------------------------------------------------------------------- the run


def _modules(s: Setup) -> dict[str, torch.nn.Module]:
    return {"model": s.model} | ({"probes": s.probes} if s.probes is not None else {})


def _stateful(s: Setup) -> dict:
    return {"optimizer": s.optimizer, "probe_optimizer": s.probe_optimizer, "scaler": s.scaler}


def save(s: Setup, step: int, train_time: float) -> Path:
    return ckpt_io.save_training(s.run_dir, step, _modules(s), _stateful(s), train_time,
                                 epoch=step // s.steps_per_epoch)


def restore(s: Setup) -> tuple[int, float]:
    """(step, train time so far) of the newest complete checkpoint, or (0, 0) for a new run."""
    if not s.cfg.resume:
        return 0, 0.0
    step, train_time, _ = ckpt_io.restore_training(s.run_dir, _modules(s), _stateful(s))
    return step, train_time


def start(s: Setup) -> tuple[int, float]:
    """Take the run: lock (rank 0), restore, then write config.yaml, encoder.json, env.json.
    Nothing is written until every check (locks, saved config, checkpoints) has passed."""
    _check_saved_config(s)  # on every rank: each raises the same error, none waits alone
    step, train_time = restore(s)
    if s.info.is_main:
        s.run.write_start(s.cfg, "encoder.json", s.spec, s.device, s.amp_dtype,
                          s.scaler.is_enabled(), step, world_size=s.info.world_size)
    dist.barrier()
    return step, train_time


def _check_saved_config(s: Setup) -> None:
    """A Config built in Python (not by load_config) must agree with the run it resumes too."""
    if s.cfg.resume and s.run.started:
        given = flatten(to_dict(s.cfg))
        resume_conflicts(read_yaml(s.run.config), given, RESUME_SAFE_KEYS, s.run.config)


def collapse_monitors(z: torch.Tensor) -> dict[str, float]:
    """Std per dimension of the L2-normalised z (≈ 1/√D when healthy, → 0 under collapse) and
    RankMe, both on the first view of the last batch."""
    z0 = torch.nn.functional.normalize(z[0].detach().float(), dim=1)
    if not torch.isfinite(z0).all():
        return {"z_std": float("nan"), "z_std_x_sqrt_d": float("nan"), "rankme": float("nan")}
    return {"z_std": z0.std(0).mean().item(), "z_std_x_sqrt_d": z0.std(0).mean().item()
            * z0.shape[1] ** 0.5, "rankme": rankme(z0)}


def train(cfg: Config, stop_at_step: int | None = None, *, backbone: torch.nn.Module | None = None,
          data: DatasetSplits | None = None, allow_import: bool = False) -> Path:
    """Run (or resume) a training run; returns its directory.

    `backbone` (ssl_lab.models.from_module) and `data` (ssl_lab.data.from_arrays/from_dataset)
    replace model.backbone and data.name; the wrapped module is trained in place. `allow_import`
    lets model.backbone=import:package.module:factory import and call that factory.
    `stop_at_step` simulates a crash after that many steps (tests use it): no final checkpoint,
    no evaluation."""
    info = dist.init_from_env()
    try:
        s = build(cfg, info, backbone=backbone, data=data, allow_import=allow_import)
        with contextlib.ExitStack() as held:
            agreed(info, lambda: held.enter_context(s.run.take(s.cfg.resume)))
            return _train(s, stop_at_step, time.perf_counter())
    finally:  # a Ctrl-C carries the run directory: RunDir.take sets it
        dist.cleanup()


@dataclass
class _Window:
    """What the last log step saw (for summary.json)."""

    online_acc: dict[str, float] = field(default_factory=dict)


def _train(s: Setup, stop_at_step: int | None, wall_start: float) -> Path:
    cfg, main = s.cfg, s.info.is_main
    step, train_time = start(s)
    ssl = s.data.ssl_train
    loader = BatchLoader(ssl.images, ssl.labels, s.per_rank, cfg.seed,
                         rank=s.info.rank, world_size=s.info.world_size, device=s.device,
                         prefetch=cfg.data.prefetch)
    batches = loader.batches(step, s.total_steps)
    log = MetricsLogger(s.run, s.total_steps, step, "train", write=main)
    if s.resolution:
        sizes = s.resolution.sizes(epochs_touched(s.total_steps, s.steps_per_epoch))
        log.note(f"progressive resolution: view size per epoch {sizes}")
    stopped_by_budget, last_saved, window = False, step, _Window()
    try:
        while step < s.total_steps:
            t0 = time.perf_counter()
            out, loss, lr = train_step(s, step, next(batches))
            log.add_step(loss)
            step += 1
            train_time += time.perf_counter() - t0
            over_budget = dist.any_rank(cfg.train.budget_s is not None
                                        and train_time >= cfg.train.budget_s)
            ckpt_due = step % cfg.train.ckpt_every_steps == 0 or step % s.steps_per_epoch == 0 \
                or over_budget
            # a checkpoint is always preceded by a log, whose NaN check keeps bad weights off disk
            if step % cfg.train.log_every_steps == 0 or ckpt_due:
                _log_window(s, log, window, step, lr, out)
            if stop_at_step is not None and step >= stop_at_step:
                return s.run_dir
            if ckpt_due:
                if main:
                    save(s, step, train_time)
                last_saved = step
            if over_budget:
                stopped_by_budget = True
                log.note(f"train.budget_s={cfg.train.budget_s} reached at step {step}")
                break
        if last_saved != step and main:
            save(s, step, train_time)
    finally:
        batches.close()  # stops the prefetch thread
        log.close()
    dist.barrier()
    if not main:  # evaluation and summary are rank 0's
        return s.run_dir
    return finish(s, step, train_time, stopped_by_budget, window.online_acc, wall_start)


def train_step(s: Setup, step: int, batch: tuple[torch.Tensor, torch.Tensor]
               ) -> tuple[dict, torch.Tensor, float]:
    """One optimizer step on one (rank's share of a) global batch: (outputs, loss, lr)."""
    cfg, info = s.cfg, s.info
    images, labels = batch
    view_gen, small_gen = s.views_at(step // s.steps_per_epoch)
    gen = seeding.step_generator(s.device, cfg.seed, step, info.rank)
    views = view_gen(images, gen)  # (V, N, C, S, S) made on the device, in a batch
    small = small_gen(images, gen) if small_gen else None
    # the loss sees the global batch; a shared seed makes sampled negatives agree on all ranks
    loss_gen = seeding.shared_generator(s.device, cfg.seed, step) if info.distributed else gen
    lr = lr_at(step, s.total_steps, round(cfg.optim.warmup_epochs * s.steps_per_epoch),
               scaled_lr(cfg.optim), cfg.optim.final_lr_frac)
    set_lr(s.optimizer, lr)
    s.model.begin_step(Progress(step, s.total_steps, s.steps_per_epoch))
    with autocast(s.device, s.amp_dtype):
        out = s.forward(views, s.probes.layer_names if s.probes else [], small)
        loss = dist.global_loss(get_method(cfg.method.name).loss, out, labels, cfg.method, loss_gen)
        probe_loss = s.probes.loss(out["features"], labels.repeat(views.shape[0])) \
            if s.probes else 0.0
    s.scaler.scale(loss + probe_loss).backward()
    if info.distributed and s.probes:  # DDP averaged the model's gradients during backward
        dist.all_reduce_grads(s.probes.parameters())
    if s.scaler.is_enabled():
        s.scaler.unscale_(s.optimizer)  # gradient edits (DINO's clipping) must see true values
    s.model.before_update()
    if _apply_update(s, loss):
        s.model.end_step(out)
    s.optimizer.zero_grad(set_to_none=True)
    if s.probe_optimizer:
        s.probe_optimizer.zero_grad(set_to_none=True)
    return out, loss, lr


def _apply_update(s: Setup, loss: torch.Tensor) -> bool:
    """The optimizer steps. fp16: the scaler skips a step whose gradients overflowed and lowers
    its scale (routine, not a NaN stop). Otherwise train.on_nan=skip drops non-finite steps."""
    optimizers = [o for o in (s.optimizer, s.probe_optimizer) if o is not None]
    if s.scaler.is_enabled():
        for opt in optimizers:
            s.scaler.step(opt)
        s.scaler.update()
        return True
    if s.cfg.train.on_nan == "skip" and not _finite_update(loss, s.optimizer):
        tqdm.write(f"step {s.model.progress.step}: non-finite loss or gradient, update skipped "
                   "(train.on_nan=skip)")
        return False
    for opt in optimizers:
        opt.step()
    return True


def _log_window(s: Setup, log: MetricsLogger, window: _Window, step: int, lr: float,
                out: dict) -> None:
    mean_loss, elapsed = log.close_window()
    if not np.isfinite(mean_loss) and s.cfg.train.on_nan == "stop":
        raise UserError(nan_message(s.run_dir, step, log.last_window_steps,
                                    "lower optim.lr or use train.on_nan=skip"))
    window.online_acc = s.probes.pop_accuracy() if s.probes else {}
    rate = log.last_window_steps * out["z"].shape[0] * s.batch_size / elapsed
    record = {"step": step, "epoch": step / s.steps_per_epoch, "loss": mean_loss, "lr": lr,
              "views_per_s": rate, **{f"online/{k}": v for k, v in window.online_acc.items()},
              **collapse_monitors(out["z"])}
    if s.scaler.is_enabled():
        record["grad_scale"] = s.scaler.get_scale()
    if s.resolution:
        record["view_size"] = s.views_at((step - 1) // s.steps_per_epoch)[0].size  # the last step's
    # rank 0 writes; the others' online accuracies are of their shards only
    log.log(record, loss=f"{mean_loss:.3f}", views_s=f"{rate:.0f}")


def _finite_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """One sync per step, paid only with train.on_nan=skip: a finite loss can still have NaN
    gradients, and a single NaN update poisons every later step."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(n)) for n in norms)


def finish(s: Setup, step: int, train_time: float, stopped_by_budget: bool,
           online_acc: dict[str, float], wall_start: float) -> Path:
    """Offline evaluation (unless disabled) and summary.json."""
    from ssl_lab.eval.run import evaluate_run, print_layer_table  # heavy: only when needed

    summary = {"method": s.cfg.method.name, "dataset": s.cfg.data.name, "run_name": s.cfg.run.name,
               "epochs": step / s.steps_per_epoch, "steps": step, "stopped_by_budget":
               stopped_by_budget, "train_s": train_time,
               "views_per_s": step * s.batch_size * (s.cfg.views.n + s.cfg.views.small_n)
               / max(train_time, 1e-9),
               "online_probes": online_acc}
    if s.cfg.eval.enabled:
        print(eval_notice(s.cfg), flush=True)
        # data the caller brought is probed as given unless eval.data names another dataset
        data = s.given_data if not s.cfg.eval.data else None
        report = evaluate_run(s.run_dir, data=data, backbone=s.given_backbone)
        summary |= summary_from_eval(report)
        print_layer_table(report, s.run_dir)
    summary["wall_s"] = time.perf_counter() - wall_start  # this invocation, evaluation included
    s.run.write_json("summary.json", summary)
    print(f"summary: {s.run_dir / 'summary.json'}")
    return s.run_dir


def eval_notice(cfg: Config) -> str:
    """The line printed before an offline evaluation: what it computes, why it can take longer
    than a tiny run's training, and how to make it cheaper."""
    dataset = cfg.eval.data or cfg.data.name
    share = "the whole labelled train split" if cfg.eval.train_fraction >= 1 else \
        f"{cfg.eval.train_fraction:g} of the labelled train split"
    spec = (cfg.eval.layers or "all").strip()
    layers = "every layer" if spec.lower() in ("", "all") else f"layers {spec[:60]}"
    baselines = ("; then the random-init encoder and raw-pixel baselines, computed once per "
                 "dataset and architecture and cached") if cfg.eval.baselines else ""
    return (f"evaluating: linear and kNN probes of {layers} on {share} of {dataset[:60]} "
            f"(data.fraction limits SSL training only){baselines}. Cheaper: eval.train_fraction=0.1"
            ", eval.layers=backbone, eval.baselines=false (or eval.enabled=false)")


def summary_from_eval(report: dict) -> dict:
    layers = report["layers"]
    best = report["best_layer"]
    return {"probes": {k: v["linear_test"] for k, v in layers.items()},
            "probes_val": {k: v["linear_val"] for k, v in layers.items()},
            "best_layer": best, "knn_top1": layers[best]["knn_test"],
            "random_init_probes": {k: v["linear_test"] for k, v in report.get("random_init", {}).items()},
            "pixel_probe": report["pixels"]["linear_test"] if "pixels" in report else None,
            "eval_s": report["eval_s"]} | _augmented_summary(report)


def _augmented_summary(report: dict) -> dict:
    """The papers' linear evaluation (eval.linear=augmented), when it ran: layer, val, test."""
    aug = report.get("augmented")
    return {"augmented": {k: aug[k] for k in ("layer", "val", "test", "epochs")}} if aug else {}
