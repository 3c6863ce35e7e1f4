"""`ssl-lab rcdm score RUN key=value ...`: faithfulness by retrieval and diversity on n held-out
images -> RUN/score.json (with score/grid.png and score/samples.npz)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ssl_lab.gen import rcdm
from ssl_lab.gen.rcdm_build import features, load_run
from ssl_lab.gen.rcdm_config import ScoreArgs, check_args
from ssl_lab.gen.rcdm_sample import held_out, pick, sample_images, save_npz, save_sample_grid
from ssl_lab.rundir import RunDir


def pixel_vectors(images: np.ndarray, mean: np.ndarray) -> torch.Tensor:
    """Pixels minus the gallery's mean image: cosine on raw pixels would otherwise be dominated
    by what every image shares (the black background)."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    return torch.from_numpy(x - mean)


def score_command(run_dir: Path, args: ScoreArgs) -> dict:
    """Faithfulness by retrieval and diversity on n held-out images; writes score.json."""
    start = time.perf_counter()
    check_args(args)
    built = load_run(run_dir)
    s, sc = built.cfg.sample, built.cfg.score
    settings = {"split": pick(args.split, sc.split), "k": pick(args.k, s.k),
                "steps": pick(args.steps, s.steps), "seed": pick(args.seed, s.seed),
                "eta": pick(args.eta, s.eta)}
    images, idx = held_out(built, settings["split"], pick(args.n, sc.n))
    n, k = len(images), settings["k"]
    result = sample_images(built, images, k, settings["steps"], settings["seed"],
                           settings["eta"], pick(args.batch_size, s.batch_size))
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
              "encoder": built.spec["encoder"], **settings,
              "retrieval": rcdm.retrieval_report(rcdm.retrieval_ranks(query, gallery, target), n),
              "retrieval_pixels": rcdm.retrieval_report(pix_ranks, n),
              "diversity": {"mean": div.mean().item(), "median": rcdm.median(div)},
              "data_pixel_std": data_std}
    out = run_dir / "score"
    save_sample_grid(result, out / "grid.png", rows=args.grid_rows)
    meta = {key: value for key, value in report.items() if not isinstance(value, dict)}
    save_npz(out / "samples.npz", {**result, "indices": idx, "diversity": div.numpy()}, meta)
    report["score_s"] = time.perf_counter() - start
    RunDir(Path(run_dir)).write_json("score.json", report)
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
