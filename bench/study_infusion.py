"""Infusion-training study: Parzen LL and lower bound of the infusion-trained chain vs the prior
alone vs the α = 0 ablation, on digits and Fashion-MNIST, over seeds, with small T / α sweeps;
and the targeted experiment on the infusion bound (4× the epochs, digits).

    nice -n 15 .venv/bin/python bench/study_infusion.py [--scale 0.1] [--part all|main|long]
    python bench/report.py     # the tables of docs/infusion.md, from docs/results/infusion/

--part main (~10 CPU-minutes of one AMD EPYC core at --scale 0.1): every variant over seeds; Fashion-MNIST
on a 10% subset with a 256-unit operator for 10 epochs, digits in full for 30 epochs; the K =
50/100 re-scoring of infusion and alpha0, and the bound-vs-K sweep of the seed-0 infusion runs.
--part long (~4 CPU-minutes): the targeted experiment, digits `infusion` and `alpha0` trained 4×
the epochs (seeds 0-2), scored like the main runs plus K = 100 on all 359 test images.
--scale 1 is the paper's size (all 54k train images, 1200 units, batch 512, 100 epochs, 10k
Parzen samples, full test set): a GPU job, to be written to another --raw folder.

Resumable at two levels: a run whose raw file exists is skipped; otherwise what its run
directory already holds (summary.json, score.json, score_tight.json, k_sweep.json) is kept and
an interrupted training is resumed. Each finished run writes one small JSON to --raw (overrides,
train seconds, scores, bounds per K and proposal, the per-epoch validation bounds; never
weights), seed-0 sample grids to --img, and <out>/results.md gets every table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import SampleArgs, load_infusion_config, load_run_config
from ssl_lab.gen.infusion_eval import image_grid, sample_run, score_run, subset
from ssl_lab.gen.infusion_model import generator, load_data, load_model, to_pixels
from ssl_lab.gen.infusion_train import train_infusion
from ssl_lab.runtime import pick_device, write_text_atomic

sys.path.insert(0, str(Path(__file__).parent))
import infusion_tables  # noqa: E402  (sibling script: the docs tables)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
# name → (overrides, seeds per dataset); "infusion" is the paper's default schedule.
VARIANTS = {
    "infusion": ({}, {"digits": SEEDS, "fashion-mnist": SEEDS}),
    "alpha0": ({"infusion.alpha0": 0.0, "infusion.omega": 0.0},
               {"digits": SEEDS, "fashion-mnist": SEEDS}),
    "T5": ({"infusion.steps": 5}, {"digits": SEEDS, "fashion-mnist": (0,)}),
    "T20": ({"infusion.steps": 20}, {"digits": SEEDS}),
    "alpha.05": ({"infusion.alpha0": 0.05, "infusion.omega": 0.05},
                 {"digits": SEEDS, "fashion-mnist": (0,)}),
    "alpha.1-const": ({"infusion.alpha0": 0.1, "infusion.omega": 0.0}, {"digits": SEEDS}),
}
# The targeted experiment (issue #27): is the infusion proposal's loose bound our short runs or
# the proposal? Same runs as the main ones, LONG_FACTOR × the epochs; digits only (cheap).
LONG_FACTOR = 4
LONG = {f"infusion-{LONG_FACTOR}x": "infusion", f"alpha0-{LONG_FACTOR}x": "alpha0"}
LONG_DATA = "digits"
# Re-scoring with many importance samples: at K = 10 the bound is far from tight (k_sweep).
TIGHT = {"digits": ["score.bound_samples=100", "score.bound_n=359"],
         "fashion-mnist": ["score.bound_samples=50", "score.bound_n=100"]}
TIGHT_VARIANTS = ("infusion", "alpha0", *LONG)
SWEEP_KS = {"digits": (1, 10, 100), "fashion-mnist": (1, 10, 50)}
SWEEP_N, SWEEP_STD, SWEEP_SEED = 100, 0.02, 11  # images, s of the infusion proposal, draws


@dataclass(frozen=True)
class Point:
    """One run of the study."""

    data: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.data}-{self.variant}-s{self.seed}"


def plan(part: str, datasets: list[str]) -> list[Point]:
    """The runs of `part` (main, long or all), main runs first."""
    main = [Point(d, v, s) for d in datasets for v, (_, seeds) in VARIANTS.items()
            for s in seeds.get(d, ())]
    long = [Point(LONG_DATA, v, s) for v in LONG for s in SEEDS]
    return {"main": main, "long": long, "all": main + long}[part]


def base_overrides(data: str, scale: float) -> dict[str, Any]:
    """Paper defaults at scale 1; smaller data, operator and budgets below it."""
    full = scale >= 1
    common = {"train.threads": 1, "train.log_every_steps": 10, "train.ckpt_every_steps": 200,
              "score.bound_samples": 10, "score.bound_val_n": 100 if not full else 500}
    if data == "digits":  # 1.3k 8×8 images: cheap at any scale
        return {**common, "data.name": "digits", "infusion.hidden": 256, "optim.batch_size": 128,
                "train.epochs": max(30, round(300 * scale)), "score.parzen_samples": 2000,
                "score.val_n": 1000, "score.bound_n": 359}
    return {**common, "data.name": "fashion-mnist", "data.fraction": min(1.0, scale),
            "infusion.hidden": min(1200, round(2560 * scale)),
            "optim.batch_size": 512 if scale >= 0.5 else 256,
            "train.epochs": max(10, round(100 * scale)),
            "score.parzen_samples": 10000 if full else 2000,
            "score.test_n": None if full else 2000, "score.val_n": 1000,
            "score.bound_n": 1000 if full else 300}


def run_overrides(p: Point, scale: float) -> dict[str, Any]:
    """The run's config keys (besides run.dir): the scale's, the variant's, the seed."""
    variant = LONG.get(p.variant, p.variant)
    overrides = {**base_overrides(p.data, scale), **VARIANTS[variant][0], "seed": p.seed}
    if p.variant in LONG:  # a constant lr: the first epochs are exactly the shorter run's
        overrides["train.epochs"] *= LONG_FACTOR
    return overrides


def _text(key: str, value: Any) -> str:
    value = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"{key}={value}"


def train(run_dir: Path, overrides: dict[str, Any]) -> None:
    """Train the run, resuming an interrupted one; a finished one (summary.json) is kept."""
    if (run_dir / "summary.json").is_file():
        return
    overrides = {**overrides, "run.dir": str(run_dir)}
    if (run_dir / "config.yaml").is_file():
        overrides["resume"] = True
    elif run_dir.exists():  # created but died before config.yaml: nothing to keep
        shutil.rmtree(run_dir)
    train_infusion(load_infusion_config(None, [_text(k, v) for k, v in overrides.items()]))


def cached_score(run_dir: Path, name: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """`score_run` with these score.* overrides, unless its output file is already there."""
    path = run_dir / name
    if path.is_file():
        return json.loads(path.read_text())
    return score_run(run_dir, list(overrides), name)


def k_sweep(run_dir: Path, ks: tuple[int, ...]) -> dict[str, Any]:
    """How the bound tightens with K on SWEEP_N test images, for both proposals (the same
    draws for every K); cached as RUN/k_sweep.json."""
    path = run_dir / "k_sweep.json"
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    cfg, device = load_run_config(run_dir), pick_device()
    model = load_model(run_dir, cfg, device)
    test = subset(to_pixels(load_data(cfg).test.images, device), SWEEP_N, 0)
    bounds = []
    for name, alphas in (("chain", torch.zeros_like(model.alphas)), ("infusion", model.alphas)):
        for k in ks:
            b = inf.lower_bound(model.operator, model.prior, test, alphas, k, SWEEP_STD,
                                cfg.score.batch, generator(device, SWEEP_SEED))
            bounds.append({"proposal": name, "K": k, "mean": b.mean().item(),
                           "median": b.median().item()})
    result = {"n": len(test), "std": SWEEP_STD, "bounds": bounds,
              "prior_exact": model.prior.log_prob(test).mean().item(),
              "seconds": time.perf_counter() - t0}
    write_text_atomic(path, json.dumps(result, indent=1))
    return result


def val_trace(run_dir: Path) -> list[list[float]]:
    """[epoch, val_bound, val_bound_infusion] at each epoch end (metrics.jsonl). A resumed run
    logs the steps after its last checkpoint twice: the later record of an epoch wins."""
    by_epoch = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "val_bound" in r and "val_bound_infusion" in r:
            by_epoch[round(r["epoch"])] = [round(r["epoch"]), r["val_bound"],
                                           r["val_bound_infusion"]]
    return [by_epoch[e] for e in sorted(by_epoch)]


def save_grids(run_dir: Path, data: str, variant: str, img_dir: Path) -> None:
    """Seed-0 samples (and for `infusion` its chain and the prior's samples) into docs/img."""
    tag = f"infusion_{data.replace('-', '')}_{variant.replace('.', '')}"
    # overwrite: a run interrupted after sampling must not be refused on its resume
    paths = sample_run(run_dir, SampleArgs(n=36, chains=6, seed=0, overwrite=True))
    img_dir.mkdir(parents=True, exist_ok=True)
    for name, path in paths.items():
        if name == "samples" or variant == "infusion":  # keep docs/img small
            shutil.copy(path, img_dir / f"{tag}_{name}.png")
    if variant == "infusion":  # the prior alone, for comparison
        cfg, device = load_run_config(run_dir), pick_device()
        prior = load_model(run_dir, cfg, device).prior
        image_grid(prior.sample(36, generator(device, 0)), 6,
                   img_dir / f"infusion_{data.replace('-', '')}_prior.png")


def measure(p: Point, run_dir: Path, scale: float, img_dir: Path) -> dict[str, Any]:
    """Train and score one run; its raw record (no weights)."""
    cpu = time.process_time()
    overrides = run_overrides(p, scale)
    train(run_dir, overrides)
    summary = json.loads((run_dir / "summary.json").read_text())
    record = {"dataset": p.data, "variant": p.variant, "seed": p.seed, "scale": scale,
              "overrides": overrides, "epochs": summary["epochs"], "steps": summary["steps"],
              "train_s": summary["train_time_s"],
              "stopped_by_budget": summary["stopped_by_budget"],
              "score": cached_score(run_dir, "score.json"), "trace": val_trace(run_dir)}
    if p.variant in TIGHT_VARIANTS:
        tight = cached_score(run_dir, "score_tight.json",
                             (*TIGHT[p.data], f"score.bound_stds={SWEEP_STD}"))
        record["tight"] = {**tight["chain"]["bound"], "score_s": tight["score_s"]}
    if p.variant == "infusion" and p.seed == 0:
        record["k_sweep"] = k_sweep(run_dir, SWEEP_KS[p.data])
    if p.variant in VARIANTS and p.seed == 0:
        save_grids(run_dir, p.data, p.variant, img_dir)
    # CPU seconds of the invocation that finished the run (less than its total if resumed)
    record["cpu_s"] = time.process_time() - cpu
    return record


def run_point(p: Point, out: Path, raw: Path, scale: float, img_dir: Path) -> dict[str, Any]:
    """The run's raw record: read if it exists (nothing is loaded or trained), else measured
    and written (whole or not at all)."""
    path = raw / f"{p.name}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record["scale"] != scale:
            raise SystemExit(f"{path} is a --scale {record['scale']} run, not {scale}: give "
                             "another --raw folder")
        return record
    record = measure(p, out / p.name, scale, img_dir)
    raw.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))
    return record


def study(points: list[Point], out: Path, raw: Path, scale: float, img_dir: Path) -> None:
    for p in points:
        r = run_point(p, out, raw, scale, img_dir)
        s = r["score"]
        print(f"{p.name}: Parzen {s['chain']['parzen']['test_ll']:.1f} "
              f"bound {s['chain']['bound']['test_bound']:.1f} "
              f"(prior Parzen {s['prior']['parzen']['test_ll']:.1f}, "
              f"exact {s['prior']['exact_ll']:.1f})", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--part", choices=("all", "main", "long"), default="all")
    parser.add_argument("--out", type=Path, default=Path("runs/study_infusion"))
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "infusion")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--data", nargs="*", default=["digits", "fashion-mnist"],
                        help="datasets of the main part (the long part is digits)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    study(plan(args.part, args.data), args.out, args.raw, args.scale, args.img)
    md = [f"## {name}\n\n{fn(args.raw)}\n" for name, fn in infusion_tables.TABLES.items()]
    (args.out / "results.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
