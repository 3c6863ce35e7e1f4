"""Train every config in configs/ on Fashion-MNIST with the main job's budget, then tabulate the
per-layer linear probes (the Guillotine gap between backbone and projector layers).

    python bench/methods_table.py [--out runs/methods] [--minutes 5] [--configs a,b]
        [--raw docs/results/methods_5min] [key=value ...]

Each config is an ordinary run directory under --out; finished ones (summary.json present) are
skipped, so the script resumes. The markdown table goes to stdout and to --out/methods.md.

With --minutes M every config gets the same wall-clock budget: a 60-step run of its training
loop (2 epochs of a 30-step subset, first log window skipped) measures its views/s,
`train.epochs` is set to the epochs that fit in M minutes at that speed, rounded down to 0.01
(fractional: the cosine schedule then ends on time), and `train.budget_s` = 60 M stops a run
that turns out slower. The epochs are written to --out/epochs.json, so a resumed or repeated run
trains the same schedule. --raw keeps each run's summary.json, eval.json and config.yaml (small
files, no weights) under RAW/<config>/seed<seed>/ and epochs.json in the repository; a repeat
with another `seed=` and the same epochs.json (copy it into the new --out first) adds seeds,
and `python bench/methods_seeds.py table --raw RAW` gives mean ± std over them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from ssl_lab.config import load_config
from ssl_lab.train_loop import train
from ssl_lab.train_setup import load_training_data

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import full_loop_steps  # noqa: E402

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def run_all(out: Path, overrides: list[str], run: bool = True, minutes: float | None = None,
            only: list[str] | None = None) -> list[tuple[str, dict]]:
    results = []
    for path in CONFIGS:
        if path.stem == "default" or only and path.stem not in only:
            continue
        run_dir = out / path.stem
        if not (run_dir / "summary.json").is_file():
            if not run:
                continue
            extra = budget_overrides(path, overrides, minutes, out) if minutes else []
            resume = ["resume=true"] if (run_dir / "config.yaml").is_file() else []
            train(load_config(path, [f"run.dir={run_dir}", *overrides, *extra, *resume]))
        results.append((path.stem, json.loads((run_dir / "summary.json").read_text())))
    return results


def budget_overrides(path: Path, overrides: list[str], minutes: float, out: Path) -> list[str]:
    """train.epochs that fit in `minutes` at this config's measured speed, and the hard stop."""
    record = out / "epochs.json"
    fitted = json.loads(record.read_text()) if record.is_file() else {}
    if path.stem not in fitted:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(path, [*overrides, f"run.dir={tmp}/r", "eval.enabled=false",
                                     "train.epochs=2", "train.log_every_steps=10",
                                     "train.ckpt_every_steps=100000"])
            cfg.train.budget_s = None
            # the loop counts every view it trains on, multi-crop ones included
            views_per_step = cfg.optim.batch_size * (cfg.views.n + cfg.views.small_n)
            per_epoch = len(load_training_data(cfg).train.images) // cfg.optim.batch_size \
                * views_per_step
            views_per_s = full_loop_steps(cfg, 30)
        fitted[path.stem] = {"views_per_s": views_per_s, "views_per_epoch": per_epoch,
                             "epochs": max(0.01, math.floor(6000 * minutes * views_per_s / per_epoch)
                                           / 100)}
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(fitted, indent=1))
    return [f"train.epochs={fitted[path.stem]['epochs']}", f"train.budget_s={60 * minutes}"]


def keep_raw(out: Path, raw: Path, names: list[str]) -> None:
    """Copy each run's small result files to raw/<config>/seed<seed>/ (the layout
    `bench/methods_seeds.py table` reads) and the fitted epochs to raw/epochs.json."""
    for name in names:
        seed = load_config(out / name / "config.yaml").seed
        keep = raw / name / f"seed{seed}"
        keep.mkdir(parents=True, exist_ok=True)
        for file in ("summary.json", "eval.json", "config.yaml"):
            shutil.copy(out / name / file, keep / file)
    if (out / "epochs.json").is_file():
        shutil.copy(out / "epochs.json", raw / "epochs.json")


def table(results: list[tuple[str, dict]]) -> str:
    # every config's layers, in first-seen order: a deeper head (DINO's proj4) gets its column
    layers = list(dict.fromkeys(k for _, s in results for k in s["probes"]))
    head = ("| config | " + " | ".join(layers)
            + " | best (val) | kNN@best | epochs | train s | views/s |")
    lines = [head, "|" + "---|" * (len(layers) + 6)]
    for name, s in results:
        cells = [f"{100 * s['probes'][k]:.1f}" if k in s["probes"] else "-" for k in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['best_layer']} | "
                     f"{100 * s['knn_top1']:.1f} | {_epochs(s)} | {s['train_s']:.0f} | "
                     f"{s['views_per_s']:.0f} |")
    return "\n".join(lines)


def _epochs(summary: dict) -> str:
    """Epochs trained; a `*` marks a run that train.budget_s stopped before its schedule ended."""
    return f"{summary['epochs']:.2f}" + ("*" if summary.get("stopped_by_budget") else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--no-run", action="store_true", help="only tabulate finished runs")
    parser.add_argument("--minutes", type=float, help="wall-clock budget per config (see above)")
    parser.add_argument("--configs", help="comma-separated config names (default: all)")
    parser.add_argument("--raw", type=Path, help="keep each run's result files here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    only = args.configs.split(",") if args.configs else None
    results = run_all(args.out, args.overrides, not args.no_run, args.minutes, only)
    if args.raw:
        keep_raw(args.out, args.raw, [name for name, _ in results])
    text = table(results)
    (args.out / "methods.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
