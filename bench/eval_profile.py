"""Where offline evaluation time goes: each metric of each layer of a run's encoder, timed;
or (--cold) the shares of a whole cold `ssl-lab eval` under cProfile.

    python bench/eval_profile.py RUN_DIR [--threads 2] [--random-init] [key=value ...]
    python bench/eval_profile.py RUN_DIR --cold [--cpu-time] [--save OUT.prof] [key=value ...]

Default: loads the run's dataset and encoder the way `ssl-lab eval` does, extracts the
features once, then times the linear probe, kNN, binarised probe and RankMe per layer (the same
calls as `evaluate_layer`). Prints a markdown table; nothing is written.

--cold: evaluates a copy of RUN_DIR (the run itself is not touched) with an empty baseline
cache, so the random-init and raw-pixel baselines are computed as in a first run, under
cProfile, and prints each part's share of the total. Shares stay meaningful on a shared
machine, where wall times do not; `--save` keeps the profile for `python -m pstats`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ssl_lab.config import load_config
from ssl_lab.eval import metrics as M
from ssl_lab.eval.run import SPLITS, eval_precision, evaluate_run, features_by_split, probe_data
from ssl_lab.models.encoder import encoder_from_spec, load_encoder, read_spec
from ssl_lab.runtime import pick_device


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


# (label, function name): cumulative time of each part of a cold eval (functions of
# ssl_lab/eval/, wherever they are defined, so an older tree is profiled alike)
PARTS = (("feature extraction", "extract_features"),
         ("linear probes (+ binarised, pixels)", "linear_probe"),
         ("linear probes, blocked", "linear_probe_rows"),
         ("kNN", "knn_classify"),
         ("  of which top-k selection", "_topk_lowest_index_ties"),
         ("kNN, blocked", "knn_rows"),
         ("RankMe", "rankme"),
         ("raw-pixel baseline", "pixel_baseline"),
         ("augmented linear evaluation", "augmented_linear"))


def shares(stats: pstats.Stats) -> list[tuple[str, float, float]]:
    """(part, seconds, share of the total) for the PARTS that ran."""
    total = stats.total_tt
    rows = []
    for label, name in PARTS:
        seconds = sum(entry[3] for (file, _, func), entry in stats.stats.items()
                      if func == name and "ssl_lab/eval/" in file)
        if seconds:
            rows.append((label, seconds, seconds / total))
    return rows


def cold(run_dir: Path, overrides: list[str], save: Path | None, cpu_time: bool) -> None:
    """cProfile of a cold `ssl-lab eval` of a copy of run_dir; prints the shares."""
    work = Path(tempfile.mkdtemp(prefix="eval-profile-"))
    try:
        shutil.copytree(run_dir, work / "run")
        os.environ["SSL_LAB_CACHE"] = str(work / "cache")  # cold: baselines computed
        # process CPU time instead of wall time: other processes' load barely changes it
        # (with 1 thread; with more, threads waiting on each other count too)
        profile = cProfile.Profile(time.process_time) if cpu_time else cProfile.Profile()
        profile.runcall(evaluate_run, work / "run", overrides)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if save:
        profile.dump_stats(save)
    stats = pstats.Stats(profile)
    clock = "CPU" if cpu_time else "wall"
    print(f"cold `ssl-lab eval` under cProfile: {stats.total_tt:.1f} {clock} s in all "
          f"({torch.get_num_threads()} threads)\n\n| part | s | share |\n|---|---:|---:|")
    for label, seconds, share in shares(stats):
        print(f"| {label} | {seconds:.1f} | {100 * share:.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-init", action="store_true", help="profile the untrained encoder")
    parser.add_argument("--cold", action="store_true", help="cProfile a whole cold `ssl-lab eval`")
    parser.add_argument("--save", type=Path, help="--cold: write the profile here")
    parser.add_argument("--cpu-time", action="store_true", help="--cold: profile CPU time")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.precision=train")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    torch.set_num_threads(args.threads)
    if args.cold:
        return cold(args.run_dir, args.overrides, args.save, args.cpu_time)
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
