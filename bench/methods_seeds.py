"""Train configs over several seeds at one fixed schedule, keep each run's raw result files in the
repository, and tabulate the per-layer linear probes as mean ± std over the seeds.

    python bench/methods_seeds.py run --configs dino,mocov3,simsiam --seeds 0,1,2 \\
        [--runs runs/methods-seeds] [--raw docs/results/methods] [key=value ...]
    python bench/methods_seeds.py table [--raw docs/results/methods]

(`run` = `train` then `eval`; the two halves can also be run one after the other.)

`run` trains every (config, seed) as an ordinary run directory under --runs (finished ones are
skipped, interrupted ones resumed), evaluates each with `ssl-lab eval` (every layer, no
baselines), then copies its summary.json, eval.json and config.yaml to --raw/<config>/seed<k>/
(small JSON/YAML, no weights). `table` reads only those raw files, so the
table in docs can be regenerated (and checked) from what is committed. The schedule is whatever
the configs and overrides say (by default the main job's 2.25 epochs): a fixed number of steps,
so the accuracies do not depend on how fast the machine was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def points(configs: list[str], seeds: list[int], runs: Path) -> list[tuple[str, int, Path]]:
    return [(name, seed, runs / name / f"seed{seed}") for name in configs for seed in seeds]


def train_all(todo: list[tuple[str, int, Path]], overrides: list[str]) -> None:
    """Train every (config, seed) with eval.enabled=false; finished ones are skipped."""
    from ssl_lab.config import load_config
    from ssl_lab.train_loop import train

    for name, seed, run_dir in todo:
        if not (run_dir / "summary.json").is_file():
            resume = ["resume=true"] if (run_dir / "config.yaml").is_file() else []
            train(load_config(ROOT / "configs" / f"{name}.yaml", [
                f"run.dir={run_dir}", f"seed={seed}", "eval.enabled=false", *overrides, *resume]))


def eval_all(todo: list[tuple[str, int, Path]], raw: Path) -> None:
    """`ssl-lab eval` of every run (every layer, no baselines: they do not depend on the run),
    then its raw files copied to raw/<config>/seed<k>/."""
    from ssl_lab.eval.run import evaluate_run

    for name, seed, run_dir in todo:
        if not (run_dir / "eval.json").is_file():
            evaluate_run(run_dir, ["eval.baselines=false"])
        keep = raw / name / f"seed{seed}"
        keep.mkdir(parents=True, exist_ok=True)
        for file in ("summary.json", "eval.json", "config.yaml"):
            shutil.copy(run_dir / file, keep / file)


def table(raw: Path) -> str:
    """Per-layer linear-probe test top-1 (mean ± sample std over seeds), the best layer chosen
    on val (argmax of linear_val), the kNN test top-1 at that layer."""
    rows = []
    layers: list[str] = []
    for cfg_dir in sorted(p for p in raw.iterdir() if p.is_dir()):
        seeds = sorted(cfg_dir.glob("seed*"))
        evals = [json.loads((s / "eval.json").read_text()) for s in seeds]
        summaries = [json.loads((s / "summary.json").read_text()) for s in seeds]
        for k in (k for e in evals for k in e["layers"]):
            if k not in layers:  # the union over configs, in first-seen order
                layers.append(k)
        rows.append((cfg_dir.name, evals, summaries))
    head = "| config | seeds | " + " | ".join(layers) + " | best layer (val) | kNN@best | epochs |"
    lines = [head, "|" + "---|" * (len(layers) + 5)]
    for name, evals, summaries in rows:
        cells = [_mean_std([e["layers"][k]["linear_test"] for e in evals if k in e["layers"]])
                 for k in layers]
        best = ", ".join(sorted({e["best_layer"] for e in evals}))
        knn = _mean_std([e["layers"][e["best_layer"]]["knn_test"] for e in evals])
        # `*`: train.budget_s stopped that run before its schedule ended (bench/methods_table.py)
        epochs = ", ".join(sorted({f"{s['epochs']:.2f}" + ("*" if s.get("stopped_by_budget")
                                                           else "") for s in summaries}))
        lines.append(f"| {name} | {len(evals)} | " + " | ".join(cells)
                     + f" | {best} | {knn} | {epochs} |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("run", "train", "eval", "table"))
    parser.add_argument("--configs", default="dino,mocov3,simsiam")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", type=Path, default=Path("runs/methods-seeds"))
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "methods")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    todo = points(args.configs.split(","), [int(s) for s in args.seeds.split(",")], args.runs)
    if args.command in ("run", "train"):
        train_all(todo, args.overrides)
    if args.command in ("run", "eval"):
        eval_all(todo, args.raw)
    if args.command in ("run", "eval", "table"):
        print(table(args.raw))


if __name__ == "__main__":
    main()
