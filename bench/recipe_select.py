"""The main job's recipe, chosen on the validation split: candidates around the defaults, three
seeds each, raw files kept, then a val table that chooses and a test table of the choice only.

    python bench/recipe_select.py run [--seeds 0,1,2] [--runs runs/recipe] \\
        [--raw docs/results/recipe] [--only NAME,...]
    python bench/recipe_select.py table [--raw docs/results/recipe]

Every candidate is the main job (`ssl-lab train` with the defaults, two threads, every layer
probed, the random-init and raw-pixel baselines) with one setting changed, at the main job's
2.25 epochs: a fixed number of steps, so an accuracy does not depend on the machine's speed.
The candidates change one setting at a time: 2 views of 256 images (the same 512 views per
step) at the same epochs (half the steps and compute) and at the same steps (4.5 epochs, warm-up
1 epoch = the default's 210 warm-up steps), the learning rate halved and doubled, and 28-px
(full-size) views at 2 epochs, about the default's training time. Training times are in the
table; a candidate whose fastest seed trains more than 10 % longer than the default's fastest
would not fit the main job's 5 minutes and is not eligible, whatever its accuracy (the fastest
run, as timeit takes the minimum: slower ones carry the machine's drift, which moved runs of
the default's compute from 127 to 152 s here).

Selection rule (its val part decided before the runs; the time filter's fastest-seed form was
settled during them, see above): each run's layer is the one with the best val linear top-1
(as the main job picks it); a candidate's score is the mean over seeds of that val top-1.
The best-scoring eligible candidate replaces the default only when its mean exceeds the
default's by more than the larger of the two seed stds; otherwise the default stays (the
difference is within noise). Test accuracies are printed for the chosen recipe only.
Finished runs are skipped (their raw files are what `table` reads), interrupted ones resumed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from methods_seeds import _mean_std  # a sibling script: the seeds tables' mean ± std

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = "default"
CANDIDATES: dict[str, list[str]] = {
    DEFAULT: [],
    "views-2x256": ["views.n=2", "optim.batch_size=256"],  # half the steps and compute
    # the same steps, views per step, compute and warm-up steps as the default
    "views-2x256-4.5ep": ["views.n=2", "optim.batch_size=256", "train.epochs=4.5",
                          "optim.warmup_epochs=1"],
    "lr-0.004": ["optim.lr=0.004"],
    "lr-0.016": ["optim.lr=0.016"],
    # full-size views cost more per step: 2 epochs train about as long as the default's 2.25
    # (1.25 epochs, tried first, trained in 65 % of the default's time)
    "views-28px-2ep": ["views.size=28", "train.epochs=2"],
}
FILES = ("summary.json", "eval.json", "config.yaml")
# A candidate may train at most this much longer than the default: the default is what fits
# 5 minutes on a CPU without AVX-512 (docs/RESULTS.md), with little to spare.
TIME_SLACK = 1.10


def run_all(names: list[str], seeds: list[int], runs: Path, raw: Path) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.train_loop import train

    for name in names:
        for seed in seeds:
            keep = raw / name / f"seed{seed}"
            if all((keep / f).is_file() for f in FILES):
                continue
            run_dir = runs / name / f"seed{seed}"
            if not (run_dir / "summary.json").is_file():
                resume = ["resume=true"] if (run_dir / "config.yaml").is_file() else []
                train(load_config(None, [f"run.dir={run_dir}", f"seed={seed}",
                                         *CANDIDATES[name], *resume]))
            keep.mkdir(parents=True, exist_ok=True)
            for file in FILES:
                shutil.copy(run_dir / file, keep / file)


def load(raw: Path) -> dict[str, list[dict]]:
    """{candidate: [summary of each seed, with its "seed"]} in CANDIDATES order, the candidates
    with raw files."""
    out = {}
    for name in CANDIDATES:
        seeds = sorted((raw / name).glob("seed*")) if (raw / name).is_dir() else []
        if seeds:
            out[name] = [json.loads((s / "summary.json").read_text())
                         | {"seed": int(s.name.removeprefix("seed"))} for s in seeds]
    return out


def _eligible(runs: dict[str, list[dict]], name: str) -> bool:
    limit = TIME_SLACK * min(x["train_s"] for x in runs[DEFAULT])
    return min(x["train_s"] for x in runs[name]) <= limit


def _val(summary: dict) -> float:
    return summary["probes_val"][summary["best_layer"]]


def _stats(values: list[float]) -> tuple[float, float]:
    pct = [100 * v for v in values]
    return statistics.mean(pct), statistics.stdev(pct) if len(pct) > 1 else 0.0


def choose(runs: dict[str, list[dict]]) -> tuple[str, str]:
    """(the chosen candidate, why), by the module docstring's rule."""
    eligible = {n: s for n, s in runs.items() if _eligible(runs, n)}
    best = max(eligible, key=lambda n: _stats([_val(x) for x in eligible[n]])[0])
    if best == DEFAULT:
        return DEFAULT, "the default has the best mean val top-1"
    (m_best, s_best), (m_def, s_def) = (_stats([_val(x) for x in runs[n]])
                                        for n in (best, DEFAULT))
    margin = m_best - m_def
    if margin > max(s_best, s_def):
        return best, f"{best} beats the default on val by {margin:.2f} > max std {max(s_best, s_def):.2f}"
    return DEFAULT, (f"the best candidate ({best}) is {margin:.2f} points above the default on "
                     f"val, within the seeds' spread ({max(s_best, s_def):.2f}): the default stays")


def val_table(raw: Path) -> str:
    runs = load(raw)
    lines = ["| candidate | overrides | seeds | val top-1 at the val-chosen layer | layer(s) "
             "| val at backbone | training time | eligible (time) |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    for name, summaries in runs.items():
        layers = ", ".join(sorted({s["best_layer"] for s in summaries}))
        train_s = [s["train_s"] for s in summaries]
        lines.append(
            f"| {name} | {' '.join(f'`{o}`' for o in CANDIDATES[name]) or '(none)'} "
            f"| {len(summaries)} | {_mean_std([_val(s) for s in summaries])} | {layers} "
            f"| {_mean_std([s['probes_val']['backbone'] for s in summaries])} "
            f"| {min(train_s):.0f}–{max(train_s):.0f} s "
            f"| {'yes' if _eligible(runs, name) else 'no'} |")
    chosen, why = choose(runs)
    return "\n".join(lines) + f"\n\nChosen on val: **{chosen}** ({why})."


def test_table(raw: Path) -> str:
    """Test numbers of the chosen recipe only, one row per seed and the mean ± std."""
    runs = load(raw)
    chosen, _ = choose(runs)
    lines = [f"Chosen recipe: **{chosen}**.", "",
             "| seed | layer (val) | linear test | raw pixels | gap | random-init best | "
             "kNN at layer |", "|---:|---|---:|---:|---:|---:|---:|"]
    for s in runs[chosen]:
        layer = s["best_layer"]
        test, pixels = s["probes"][layer], s["pixel_probe"]
        rand = max(s["random_init_probes"].values())
        lines.append(f"| {s['seed']} | {layer} | {100 * test:.2f} | {100 * pixels:.2f} "
                     f"| {100 * (test - pixels):+.2f} | {100 * rand:.2f} | "
                     f"{100 * s['knn_top1']:.2f} |")
    tests = [s["probes"][s["best_layer"]] for s in runs[chosen]]
    gaps = [s["probes"][s["best_layer"]] - s["pixel_probe"] for s in runs[chosen]]
    lines.append(f"| mean ± std | | {_mean_std(tests)} | | {_mean_std(gaps)} | | |")
    return "\n".join(lines)


def layers_table(raw: Path, seed: int = 0) -> str:
    """Every layer of the chosen recipe's run at `seed` (its eval.json), test top-1 %."""
    chosen, _ = choose(load(raw))
    ev = json.loads((raw / chosen / f"seed{seed}" / "eval.json").read_text())
    rand = ev.get("random_init", {})
    lines = ["| layer | linear | kNN | random-init linear | zero frac | RankMe | binarised linear |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in ev["layers"].items():
        label = f"**{name}** (val-chosen)" if name == ev["best_layer"] else name
        r = f"{100 * rand[name]['linear_test']:.2f}" if name in rand else "-"
        lines.append(f"| {label} | {100 * m['linear_test']:.2f} | {100 * m['knn_test']:.2f} | {r} "
                     f"| {m['zero_frac']:.3f} | {m['rankme']:.1f} | "
                     f"{100 * m['binarized_test']:.2f} |")
    px = ev["pixels"]
    lines.append(f"| raw pixels | {100 * px['linear_test']:.2f} | {100 * px['knn_test']:.2f} "
                 "| | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "recipe")
    parser.add_argument("--only", default=",".join(CANDIDATES))
    args = parser.parse_args()
    if args.command == "run":
        run_all(args.only.split(","), [int(s) for s in args.seeds.split(",")], args.runs,
                args.raw)
    print(val_table(args.raw))
    print()
    print(test_table(args.raw))


if __name__ == "__main__":
    main()
