"""`ssl-lab infusion sample` (PNG grids of samples and of the chain's steps) and `infusion
score` (Parzen log-likelihood and importance-sampled lower bound on test -> RUN/score.json)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import (
    SampleArgs,
    ScoreSection,
    check_sample_args,
    load_run_config,
    sample_folder,
)
from ssl_lab.gen.infusion_model import Model, generator, load_data, load_model, to_pixels
from ssl_lab.gen.rcdm_config import check_new_folder
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import pick_device

# Offsets from the run seed of the score's fixed draws: the val/test subsets, the Parzen
# samples and the bound's trajectories never depend on anything but the run seed.
VAL_SUBSET, TEST_SUBSET, BOUND_SUBSET, PARZEN_DRAWS, BOUND_DRAWS = 0, 1, 2, 3, 11


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    pil.save(tmp)
    tmp.replace(path)
    return path


def sample_run(run_dir: Path, args: SampleArgs | None = None) -> dict[str, Path]:
    """samples.png (n final samples) and chain.png (one row per chain: z_0 … x̂) in `args.out`,
    by default RUN/samples/n<n>-chains<chains>-seed<seed>/ (`infusion_config.sample_folder`).
    That folder must be new or empty unless overwrite=true (checked before the model is
    loaded): a second call never silently replaces earlier samples."""
    args = args or SampleArgs()
    check_sample_args(args)
    cfg = load_run_config(run_dir)
    out_dir = sample_folder(run_dir, args)
    if not args.overwrite:
        check_new_folder(out_dir)
    device = pick_device()
    model = load_model(run_dir, cfg, device)
    final, _ = inf.sample(model.operator, model.prior, args.n, model.steps,
                          generator(device, args.seed))
    _, states = inf.sample(model.operator, model.prior, args.chains, model.steps,
                           generator(device, args.seed + 1), keep_chain=True)
    steps = torch.stack(states, 1).flatten(0, 1)  # chain-major: row i = chain i over time
    rows = max(1, int(round(args.n ** 0.5)))
    return {"samples": image_grid(final, rows, out_dir / "samples.png"),
            "chain": image_grid(steps, args.chains, out_dir / "chain.png")}


# ----------------------------------------------------------------------------- score


def subset(x: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
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
    stds = sc.bound_std_grid()
    zeros = torch.zeros_like(model.alphas)

    def run(x: torch.Tensor, alphas: torch.Tensor, s: float) -> torch.Tensor:
        return inf.lower_bound(model.operator, model.prior, x, alphas, sc.bound_samples, s,
                               sc.batch, generator(device, seed + BOUND_DRAWS))

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
    cfg = load_run_config(run_dir, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    model = load_model(run_dir, cfg, device)
    data = load_data(cfg)
    sc = cfg.score
    val = subset(to_pixels(data.val.images, device), sc.val_n, cfg.seed + VAL_SUBSET)
    test = subset(to_pixels(data.test.images, device), sc.test_n, cfg.seed + TEST_SUBSET)
    gen = generator(device, cfg.seed + PARZEN_DRAWS)
    with tqdm(total=4, desc="score", unit="stage", dynamic_ncols=True) as bar:
        samples, _ = inf.sample(model.operator, model.prior, sc.parzen_samples, model.steps, gen)
        prior_samples = model.prior.sample(sc.parzen_samples, gen)
        bar.update(1)
        chain_parzen = _parzen(samples, val, test, sc.sigma_grid(), sc.batch)
        bar.update(1)
        prior_parzen = _parzen(prior_samples, val, test, sc.sigma_grid(), sc.batch)
        bar.update(1)
        bound = _bound(model, val[: sc.bound_val_n],
                       subset(test, sc.bound_n, cfg.seed + BOUND_SUBSET), sc, device, cfg.seed)
        bar.update(1)
    report = {
        "dataset": cfg.data.name, "n_test": len(test), "parzen_samples": sc.parzen_samples,
        "chain": {"parzen": chain_parzen, "bound": bound},
        "prior": {"parzen": prior_parzen, "exact_ll": model.prior.log_prob(test).mean().item()},
    }
    report["score_s"] = time.perf_counter() - t0
    RunDir(Path(run_dir)).write_json(out_name, report)
    return report
