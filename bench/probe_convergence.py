"""Is the linear probe converged? The same probe at several L-BFGS budgets, on a run's layers and
on raw pixels.

    python bench/probe_convergence.py RUN_DIR [--layers backbone,proj1] [--iters 15,50,200]

The offline protocol stops each weight decay's fit after `metrics.MAX_ITER` iterations; if more
iterations moved the chosen val/test accuracy, every probe number (and the gap to pixels) would
be an artefact of the budget. Features are extracted as `ssl-lab eval` does (the run's config,
eval.precision included). Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ssl_lab.config import load_config
from ssl_lab.eval.metrics import linear_probe
from ssl_lab.eval.run import SPLITS, eval_precision, features_by_split, pixel_features, probe_data
from ssl_lab.models.encoder import load_encoder
from ssl_lab.runtime import pick_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--layers", default="backbone,proj1")
    parser.add_argument("--iters", default="15,50,200", help="L-BFGS iterations per weight decay")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.run_dir / "config.yaml")
    data = probe_data(cfg)
    device = pick_device()
    layers = args.layers.split(",")
    feats = features_by_split(load_encoder(args.run_dir), data, layers, cfg.eval.batch_size, device,
                              eval_precision(cfg, device))
    inputs = {name: {s: feats[s][name] for s in SPLITS} for name in layers}
    inputs["pixels"] = pixel_features(data)
    labels = {s: torch.from_numpy(getattr(data, s).labels) for s in SPLITS}
    print("| input | iterations per wd | chosen wd | val top-1 | test top-1 | seconds |\n"
          "|---|---:|---:|---:|---:|---:|")
    for name, x in inputs.items():
        for iters in (int(i) for i in args.iters.split(",")):
            start = time.perf_counter()
            r = linear_probe(x["train"], labels["train"], x["val"], labels["val"], x["test"],
                             labels["test"], num_classes=data.num_classes[0], max_iter=iters)
            print(f"| {name} | {iters} | {r['weight_decay']:g} | {100 * r['val']:.2f} | "
                  f"{100 * r['test']:.2f} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
