"""`ssl-lab infusion train|sample|score`: infusion-training runs with run directories.

A run directory holds config.yaml, env.json, metrics.jsonl, tensorboard/, checkpoints/
(operator + prior weights, optimizer state), summary.json after training, plots/*.png after
`sample` and score.json after `score`. Every random draw is a function of (seed, step) or
(seed, epoch), so a resumed run replays the batches and chains the uninterrupted run would
have seen. The model and estimators are in `infusion.py`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import runtime
from ssl_lab.config import from_dict, parse_override, read_yaml, set_dotted, split_config_args, to_dict
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf
from ssl_lab.runtime import env_info, pick_device, write_text_atomic

# ----------------------------------------------------------------------------- config

DEFAULT_BOUND_STDS = (0.005, 0.01, 0.02, 0.05)


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
    ckpt_every_steps: int = 500
    log_every_steps: int = 50
    threads: int | None = None
    monitor_n: int = 128  # val images for the per-epoch lower bound (0 = off)


@dataclass
class ScoreSection:
    parzen_samples: int = 10000  # generated samples = Parzen centers
    test_n: int | None = None  # test images scored (None = all)
    val_n: int = 1000  # val images used to choose σ (and the bound's s)
    sigmas: list | None = None  # Parzen σ grid; None = 14 log-spaced values in [0.05, 1]
    bound_samples: int = 10  # K importance samples per image
    bound_n: int = 1000  # test images for the bound (it costs K·T operator passes each)
    bound_stds: list | None = None  # grid for s, the smoothed infusion's std (None: see below)
    bound_val_n: int = 200  # val images to choose the bound's proposal
    batch: int = 1024


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


def _list_of_floats(value: Any, key: str) -> list | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                            for v in items):
        raise UserError(f"config key '{key}' must be a list of positive numbers, got {value!r}")
    return [float(v) for v in items]


def config_from_tree(tree: dict[str, Any]) -> InfusionConfig:
    score = tree.get("score", {})  # list-valued keys: from_dict only knows scalar leaves
    lists = {k: score.pop(k) for k in ("sigmas", "bound_stds") if k in score} \
        if isinstance(score, dict) else {}
    cfg = from_dict(tree, InfusionConfig)
    cfg.score.sigmas = _list_of_floats(lists.get("sigmas"), "score.sigmas")
    cfg.score.bound_stds = _list_of_floats(lists.get("bound_stds"), "score.bound_stds")
    validate(cfg)
    return cfg


def load_infusion_config(path: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    """Defaults ← YAML file ← `key=value` overrides, validated."""
    tree: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return config_from_tree(tree)


def validate(cfg: InfusionConfig) -> None:
    positive = {"infusion.steps": cfg.infusion.steps, "infusion.hidden": cfg.infusion.hidden,
                "infusion.layers": cfg.infusion.layers, "optim.lr": cfg.optim.lr,
                "optim.batch_size": cfg.optim.batch_size, "train.epochs": cfg.train.epochs,
                "train.ckpt_every_steps": cfg.train.ckpt_every_steps,
                "train.log_every_steps": cfg.train.log_every_steps,
                "infusion.var_min": cfg.infusion.var_min,
                "score.parzen_samples": cfg.score.parzen_samples,
                "score.bound_samples": cfg.score.bound_samples, "score.batch": cfg.score.batch,
                "score.val_n": cfg.score.val_n, "score.bound_n": cfg.score.bound_n}
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0, got {value!r}")
    for key, value in {"infusion.alpha0": cfg.infusion.alpha0,
                       "infusion.omega": cfg.infusion.omega}.items():
        if not 0 <= value <= 1:
            raise UserError(f"config key '{key}' must be in [0, 1], got {value!r}")
    if cfg.infusion.operator not in ("mlp", "conv"):
        raise UserError(f"infusion.operator must be mlp or conv, got {cfg.infusion.operator!r}")
    inf.loss_weights(1, cfg.infusion.weighting)  # raises on a bad name
    if not 0 < cfg.data.fraction <= 1:
        raise UserError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if not 0 < cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in (0, 1) (σ is chosen on val), "
                        f"got {cfg.data.val_fraction}")


def save_config(cfg: InfusionConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> InfusionConfig:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not an infusion run (no config.yaml); pass a directory "
                        "made by `ssl-lab infusion train`")
    return load_infusion_config(run_dir / "config.yaml", overrides)


# ----------------------------------------------------------------------------- setup


def prepare_run_dir(cfg: InfusionConfig) -> Path:
    name = f"infusion-{cfg.data.name.split(':')[0]}"
    return runtime.prepare_run_dir(cfg.run.dir, cfg.resume, name)


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, H, W) in [0, 1]; a packed store is read whole (the chain
    trains on every image every epoch, in memory)."""
    return torch.from_numpy(np.asarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def load_data(cfg: InfusionConfig) -> DatasetSplits:
    return load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                        seed=cfg.seed, fraction=cfg.data.fraction)


@dataclass
class Model:
    operator: torch.nn.Module
    prior: inf.PixelGaussianPrior
    alphas: torch.Tensor
    steps: int

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"operator": self.operator, "prior": self.prior}


def build_model(cfg: InfusionConfig, shape: tuple[int, int, int], device: torch.device) -> Model:
    c = cfg.infusion
    torch.manual_seed(cfg.seed)  # operator initialisation
    op = inf.build_operator(c.operator, shape, c.steps, c.hidden, c.layers, c.var_scale,
                            c.var_min).to(device)
    prior = inf.PixelGaussianPrior(shape).to(device)
    return Model(op, prior, inf.alpha_schedule(c.steps, c.alpha0, c.omega), c.steps)


def load_model(run_dir: Path, cfg: InfusionConfig, device: torch.device) -> Model:
    found = ckpt_io.find_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has no complete checkpoint; train it first "
                        f"(ssl-lab infusion train run.dir={run_dir} resume=true)")
    if not (run_dir / "shape.json").is_file():
        raise UserError(f"{run_dir} has no shape.json; it was not made by `ssl-lab infusion train`")
    shape = tuple(json.loads((run_dir / "shape.json").read_text()))
    model = build_model(cfg, shape, device)
    ckpt_io.load_weights(found, model.modules())
    return model


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- train


@dataclass
class Trainer:
    cfg: InfusionConfig
    run_dir: Path
    device: torch.device
    model: Model
    optimizer: torch.optim.Optimizer
    train_x: torch.Tensor
    monitor_x: torch.Tensor
    weights: torch.Tensor
    batch_size: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    def save(self, step: int, train_time: float) -> None:
        state = {"step": step, "epoch": step // self.steps_per_epoch, "train_time_s": train_time,
                 "optimizer": self.optimizer.state_dict()}
        ckpt_io.save_checkpoint(self.run_dir, step, self.model.modules(), state)

    def restore(self) -> tuple[int, float]:
        found = ckpt_io.find_checkpoint(self.run_dir) if self.cfg.resume else None
        if found is None:
            return 0, 0.0
        ckpt_io.load_weights(found, self.model.modules())
        state = ckpt_io.load_state(found)
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), float(state["train_time_s"])


def build_trainer(cfg: InfusionConfig) -> Trainer:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    run_dir = prepare_run_dir(cfg)
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
    monitor_x = to_pixels(data.val.images[: cfg.train.monitor_n], device)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: every input has been validated
    (run_dir / "shape.json").write_text(json.dumps(list(shape)))
    weights = inf.loss_weights(cfg.infusion.steps, cfg.infusion.weighting)
    return Trainer(cfg, run_dir, device, model, optimizer, train_x, monitor_x, weights,
                   batch_size, len(train_x) // batch_size)


def train_step(tr: Trainer, step: int, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = step % tr.steps_per_epoch
    x = tr.train_x[perm[i * tr.batch_size:(i + 1) * tr.batch_size]]
    gen = generator(tr.device, tr.cfg.seed * 1_000_003 + step + 1)
    chain = inf.training_chain(tr.model.operator, tr.model.prior, x, tr.model.alphas, gen)
    loss, nll = inf.infusion_loss(chain, x, tr.weights)
    if not torch.isfinite(loss):
        raise UserError(f"non-finite infusion loss at step {step}; lower optim.lr or resume from "
                        f"the last checkpoint in {tr.run_dir}")
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    return loss.detach(), nll


def monitor_bounds(tr: Trainer) -> dict[str, float]:
    """Mean lower bounds on a fixed val subset with fixed draws (K = 4): their rise tracks
    training. "val_bound" uses the model's own chain as proposal, "val_bound_infusion" the
    smoothed infusion chain (s = 0.02); see `_bound`."""
    if len(tr.monitor_x) == 0:
        return {}
    out = {}
    for name, alphas in (("val_bound", torch.zeros_like(tr.model.alphas)),
                         ("val_bound_infusion", tr.model.alphas)):
        bound = inf.lower_bound(tr.model.operator, tr.model.prior, tr.monitor_x, alphas,
                                samples=4, infusion_std=0.02,
                                generator=generator(tr.device, tr.cfg.seed + 7))
        out[name] = bound.mean().item()
    return out


def train_infusion(cfg: InfusionConfig, stop_at_step: int | None = None) -> Path:
    """Train (or resume) an infusion run; returns its directory. `stop_at_step` simulates a
    crash after that many steps (tests use it)."""
    wall_start = time.perf_counter()
    tr = build_trainer(cfg)
    step, train_time = tr.restore()
    if step == 0:
        save_config(cfg, tr.run_dir / "config.yaml")
    (tr.run_dir / "env.json").write_text(json.dumps(env_info(tr.device), indent=1))
    writer = SummaryWriter(str(tr.run_dir / "tensorboard"))
    metrics = open(tr.run_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed in finally)
    bar = tqdm(total=tr.total_steps, initial=step, desc="infusion", unit="step",
               dynamic_ncols=True)
    record: dict[str, Any] = {}
    loss_sum, window = 0.0, 0
    try:
        perm_epoch, perm = -1, None
        while step < tr.total_steps:
            t0 = time.perf_counter()
            epoch = step // tr.steps_per_epoch
            if epoch != perm_epoch:
                perm = torch.randperm(len(tr.train_x), generator=torch.Generator().manual_seed(
                    cfg.seed * 100_003 + epoch)).to(tr.device)
                perm_epoch = epoch
            loss, nll = train_step(tr, step, perm)
            loss_sum, window = loss_sum + loss.item(), window + 1
            step += 1
            train_time += time.perf_counter() - t0
            bar.update(1)
            at_epoch_end = step % tr.steps_per_epoch == 0
            if step % cfg.train.log_every_steps == 0 or at_epoch_end:
                record = {"step": step, "epoch": step / tr.steps_per_epoch,
                          "loss": loss_sum / window, "nll_last": nll[-1].item(),
                          "nll_first": nll[0].item(), "train_time_s": train_time}
                if at_epoch_end:
                    record.update(monitor_bounds(tr))
                _log(record, metrics, writer)
                bar.set_postfix(loss=f"{record['loss']:.1f}")
                loss_sum, window = 0.0, 0
            if stop_at_step is not None and step >= stop_at_step:
                return tr.run_dir
            if step % cfg.train.ckpt_every_steps == 0 or step == tr.total_steps:
                tr.save(step, train_time)
    finally:
        bar.close()
        metrics.close()
        writer.close()
    summary = {"dataset": cfg.data.name, "steps": step, "epochs": cfg.train.epochs,
               "train_time_s": train_time, "wall_s": time.perf_counter() - wall_start,
               "final": record}
    write_text_atomic(tr.run_dir / "summary.json", json.dumps(summary, indent=1))
    return tr.run_dir


def _log(record: dict[str, Any], metrics, writer: SummaryWriter) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    for key, value in record.items():
        if key != "step" and value is not None:
            writer.add_scalar(f"infusion/{key}", value, record["step"])


# ----------------------------------------------------------------------------- sample


def image_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 2) -> Path:
    """Save (N, C, H, W) images in [0, 1] as a PNG grid with 1-pixel gaps, row-major."""
    from PIL import Image

    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = img
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(scale, 48 // h)  # 8×8 digits would be unreadably small
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path


def sample_run(run_dir: Path, n: int = 64, chains: int = 8, seed: int = 0,
               out_dir: Path | None = None) -> dict[str, Path]:
    """plots/samples.png (n final samples) and plots/chain.png (one row per chain: z_0 … x̂)."""
    cfg = load_run_config(run_dir)
    device = pick_device()
    model = load_model(run_dir, cfg, device)
    out_dir = out_dir or run_dir / "plots"
    final, _ = inf.sample(model.operator, model.prior, n, model.steps, generator(device, seed))
    _, states = inf.sample(model.operator, model.prior, chains, model.steps,
                           generator(device, seed + 1), keep_chain=True)
    steps = torch.stack(states, 1).flatten(0, 1)  # chain-major: row i = chain i over time
    rows = max(1, int(round(n ** 0.5)))
    return {"samples": image_grid(final, rows, out_dir / "samples.png"),
            "chain": image_grid(steps, chains, out_dir / "chain.png")}


# ----------------------------------------------------------------------------- score


def _subset(x: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """A seeded subset (the first images of a split may be ordered by class)."""
    if n is None or n >= len(x):
        return x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.to(x.device)]


def _parzen(samples: torch.Tensor, val: torch.Tensor, test: torch.Tensor,
            sigmas: list[float], batch: int) -> dict[str, Any]:
    sigma, by_sigma = inf.choose_sigma(val, samples, sigmas, batch=batch)
    ll = inf.parzen_log_likelihood(test, samples, sigma, batch=batch)
    return {"sigma": sigma, "val_by_sigma": by_sigma, "test_ll": ll.mean().item(),
            "test_ll_sem": (ll.std() / len(ll) ** 0.5).item()}


def _bound(model: Model, val: torch.Tensor, test: torch.Tensor, sc: ScoreSection,
           device: torch.device, seed: int) -> dict[str, Any]:
    """Importance-sampled bounds on test, with the proposal chosen on val.

    Two proposals: "infusion" (the paper's: the training chain, Dirac smoothed to N(x, s²),
    s chosen on val from score.bound_stds) and "chain" (α = 0: the model's own chain, plain
    Monte-Carlo). Both are valid lower bounds; `test_bound` is the one that is higher on val.
    """
    stds = sc.bound_stds or list(DEFAULT_BOUND_STDS)
    zeros = torch.zeros_like(model.alphas)

    def run(x: torch.Tensor, alphas: torch.Tensor, s: float) -> torch.Tensor:
        return inf.lower_bound(model.operator, model.prior, x, alphas, sc.bound_samples, s,
                               sc.batch, generator(device, seed + 11))

    val_by_std = {s: run(val, model.alphas, s).mean().item() for s in stds}
    best_std = max(val_by_std, key=val_by_std.get)
    val_chain = run(val, zeros, stds[0]).mean().item()
    infusion, chain = run(test, model.alphas, best_std), run(test, zeros, stds[0])
    pick = "infusion" if val_by_std[best_std] >= val_chain else "chain"

    def stats(b: torch.Tensor) -> dict[str, float]:
        return {"test": b.mean().item(), "test_sem": (b.std() / len(b) ** 0.5).item()}

    return {"samples": sc.bound_samples, "n": len(test), "n_val": len(val),
            "infusion": {"std": best_std, "val_by_std": val_by_std, **stats(infusion)},
            "chain": {"val": val_chain, **stats(chain)}, "picked_on_val": pick,
            "prior_exact_same_images": model.prior.log_prob(test).mean().item(),
            "test_bound": (infusion if pick == "infusion" else chain).mean().item()}


def score_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (),
              out_name: str = "score.json") -> dict[str, Any]:
    """Parzen LL on test (σ on val) of the chain and of the prior alone, the chain's lower bound
    and the prior's exact LL; writes run_dir/score.json."""
    t0 = time.perf_counter()
    bad = [o for o in overrides if not o.startswith(("score.", "data.root="))]
    if bad:
        raise UserError(f"score takes only score.* (and data.root) overrides, got '{bad[0]}': "
                        "the model's settings come from the run's config.yaml")
    cfg = load_run_config(run_dir, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    model = load_model(run_dir, cfg, device)
    data = load_data(cfg)
    sc = cfg.score
    val = _subset(to_pixels(data.val.images, device), sc.val_n, cfg.seed)
    test = _subset(to_pixels(data.test.images, device), sc.test_n, cfg.seed + 1)
    sigmas = sc.sigmas or inf.default_sigmas()
    gen = generator(device, cfg.seed + 3)
    with tqdm(total=4, desc="score", unit="stage", dynamic_ncols=True) as bar:
        samples, _ = inf.sample(model.operator, model.prior, sc.parzen_samples, model.steps, gen)
        prior_samples = model.prior.sample(sc.parzen_samples, gen)
        bar.update(1)
        chain_parzen = _parzen(samples, val, test, sigmas, sc.batch)
        bar.update(1)
        prior_parzen = _parzen(prior_samples, val, test, sigmas, sc.batch)
        bar.update(1)
        bound = _bound(model, val[: sc.bound_val_n], _subset(test, sc.bound_n, cfg.seed + 2),
                       sc, device, cfg.seed)
        bar.update(1)
    report = {
        "dataset": cfg.data.name, "n_test": len(test), "parzen_samples": sc.parzen_samples,
        "chain": {"parzen": chain_parzen, "bound": bound},
        "prior": {"parzen": prior_parzen, "exact_ll": model.prior.log_prob(test).mean().item()},
    }
    report["score_s"] = time.perf_counter() - t0
    write_text_atomic(run_dir / out_name, json.dumps(report, indent=1))
    return report


# ----------------------------------------------------------------------------- CLI


def cmd_train(ns: argparse.Namespace) -> None:
    path, overrides = split_config_args(ns.args)
    run_dir = train_infusion(load_infusion_config(path, overrides))
    print(f"run: {run_dir}")


def cmd_sample(ns: argparse.Namespace) -> None:
    run_dir = runtime.existing_run_dir(ns.run_dir, "ssl-lab infusion train")
    paths = sample_run(run_dir, n=ns.n, chains=ns.chains, seed=ns.seed,
                       out_dir=Path(ns.out) if ns.out else None)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_score(ns: argparse.Namespace) -> None:
    report = score_run(runtime.existing_run_dir(ns.run_dir, "ssl-lab infusion train"), ns.overrides)
    chain, prior = report["chain"], report["prior"]
    print(f"Parzen LL (test, nats): chain {chain['parzen']['test_ll']:.1f} "
          f"(σ={chain['parzen']['sigma']}), prior {prior['parzen']['test_ll']:.1f}")
    print(f"lower bound (test, nats): chain {chain['bound']['test_bound']:.1f} "
          f"(proposal: {chain['bound']['picked_on_val']}); "
          f"prior exact LL {prior['exact_ll']:.1f}")
    print(f"score: {Path(ns.run_dir) / 'score.json'}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `infusion {train,sample,score}` to an argparse subparsers object."""
    parser = sub.add_parser("infusion", help="infusion-trained generative chains (Bordes+ 2017)")
    inner = parser.add_subparsers(dest="infusion_command", required=True)
    p = inner.add_parser("train", help="train a transition operator by infusion training")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_train)
    p = inner.add_parser("sample", help="PNG grids of samples and of the chain's steps")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=64, help="samples in samples.png")
    p.add_argument("--chains", type=int, default=8, help="rows of chain.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN/plots)")
    p.set_defaults(func=cmd_sample)
    p = inner.add_parser("score", help="Parzen LL and lower bound on test -> RUN/score.json")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="score.* keys, e.g. score.parzen_samples=2000")
    p.set_defaults(func=cmd_score)
