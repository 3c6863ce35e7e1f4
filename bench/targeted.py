"""Targeted experiments (issue #27, item 5): the three study claims that did not reproduce at
the cpu scale's 3 epochs, rerun at 4x the epochs, to tell "our small regime" from "our bug".

    python bench/targeted.py run   [--worker 0/2] [--seeds 2] [--runs runs/targeted] \\
        [--raw docs/results/targeted]
    python bench/targeted.py table [--raw docs/results/targeted] [--studies-raw docs/results/studies/cpu]
    python bench/targeted.py list  [--seeds 2]

Each run is a study protocol as frozen in bench/study_protocols/cpu/<protocol>.yaml plus
`train.epochs=12`, `seed=` and `run.dir=`, nothing else: the 1-epoch warm-up, the subset, the
width and the evaluation stay the studies' (bench/studies.py). 6 protocols x 2 seeds = 12 runs.
`run` trains what is missing, seed by seed (an early stop leaves complete seeds); finished runs
are skipped, interrupted ones resumed; `--worker i/n` takes every n-th run from the i-th (two
processes, one thread each, on a 2-core machine). Each finished run's summary.json, config.yaml, env.json
and eval.json are copied to <raw>/<protocol>-e12/seed<k>/; a run whose raw files exist is not
trained again.

`table` (and bench/report.py, from committed files only) puts the 12-epoch runs next to the
studies' 3-epoch runs of the same protocols (<studies-raw>/<protocol>-s<seed>/summary.json and
evals/<dataset>.json): test top-1 % (zero fraction: %), mean ± sample std over the seeds found.
A claim's comparison A − B is a gain (loss) only when it exceeds (is below minus) the larger of
the two seed stds, otherwise it is within noise; it needs two seeds on each side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
# sibling scripts: the seeds tables' mean ± std, mean and std in points (the noise rule's), and
# the studies' run reader and frozen protocols
import study_report  # noqa: E402
from methods_seeds import _mean_std  # noqa: E402
from recipe_select import _stats  # noqa: E402
from studies import PROTOCOLS, check_saved, read_complete  # noqa: E402

if TYPE_CHECKING:
    from ssl_lab.config import Config

ROOT = Path(__file__).resolve().parents[1]
SCALE = "cpu"
STUDY_EPOCHS = 3
EPOCHS = 4 * STUDY_EPOCHS  # the "4x the epochs"; optim.warmup_epochs stays at 1
FILES = ("summary.json", "config.yaml", "eval.json", "env.json")  # env: the git revision

Report = dict  # an eval report: evals/<dataset>.json = eval.json


def _backbone(r: Report) -> float:
    return r["layers"]["backbone"]["linear_test"]


def _z(r: Report) -> float:
    return r["layers"][list(r["layers"])[-1]]["linear_test"]  # the last projector layer


# metric name (a table column) -> its value in one eval report, a fraction (shown x 100)
METRICS: dict[str, Callable[[Report], float]] = {
    "backbone linear": _backbone,
    "z linear": _z,
    "backbone − z": lambda r: _backbone(r) - _z(r),
    "best layer linear (val-chosen)": lambda r: r["layers"][r["best_layer"]]["linear_test"],
    "backbone zero frac": lambda r: r["layers"]["backbone"]["zero_frac"],
}


@dataclass(frozen=True)
class Experiment:
    """A claim, the frozen protocols it trains, the metrics its table shows, and its
    predictions (metric, a, b): the claim says metric(a) > metric(b)."""

    claim: str
    protocols: tuple[str, ...]
    metrics: tuple[str, ...]
    predicts: tuple[tuple[str, str, str], ...]


# The protocol order (first seen over the experiments) is the run order within a seed: with
# `--worker i/2` each worker gets one run of each last_width (the 2048-wide runs cost more).
EXPERIMENTS: dict[str, Experiment] = {
    "guillotine-augmentation": Experiment(
        "Guillotine: the gap backbone − z (linear probe, test top-1) grows with augmentation "
        "strength (simclr: the strong recipe; simclr-weak: crops + flips)",
        ("simclr", "simclr-weak"),
        ("backbone linear", "z linear", "backbone − z"),
        (("backbone − z", "simclr", "simclr-weak"),),
    ),
    "width-supervised-accuracy": Experiment(
        "Expand/Narrow: supervised in-distribution accuracy rises as the last block's width D "
        "shrinks",
        ("supervised-lw2048", "supervised-lw32"),
        ("backbone linear", "best layer linear (val-chosen)"),
        (("backbone linear", "supervised-lw32", "supervised-lw2048"),
         ("best layer linear (val-chosen)", "supervised-lw32", "supervised-lw2048")),
    ),
    "width-zero-fraction": Experiment(
        "Expand/Narrow: the zero fraction of the (pooled) backbone features grows with D",
        ("simclr-lw32", "simclr-lw2048", "supervised-lw32", "supervised-lw2048"),
        ("backbone zero frac",),
        (("backbone zero frac", "simclr-lw2048", "simclr-lw32"),
         ("backbone zero frac", "supervised-lw2048", "supervised-lw32")),
    ),
}


# ----------------------------------------------------------------------------- running


class Run(NamedTuple):
    protocol: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.protocol}-e{EPOCHS}"

    def dir(self, base: Path) -> Path:
        """Its directory under base: runs/... (the run) and raw/... (its small files) alike."""
        return base / self.name / f"seed{self.seed}"


def protocols() -> list[str]:
    """Every protocol the experiments train, once, in first-seen order."""
    return list(dict.fromkeys(p for e in EXPERIMENTS.values() for p in e.protocols))


def all_runs(seeds: int) -> list[Run]:
    """Seed by seed: all of seed 0 first, so an early stop leaves complete seeds."""
    return [Run(p, seed) for seed in range(seeds) for p in protocols()]


def share(runs: list[Run], worker: str) -> list[Run]:
    """Worker "i/n"'s runs: every n-th from the i-th."""
    i, n = (int(x) for x in worker.split("/"))
    if not 0 <= i < n:
        raise SystemExit(f"--worker {worker}: want i/n with 0 <= i < n")
    return runs[i::n]


def protocol_path(protocol: str) -> Path:
    return PROTOCOLS / SCALE / f"{protocol}.yaml"


def run_config(run: Run, runs: Path) -> Config:
    """The frozen protocol + train.epochs, seed and run.dir, nothing else."""
    from ssl_lab.config import load_config

    path = protocol_path(run.protocol)
    # a file missing a key of today's schema stops here rather than take the key's default
    read_complete(path, f"re-freeze it: `python bench/studies.py freeze --scale {SCALE}`")
    return load_config(path, [f"train.epochs={EPOCHS}", f"seed={run.seed}",
                              f"run.dir={run.dir(runs)}"])


def execute(run: Run, runs: Path, raw: Path) -> None:
    """Train the run unless it finished (resume it if it started), then keep its raw files."""
    from ssl_lab.sweep import run_point
    from ssl_lab.train_loop import train

    keep = run.dir(raw)
    if all((keep / f).is_file() for f in FILES):
        return
    run_dir = run.dir(runs)
    cfg = run_config(run, runs)
    check_saved(run_dir, cfg)  # a directory trained by another config is not mixed in
    # run_point: skip if summary.json, resume (resume=true) if config.yaml, else train; a
    # UserError (NaN loss...) fails this run only, and leaves no raw files
    failure = run_point(f"{run.name}/seed{run.seed}", cfg, run_dir, "[targeted]", train)
    if failure or not all((run_dir / f).is_file() for f in FILES):
        return
    keep.mkdir(parents=True, exist_ok=True)
    for file in FILES:
        shutil.copy(run_dir / file, keep / file)


# ----------------------------------------------------------------------------- tables


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_long(raw: Path, protocol: str) -> list[Report]:
    """The 12-epoch eval reports of a protocol, one per seed with raw files."""
    base = raw / Run(protocol, 0).name
    seeds = sorted(base.glob("seed*")) if base.is_dir() else []
    return [r for r in (_read(s / "eval.json") for s in seeds) if r is not None]


def load_short(studies_raw: Path, protocol: str) -> list[Report]:
    """The studies' 3-epoch eval reports of a protocol, one per finished seed (study_report's
    reader of <protocol>-s<seed>/evals/<tag>.json)."""
    return study_report.load(studies_raw, protocol, study_report.SEEDS).reports


def verdict(a: list[float], b: list[float]) -> str:
    """mean(a) − mean(b) in points, a gain (loss) only when it exceeds (is below minus) the
    larger of the two seed stds, else within noise; "-" without two seeds on each side."""
    if len(a) < 2 or len(b) < 2:
        return "-"
    (mean_a, std_a), (mean_b, std_b) = _stats(a), _stats(b)
    diff, noise = mean_a - mean_b, max(std_a, std_b)
    word = "gain" if diff > noise else "loss" if diff < -noise else "within noise"
    return f"{diff:+.2f} (larger std {noise:.2f}): {word}"


def table(raw: Path, studies_raw: Path, name: str) -> str:
    """Experiment `name`: each protocol at 3 and at 12 epochs (mean ± std over seeds, the
    val-chosen layers), then each prediction of the claim at both lengths."""
    exp = EXPERIMENTS[name]
    loaded = {(p, e): (load_short(studies_raw, p) if e == STUDY_EPOCHS else load_long(raw, p))
              for p in exp.protocols for e in (STUDY_EPOCHS, EPOCHS)}
    lines = [f"Claim: {exp.claim}. Test top-1 % (zero frac: % of exactly-zero pooled test "
             f"features), mean ± sample std over the seeds; {STUDY_EPOCHS} epochs: the studies' "
             "runs.", "",
             "| protocol | epochs | seeds | " + " | ".join(exp.metrics) + " | best layer (val) |",
             "|---|---:|---:|" + "---:|" * len(exp.metrics) + "---|"]
    for (protocol, epochs), reports in loaded.items():
        cells = [_mean_std([METRICS[m](r) for r in reports]) for m in exp.metrics]
        best = ", ".join(sorted(r["best_layer"] for r in reports)) or "-"
        lines.append(f"| {protocol} | {epochs} | {len(reports)} | " + " | ".join(cells)
                     + f" | {best} |")
    lines += ["", f"| the claim says A − B > 0 | {STUDY_EPOCHS} epochs | {EPOCHS} epochs |",
              "|---|---|---|"]
    for metric, a, b in exp.predicts:
        cells = [verdict([METRICS[metric](r) for r in loaded[a, e]],
                         [METRICS[metric](r) for r in loaded[b, e]])
                 for e in (STUDY_EPOCHS, EPOCHS)]
        lines.append(f"| {metric}: {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(raw: Path, studies_raw: Path) -> str:
    return "\n\n".join(f"### {name}\n\n{table(raw, studies_raw, name)}" for name in EXPERIMENTS)


# ----------------------------------------------------------------------------- the command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "table", "list"))
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. n-1")
    parser.add_argument("--worker", default="0/1", help="i/n: every n-th run from the i-th")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "targeted")
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "targeted")
    parser.add_argument("--studies-raw", type=Path,
                        default=ROOT / "docs" / "results" / "studies" / SCALE)
    args = parser.parse_args()
    runs = share(all_runs(args.seeds), args.worker)
    if args.action == "list":
        print("\n".join(f"{r.name}/seed{r.seed}: {protocol_path(r.protocol).relative_to(ROOT)} "
                        f"train.epochs={EPOCHS} seed={r.seed}" for r in runs))
        return
    if args.action == "run":
        for run in runs:
            execute(run, args.runs, args.raw)
    print(tables(args.raw, args.studies_raw))


if __name__ == "__main__":
    main()
