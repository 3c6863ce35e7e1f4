"""The training loop: one explicit loop, nanoGPT style, from config to run directory.

Everything random is a function of (seed, epoch) for the data order and (seed, step) for the
views, so a run resumed from any checkpoint replays exactly the batches and views the
uninterrupted run would have seen: on CPU the final weights are bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import dist, runtime
from ssl_lab.config import Config, save_config
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.progressive import ResolutionSchedule, schedule_from_config
from ssl_lab.data.sources import DatasetSplits, default_view_size, load_dataset
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.errors import UserError
from ssl_lab.eval.metrics import rankme
from ssl_lab.eval.online import OnlineProbes
from ssl_lab.methods import Encoder, SSLModel, byol_momentum, get_method
from ssl_lab.optim import build_optimizer, lr_at, scaled_lr, set_lr
from ssl_lab.runtime import autocast, env_info, pick_device, resolve_precision, write_text_atomic

# ----------------------------------------------------------------------------- run directory


def prepare_run_dir(cfg: Config) -> Path:
    return runtime.prepare_run_dir(cfg.run.dir, cfg.resume,
                                   f"{cfg.method.name}-{cfg.data.name.split(':')[0]}")


def encoder_spec(cfg: Config, data: DatasetSplits, size: int, mean, std, num_classes: int) -> dict:
    """Everything needed to rebuild the encoder without loading the training data."""
    return {"model": asdict(cfg.model), "in_chans": data.in_chans, "image_size": size,
            "mean": list(mean), "std": list(std), "num_classes": num_classes,
            "dataset": cfg.data.name, "target": cfg.data.target}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units (on a strided subset: it is fast and
    the statistics of 10k images are within 1e-3 of the full set's)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float32) / 255.0
    flat = sample.reshape(-1, sample.shape[-1])
    return flat.mean(0).tolist(), np.maximum(flat.std(0), 1e-3).tolist()


def view_size(cfg: Config, data: DatasetSplits) -> int:
    """`views.size`, or for 0 the dataset's default view size (data.sources.VIEW_SIZES)."""
    return cfg.views.size or default_view_size(data.name, data.image_size)


def load_training_data(cfg: Config) -> DatasetSplits:
    data = load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                        seed=cfg.seed, fraction=cfg.data.fraction)
    data = data.select_target(cfg.data.target)
    if len(data.train.images) < 2:
        raise UserError(f"dataset {cfg.data.name} has {len(data.train.images)} training images; "
                        "SSL needs at least 2 (check data.fraction and the data files)")
    return data


# ----------------------------------------------------------------------------- determinism


def step_generator(device: torch.device, seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The views of one step on one rank: a pure function of (seed, step, rank)."""
    return torch.Generator(device=device).manual_seed(dist.rank_generator_seed(seed, step, rank))


# ----------------------------------------------------------------------------- the loop


@dataclass
class Setup:
    cfg: Config
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    data: DatasetSplits
    model: SSLModel
    probes: OnlineProbes | None
    optimizer: torch.optim.Optimizer
    probe_optimizer: torch.optim.Optimizer | None
    views: ViewGenerator  # at the full view size
    small_views: ViewGenerator | None  # multi-crop
    batch_size: int  # global batch (all ranks): lr scaling and steps per epoch use it
    steps_per_epoch: int
    total_steps: int
    info: dist.DistInfo
    per_rank: int
    resolution: ResolutionSchedule | None = None  # progressive resolution; None: always full
    _views_by_size: dict[int, tuple[ViewGenerator, ViewGenerator | None]] = field(
        default_factory=dict)

    def views_at(self, epoch: int) -> tuple[ViewGenerator, ViewGenerator | None]:
        """The view generators of `epoch` (one pair per size: they keep per-size buffers)."""
        size = self.resolution.size(epoch) if self.resolution else self.views.size
        if size == self.views.size:
            return self.views, self.small_views
        if size not in self._views_by_size:
            # the full size's recipe throughout: crop scales must not jump when the size crosses 64
            self._views_by_size[size] = (
                ViewGenerator(self.views.recipe, size, self.views.n_views),
                _small_view_generator(self.cfg, size, self.views.recipe.fast))
        return self._views_by_size[size]


def build(cfg: Config, info: dist.DistInfo | None = None) -> Setup:
    info = info or dist.DistInfo(0, 1, 0, pick_device())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    runtime.keep_freed_memory()  # fresh view batches are not page-faulted in every step
    device = info.device
    amp_dtype = resolve_precision(cfg.train.precision, device)
    method = get_method(cfg.method.name)  # fail on bad names before loading anything
    get_recipe(cfg.views.recipe, **cfg.views.recipe_options())
    run_dir = _agreed_run_dir(cfg, info)
    data = load_training_data(cfg)
    size = view_size(cfg, data)
    views = ViewGenerator(get_recipe(cfg.views.recipe, size=size, **cfg.views.recipe_options()),
                          size, cfg.views.n)
    small_views = _small_view_generator(cfg, size, views.recipe.fast)
    batch_size = min(cfg.optim.batch_size, len(data.train.images))
    per_rank = dist.per_rank_batch(batch_size, info.world_size)
    steps_per_epoch = len(data.train.images) // batch_size
    total_steps = max(1, round(steps_per_epoch * cfg.train.epochs))  # epochs may be fractional
    resolution = _resolution_schedule(cfg, size, epochs_touched(total_steps, steps_per_epoch))
    num_classes = data.num_classes[0]
    mean, std = channel_stats(data.train.images)

    torch.manual_seed(cfg.seed)
    encoder = Encoder(cfg.model, data.in_chans, size, mean, std)
    model = SSLModel(encoder, method, cfg.method, num_classes)
    if info.distributed:  # global batch statistics, also on CPU (encoder, predictor, target)
        model = dist.convert_sync_batchnorm(model)
    model = model.to(device)
    probes = OnlineProbes(encoder.feature_dims, num_classes).to(device) if cfg.probe.online else None
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        # in place (Module.compile): parameter names, checkpoints and the optimizer are unchanged;
        # each new view size (progressive resolution) recompiles once
        model.compile()
    trainable = [m for m in (model.encoder, model.predictor, model.classifier) if m is not None]
    optimizer = build_optimizer(trainable, cfg.optim, scaled_lr(cfg.optim))
    probe_optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg.probe.lr) if probes else None

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: every input has been validated
        (run_dir / "encoder.json").write_text(json.dumps(
            encoder_spec(cfg, data, size, mean, std, num_classes), indent=1))
    dist.barrier()
    return Setup(cfg, run_dir, device, amp_dtype, data, model, probes, optimizer, probe_optimizer,
                 views, small_views, batch_size, steps_per_epoch, total_steps, info, per_rank,
                 resolution)


def epochs_touched(total_steps: int, steps_per_epoch: int) -> int:
    """Epochs a run of total_steps steps enters: a fractional train.epochs' partial last one
    counts (progressive resolution must reach full size in the epoch that really ends the run)."""
    return math.ceil(total_steps / steps_per_epoch)


def _resolution_schedule(cfg: Config, size: int, epochs: int) -> ResolutionSchedule | None:
    v = cfg.views
    schedule = schedule_from_config(v.min_size, size, v.ramp_start, v.ramp_end, v.size_step, epochs)
    if schedule is not None and cfg.model.backbone.startswith("vit"):
        raise UserError("views.min_size (progressive resolution) needs a ResNet backbone: a ViT's "
                        "position embeddings are fixed to one image size; set views.min_size=0")
    return schedule


def _small_view_generator(cfg: Config, size: int, fast: bool) -> ViewGenerator | None:
    """Multi-crop: k extra views at a smaller size from small crops (SwAV's 2 + k scheme), of
    the same kind (fast or exact) as the large views."""
    if not cfg.views.small_n:
        return None
    recipe = get_recipe(cfg.views.recipe, **{**cfg.views.recipe_options(), "fast": fast})
    if recipe.crop_scale is not None:
        recipe = replace(recipe, crop_scale=(0.05, cfg.views.small_scale))
    small_size = cfg.views.small_size or max(8, size // 2)
    return ViewGenerator(recipe, small_size, cfg.views.small_n, noise_std=cfg.views.noise_std)


def _agreed_run_dir(cfg: Config, info: dist.DistInfo) -> Path:
    """Rank 0 decides (the default name holds a timestamp); every rank raises the same error."""
    answer: str | Path = ""
    if info.is_main:
        try:
            answer = prepare_run_dir(cfg)
        except UserError as exc:
            answer = str(exc)
    answer = dist.broadcast_object(answer)
    if isinstance(answer, str):
        raise UserError(answer)
    return Path(answer)


def _modules(s: Setup) -> dict[str, torch.nn.Module]:
    return {"model": s.model} | ({"probes": s.probes} if s.probes is not None else {})


def save(s: Setup, step: int, train_time: float) -> Path:
    state = {"step": step, "epoch": step // s.steps_per_epoch, "train_time_s": train_time,
             "optimizer": s.optimizer.state_dict(),
             "probe_optimizer": s.probe_optimizer.state_dict() if s.probe_optimizer else {}}
    return ckpt_io.save_checkpoint(s.run_dir, step, _modules(s), state)


def restore(s: Setup) -> tuple[int, float]:
    """(step, train time so far) of the newest complete checkpoint, or (0, 0) for a new run."""
    if not s.cfg.resume:
        return 0, 0.0
    found = ckpt_io.find_checkpoint(s.run_dir)
    if found is None:
        return 0, 0.0
    ckpt_io.load_weights(found, _modules(s))
    state = ckpt_io.load_state(found)
    s.optimizer.load_state_dict(state["optimizer"])
    if s.probe_optimizer is not None:
        s.probe_optimizer.load_state_dict(state["probe_optimizer"])
    return int(state["step"]), float(state["train_time_s"])


def collapse_monitors(z: torch.Tensor) -> dict[str, float]:
    """Std per dimension of the L2-normalised z (≈ 1/√D when healthy, → 0 under collapse) and
    RankMe, both on the first view of the last batch."""
    z0 = torch.nn.functional.normalize(z[0].detach().float(), dim=1)
    if not torch.isfinite(z0).all():
        return {"z_std": float("nan"), "z_std_x_sqrt_d": float("nan"), "rankme": float("nan")}
    return {"z_std": z0.std(0).mean().item(), "z_std_x_sqrt_d": z0.std(0).mean().item()
            * z0.shape[1] ** 0.5, "rankme": rankme(z0)}


def train(cfg: Config, stop_at_step: int | None = None) -> Path:
    """Run (or resume) a training run; returns its directory. `stop_at_step` simulates a crash
    after that many steps (tests use it): no final checkpoint, no evaluation."""
    info = dist.init_from_env()
    try:
        return _train(cfg, info, stop_at_step)
    finally:
        dist.cleanup()


def _train(cfg: Config, info: dist.DistInfo, stop_at_step: int | None) -> Path:
    wall_start = time.perf_counter()
    s = build(cfg, info)
    cfg, device, main = s.cfg, s.device, info.is_main
    step, train_time = restore(s)
    if main:
        if step == 0:
            save_config(cfg, s.run_dir / "config.yaml")
        (s.run_dir / "env.json").write_text(json.dumps(env_info(device) | {
            "world_size": info.world_size}, indent=1))
    method = get_method(cfg.method.name)
    writer = SummaryWriter(str(s.run_dir / "tensorboard")) if main else None
    metrics = open(s.run_dir / "metrics.jsonl", "a") if main else None  # noqa: SIM115
    loader = BatchLoader(s.data.train.images, s.data.train.labels, s.per_rank, cfg.seed,
                         rank=info.rank, world_size=info.world_size, device=device,
                         prefetch=cfg.data.prefetch)
    batches = loader.batches(step, s.total_steps)
    if s.resolution and main:
        sizes = s.resolution.sizes(epochs_touched(s.total_steps, s.steps_per_epoch))
        tqdm.write(f"progressive resolution: view size per epoch {sizes}")
    probe_layers = s.probes.layer_names if s.probes else []
    warmup = round(cfg.optim.warmup_epochs * s.steps_per_epoch)
    peak_lr = scaled_lr(cfg.optim)
    loss_sum, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()
    stopped_by_budget, last_saved, online_acc = False, step, {}
    bar = tqdm(total=s.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not main)
    try:
        while step < s.total_steps:
            t0 = time.perf_counter()
            images, labels = next(batches)  # the next one is being read meanwhile (stores)
            view_gen, small_gen = s.views_at(step // s.steps_per_epoch)
            gen = step_generator(device, cfg.seed, step, info.rank)
            views = view_gen(images, gen)  # (V, N, C, S, S) made on the device, in a batch
            small = small_gen(images, gen) if small_gen else None
            # the loss sees the global batch; a shared seed makes sampled negatives agree on all ranks
            loss_gen = gen if not info.distributed else \
                torch.Generator(device).manual_seed(dist.shared_generator_seed(cfg.seed, step))
            lr = lr_at(step, s.total_steps, warmup, peak_lr, cfg.optim.final_lr_frac)
            set_lr(s.optimizer, lr)

            with autocast(device, s.amp_dtype):
                out = s.model(views, probe_layers, small)
                loss = dist.global_loss(method.loss, out, labels, cfg.method, loss_gen)
                probe_loss = s.probes.loss(out["features"], labels.repeat(views.shape[0])) \
                    if s.probes else 0.0
            (loss + probe_loss).backward()
            if info.distributed:
                dist.all_reduce_grads([*s.model.parameters(), *(s.probes.parameters() if s.probes else [])])
            if cfg.train.on_nan == "skip" and not _finite_update(loss, s.optimizer):
                tqdm.write(f"step {step}: non-finite loss or gradient, update skipped "
                           "(train.on_nan=skip)")
            else:
                s.optimizer.step()
                if s.probe_optimizer:
                    s.probe_optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            if s.probe_optimizer:
                s.probe_optimizer.zero_grad(set_to_none=True)
            s.model.update_target(byol_momentum(cfg.method.momentum, step, s.total_steps))
            loss_sum += loss.detach().float()  # no sync: read at log time only
            step, window_steps = step + 1, window_steps + 1
            train_time += time.perf_counter() - t0
            bar.update(1)

            at_epoch_end = step % s.steps_per_epoch == 0
            over_budget = dist.any_rank(cfg.train.budget_s is not None
                                        and train_time >= cfg.train.budget_s)
            ckpt_due = step % cfg.train.ckpt_every_steps == 0 or at_epoch_end or over_budget
            # a checkpoint is always preceded by a log, whose NaN check keeps bad weights off disk
            if step % cfg.train.log_every_steps == 0 or ckpt_due:
                mean_loss = loss_sum.item() / window_steps
                if not np.isfinite(mean_loss) and cfg.train.on_nan == "stop":
                    raise UserError(_nan_message(step, window_steps, s.run_dir))
                elapsed = time.perf_counter() - window_start
                online_acc = s.probes.pop_accuracy() if s.probes else {}
                record = {"step": step, "epoch": step / s.steps_per_epoch, "loss": mean_loss,
                          "lr": lr, "views_per_s": window_steps * out["z"].shape[0] * s.batch_size
                          / elapsed, **{f"online/{k}": v for k, v in online_acc.items()},
                          **collapse_monitors(out["z"])}
                if s.resolution:
                    record["view_size"] = view_gen.size
                if main:  # rank 0 writes; the others' online accuracies are of their shards only
                    _log(metrics, writer, record)
                bar.set_postfix(loss=f"{mean_loss:.3f}", views_s=f"{record['views_per_s']:.0f}")
                loss_sum.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if stop_at_step is not None and step >= stop_at_step:
                return s.run_dir
            if ckpt_due:
                if main:
                    save(s, step, train_time)
                last_saved = step
            if over_budget:
                stopped_by_budget = True
                tqdm.write(f"train.budget_s={cfg.train.budget_s} reached at step {step}")
                break
        if last_saved != step and main:
            save(s, step, train_time)
    finally:
        batches.close()  # stops the prefetch thread
        bar.close()
        if main:
            metrics.close()
            writer.close()
    dist.barrier()
    if not main:  # evaluation and summary are rank 0's
        return s.run_dir
    return finish(s, step, train_time, stopped_by_budget, online_acc, wall_start)


def _log(metrics, writer: SummaryWriter, record: dict) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    for key, value in record.items():
        if key != "step":
            writer.add_scalar(key, value, global_step=record["step"])


def _finite_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """One sync per step, paid only with train.on_nan=skip: a finite loss can still have NaN
    gradients, and a single NaN update poisons every later step."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    return bool(torch.isfinite(loss)) and all(bool(torch.isfinite(n)) for n in norms)


def _nan_message(step: int, window: int, run_dir: Path) -> str:
    found = ckpt_io.find_checkpoint(run_dir)
    last = f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"
    where = f"at step {step}" if window == 1 else f"between steps {step - window + 1} and {step}"
    return f"loss became NaN/inf {where}; {last}; lower optim.lr or use train.on_nan=skip"


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
        report = evaluate_run(s.run_dir)
        summary |= summary_from_eval(report)
        print_layer_table(report, s.run_dir)
    summary["wall_s"] = time.perf_counter() - wall_start  # this invocation, evaluation included
    write_text_atomic(s.run_dir / "summary.json", json.dumps(summary, indent=1))
    print(f"summary: {s.run_dir / 'summary.json'}")
    return s.run_dir


def summary_from_eval(report: dict) -> dict:
    layers = report["layers"]
    best = report["best_layer"]
    return {"probes": {k: v["linear_test"] for k, v in layers.items()},
            "probes_val": {k: v["linear_val"] for k, v in layers.items()},
            "best_layer": best, "knn_top1": layers[best]["knn_test"],
            "random_init_probes": {k: v["linear_test"] for k, v in report.get("random_init", {}).items()},
            "pixel_probe": report["pixels"]["linear_test"] if "pixels" in report else None,
            "eval_s": report["eval_s"]}
