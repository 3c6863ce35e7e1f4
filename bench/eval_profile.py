"""Where offline evaluation time goes: each metric of each layer of a run's encoder, timed.

    python bench/eval_profile.py RUN_DIR [--threads 2] [--random-init] [key=value ...]

Loads the run's dataset and encoder the way `ssl-lab eval` does, extracts the features once,
then times the linear probe, kNN, binarised probe and RankMe per layer (the same calls as
`evaluate_layer`). Prints a markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ssl_lab.config import load_config
from ssl_lab.eval import metrics as M
from ssl_lab.eval.run import (
    SPLITS,
    encoder_from_spec,
    eval_precision,
    features_by_split,
    load_encoder,
    probe_data,
    read_spec,
)
from ssl_lab.runtime import pick_device


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-init", action="store_true", help="profile the untrained encoder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.precision=train")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    torch.set_num_threads(args.threads)
    cfg = load_config(args.run_dir / "config.yaml", args.overrides)
    data = probe_data(cfg)
    encoder = encoder_from_spec(read_spec(args.run_dir)) if args.random_init else load_encoder(args.run_dir)
    device = pick_device()
    start = time.perf_counter()
    feats = features_by_split(encoder, data, encoder.layer_names, cfg.eval.batch_size, device,
                              eval_precision(cfg, device))
    print(f"features of {sum(len(getattr(data, s).images) for s in SPLITS)} images, "
          f"{len(encoder.layer_names)} layers: {time.perf_counter() - start:.1f} s\n")
    y = {s: torch.from_numpy(getattr(data, s).labels) for s in SPLITS}
    k = data.num_classes[0]
    print("| layer | D | linear s | kNN s | binarised s | RankMe s |\n|---|---:|---:|---:|---:|---:|")
    totals = [0.0] * 4
    for name in encoder.layer_names:
        tr, va, te = (feats[s][name] for s in SPLITS)
        row = [timed(M.linear_probe, tr, y["train"], va, y["val"], te, y["test"], num_classes=k),
               timed(M.knn_classify, tr, y["train"], te, y["test"], num_classes=k,
                     k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature),
               timed(M.linear_probe, (tr > 0).float(), y["train"], (va > 0).float(), y["val"],
                     (te > 0).float(), y["test"], num_classes=k),
               timed(M.rankme, te)]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        print(f"| {name} | {tr.shape[1]} | " + " | ".join(f"{t:.1f}" for t in row) + " |")
    print("| all | | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")


if __name__ == "__main__":
    main()
