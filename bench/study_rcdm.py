"""RCDM study: what does a Fashion-MNIST SimCLR encoder keep at its backbone vs its projector?

Stages (each skipped when its output exists, resumed when it was interrupted):
  1. a short SimCLR run (¼-width ResNet-18, the library default) on a subset of Fashion-MNIST;
  2. three RCDMs conditioned on: the trained backbone output, the trained projector output (z),
     and the backbone output of a random-init encoder of the same architecture;
  3. `score` for each (retrieval among N held-out test images, diversity) and sample grids.

    nice -n 15 .venv/bin/python bench/study_rcdm.py            # scale 1: ~35-40 CPU-minutes
    .venv/bin/python bench/study_rcdm.py --scale 2 --threads 8  # 32×32 (28 padded), wider UNet

`--scale` multiplies the canvas (16·s, content 14·s), the UNet width (32·s) and the training
length; scale ≥ 2 also uses two res-blocks per level. Results: <out>/study.json, grids copied to
docs/img/rcdm_*.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(timings: dict, name: str, path: Path, fn) -> None:
    """Run a stage and record its wall and CPU seconds (kept across resumed invocations)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    prev = timings.get(name, {"wall_s": 0.0, "cpu_s": 0.0})
    timings[name] = {"wall_s": prev["wall_s"] + time.perf_counter() - wall,
                     "cpu_s": prev["cpu_s"] + time.process_time() - cpu}
    path.write_text(json.dumps(timings, indent=1))


def encoder_stage(run: Path, scale: int, threads: int) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.train_loop import train

    resume = (run / "config.yaml").is_file()
    train(load_config(None, [
        f"run.dir={run}", f"resume={str(resume).lower()}", "seed=0",
        "data.name=fashion-mnist", f"data.fraction={min(1.0, 0.25 * scale)}",
        f"train.epochs={3 * scale}", f"train.threads={threads}", "train.ckpt_every_steps=100",
        # the lr, last_width and view-size defaults of the documented run (the main job's have
        # moved since)
        "optim.lr=0.002", "model.last_width=512", "views.size=28", "eval.enabled=false"]))


def rcdm_overrides(scale: int, threads: int) -> list[str]:
    return [f"unet.size={16 * scale}", f"unet.content={14 * scale}",
            f"unet.channels={32 * scale}-{64 * scale}-{64 * scale}",
            f"unet.layers_per_block={1 if scale == 1 else 2}",
            f"data.fraction={min(1.0, 0.25 * scale)}", f"train.epochs={6 * scale}",
            "train.batch_size=64", "train.lr=0.001", "train.warmup_steps=100",
            "train.ema_decay=0.995", f"train.threads={threads}", "train.ckpt_every_steps=200",
            "train.log_every_steps=25", "sample.steps=25", "sample.k=4", "score.n=200", "seed=0"]


def rcdm_stage(run: Path, encoder: Path, layer: str, random_init: bool, scale: int,
               threads: int) -> None:
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    resume = (run / "config.yaml").is_file()
    train_rcdm(load_train_config(str(encoder), [
        f"run.dir={run}", f"resume={str(resume).lower()}", f"layer={layer}",
        f"random_init={str(random_init).lower()}", *rcdm_overrides(scale, threads)]))


def grid_stage(run: Path) -> None:
    from ssl_lab.gen.rcdm_config import SampleArgs
    from ssl_lab.gen.rcdm_sample import sample_command

    shutil.rmtree(run / "study_samples", ignore_errors=True)  # a partial one (out= must be new)
    sample_command(run, SampleArgs(split="test", n=8, k=4, steps=50, interp=8,
                                   out=str(run / "study_samples")))


def docs_images(run: Path, name: str, docs: Path) -> None:
    """Small PNGs for docs/ from the saved arrays (no sampling): conditioning | k samples, and
    the interpolation rows."""
    from ssl_lab.gen.rcdm import save_grid

    arrays = np.load(run / "study_samples" / "samples.npz")
    cond, samples, interp = arrays["conditioning"], arrays["samples"], arrays["interp"]
    save_grid([[cond[i], *samples[i]] for i in range(len(cond))], docs / f"rcdm_{name}.png",
              scale=3)
    save_grid([[cond[0], *row, cond[1]] for row in interp], docs / f"rcdm_{name}_interp.png",
              scale=3, gap_after=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study_rcdm")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ssl_lab.gen.rcdm_config import ScoreArgs
    from ssl_lab.gen.rcdm_score import score_command

    out = args.out / f"scale{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    tpath = out / "timings.json"
    timings = json.loads(tpath.read_text()) if tpath.is_file() else {}
    encoder = out / "encoder"
    if not (encoder / "summary.json").is_file():
        timed(timings, "encoder", tpath, lambda: encoder_stage(encoder, args.scale, args.threads))
    from ssl_lab.models.encoder import read_spec

    proj = read_spec(encoder)["model"]["projector"]
    z_layer = f"proj{len(proj.split('-'))}"
    conditions = {"backbone": ("backbone", False), "projector": (z_layer, False),
                  "random_init": ("backbone", True)}
    results = {}
    for name, (layer, random_init) in conditions.items():
        run = out / f"rcdm-{name}"
        if not (run / "summary.json").is_file():
            timed(timings, f"train_{name}", tpath, lambda run=run, layer=layer, ri=random_init:
                  rcdm_stage(run, encoder, layer, ri, args.scale, args.threads))
        if not (run / "score.json").is_file():
            timed(timings, f"score_{name}", tpath,
                  lambda run=run: score_command(run, ScoreArgs()))
        if not (run / "study_samples" / "samples.npz").is_file():
            timed(timings, f"grids_{name}", tpath, lambda run=run: grid_stage(run))
        docs_images(run, name if args.scale == 1 else f"{name}_s{args.scale}", args.docs)
        results[name] = {"layer": layer, "random_init": random_init,
                         "score": json.loads((run / "score.json").read_text()),
                         "train": json.loads((run / "summary.json").read_text())}
    enc_summary = json.loads((encoder / "summary.json").read_text())
    study = {"scale": args.scale, "threads": args.threads, "encoder": enc_summary,
             "conditions": results, "timings": timings,
             "total_cpu_s": sum(t["cpu_s"] for t in timings.values()),
             "total_wall_s": sum(t["wall_s"] for t in timings.values())}
    (out / "study.json").write_text(json.dumps(study, indent=1))
    print(table(study))
    return 0


def table(study: dict) -> str:
    lines = ["| conditioning | layer | mean rank | median rank | top-1 | top-5 | N | chance mean "
             "rank / top-1 / top-5 | pixel-space mean rank / top-1 | diversity | train loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in study["conditions"].items():
        r, s = row["score"]["retrieval"], row["score"]
        lines.append(
            f"| {name} | {row['layer']} | {r['mean_rank']:.1f} | {r['median_rank']:.1f} | "
            f"{100 * r['top1']:.1f}% | {100 * r['top5']:.1f}% | {r['n']} | "
            f"{r['chance_mean_rank']:.1f} / {100 * r['chance_top1']:.1f}% / "
            f"{100 * r['chance_top5']:.1f}% | {s['retrieval_pixels']['mean_rank']:.1f} / "
            f"{100 * s['retrieval_pixels']['top1']:.1f}% | "
            f"{s['diversity']['mean']:.3f} | {row['train']['final_loss']:.4f} |")
    lines.append(f"total: {study['total_cpu_s'] / 60:.1f} CPU-min, "
                 f"{study['total_wall_s'] / 60:.1f} wall-min")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
