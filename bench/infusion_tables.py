"""The tables of docs/infusion.md, built from the infusion study's committed raw files only.

`bench/study_infusion.py` writes one small JSON per run to docs/results/infusion/
(`<dataset>-<variant>-s<seed>.json`: the run's overrides, train seconds, `score` (the K = 10
`score.json`), `tight` (the K = 50/100 bound), `k_sweep` (seed-0 infusion runs), `trace` (the
per-epoch validation bounds)). Every function here is a pure function of those files: nothing is
trained or scored, so `bench/report.py` can rebuild and check each table. Values are the mean ±
sample std over the seeds found; a missing seed shrinks the "seeds" count, a missing variant
drops its row, a missing number shows as "–".
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Key = tuple[str, str, int]  # (dataset, variant, seed)

# row order and labels of the main tables
LABELS = {"infusion": "**infusion** (α_0=ω=0.02, T=10)", "alpha0": "alpha0 (ablation)",
          "T5": "T5", "T20": "T20", "alpha.05": "alpha.05 (α_0=ω=0.05)",
          "alpha.1-const": "alpha.1-const"}
TIGHT_ROWS = ("infusion", "alpha0")
LONG_ROWS = ("infusion", "infusion-4x", "alpha0", "alpha0-4x")  # the targeted experiment
TRACE_VARIANTS = ("infusion-4x", "alpha0-4x")
TRACE_EPOCHS = (1, 5, 10, 20, 30, 45, 60, 90, 120)  # rows of the trace table, where present
DASH = "–"


def load_records(raw: Path) -> dict[Key, Record]:
    """Every run file under `raw`, keyed by what it says it is (not by its file name)."""
    records = {}
    for path in sorted(Path(raw).glob("*.json")):
        r = json.loads(path.read_text())
        records[(r["dataset"], r["variant"], int(r["seed"]))] = r
    return records


def _num(x: float) -> str:
    return f"{x:.1f}".replace("-", "−")  # the docs' minus sign


def mean_std(values: list[float]) -> str:
    """"m ± s" (sample std) over seeds; one value alone; "–" for none."""
    if not values:
        return DASH
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(statistics.mean(values))} ± {statistics.stdev(values):.1f}"


def _runs(records: dict[Key, Record], data: str, variant: str) -> list[Record]:
    return [r for (d, v, _), r in sorted(records.items()) if d == data and v == variant]


def _distinct(values: list[Any], fmt: str = "{}") -> str:
    return ", ".join(sorted({fmt.format(v) for v in values})) or DASH


def _prior_row(records: dict[Key, Record], data: str) -> str | None:
    """The prior depends only on (dataset, seed): one run per seed, the infusion one if any."""
    by_seed: dict[int, Record] = {}
    for (d, _, s), r in sorted(records.items(), key=lambda kv: kv[0][1] != "infusion"):
        if d == data and s not in by_seed and "score" in r:
            by_seed[s] = r
    if not by_seed:
        return None
    scores = [r["score"]["prior"] for r in by_seed.values()]
    return (f"| prior alone | {len(scores)} | {mean_std([p['parzen']['test_ll'] for p in scores])} "
            f"| {_distinct([p['parzen']['sigma'] for p in scores], '{:.2f}')} | "
            f"{mean_std([p['exact_ll'] for p in scores])} (exact) | – | – | – |")


def _main_row(variant: str, runs: list[Record]) -> str:
    b = [r["score"]["chain"]["bound"] for r in runs]
    same = all(x["infusion"]["test"] == x["chain"]["test"] for x in b)  # α = 0: q is p
    picks = "same (α=0)" if same else _distinct([x["picked_on_val"] for x in b])
    infusion = mean_std([x["infusion"]["test"] for x in b])
    if not same:
        infusion += f" ({_distinct([x['infusion']['std'] for x in b])})"
    parzen = [r["score"]["chain"]["parzen"] for r in runs]
    return (f"| {LABELS.get(variant, variant)} | {len(runs)} | "
            f"{mean_std([p['test_ll'] for p in parzen])} | "
            f"{_distinct([p['sigma'] for p in parzen], '{:.2f}')} | "
            f"{mean_std([x['test_bound'] for x in b])} | {picks} | {infusion} | "
            f"{statistics.mean(r['train_s'] for r in runs):.0f} |")


def main_table(raw: Path, data: str) -> str:
    """Parzen LL, the K = 10 bound (proposal chosen on val) and the infusion-proposal bound of
    the prior and of each variant of the main study on `data`."""
    records = load_records(raw)
    lines = ["| model | seeds | Parzen LL (test) | σ (val) | lower bound, K=10 | proposal chosen "
             "on val | infusion-proposal bound (s) | train s |", "|---|---|---|---|---|---|---|---|"]
    prior = _prior_row(records, data)
    lines += [prior] if prior else []
    lines += [_main_row(v, runs) for v in LABELS if (runs := _runs(records, data, v))]
    return "\n".join(lines)


def _tight_cells(runs: list[Record]) -> str:
    t = [r["tight"] for r in runs if "tight" in r]
    return (f"{mean_std([x['chain']['test'] for x in t])} | "
            f"{mean_std([x['infusion']['test'] for x in t])} | "
            f"{mean_std([x['prior_exact_same_images'] for x in t])}")


def tight_table(raw: Path, data: str) -> str:
    """The bound with many importance samples (K = 100 digits, 50 Fashion-MNIST; s = 0.02):
    own-chain vs infusion proposal vs the prior's exact LL on the same test images."""
    records = load_records(raw)
    lines = ["| model | own-chain proposal | infusion proposal | prior exact, same images |",
             "|---|---|---|---|"]
    lines += [f"| {v} | {_tight_cells(runs)} |" for v in TIGHT_ROWS
              if (runs := _runs(records, data, v))]
    return "\n".join(lines)


def _row(first: str, cells: list[str]) -> str:
    return f"| {first} |" + "".join(f" {c} |" for c in cells)


def k_table(raw: Path, data: str) -> str:
    """Bound against K on the seed-0 infusion run (mean over images, median in brackets), and
    the prior's exact LL on the same images (it does not depend on K)."""
    sweep = load_records(raw).get((data, "infusion", 0), {}).get("k_sweep")
    ks = sorted({b["K"] for b in sweep["bounds"]}) if sweep else []
    got = {(b["proposal"], b["K"]): b for b in sweep["bounds"]} if sweep else {}
    lines = [_row("proposal", [f"K = {k}" for k in ks]), _row("---", ["---"] * len(ks))]
    for label, name in (("own chain", "chain"), ("infusion", "infusion")):
        lines.append(_row(label, [f"{_num(b['mean'])} ({_num(b['median'])})"
                                  if (b := got.get((name, k))) else DASH for k in ks]))
    if sweep:
        lines.append(_row("prior exact, same images", [_num(sweep["prior_exact"])] * len(ks)))
    return "\n".join(lines)


def long_table(raw: Path, data: str = "digits") -> str:
    """The targeted experiment: the scale-0.1 runs next to 4× the epochs, bounds at K = 100 on
    every test image. The gap (own chain − infusion proposal) is taken per seed, then
    averaged; the last columns are the last epoch's K = 4 validation bounds (metrics.jsonl)."""
    records = load_records(raw)
    lines = ["| model | epochs | seeds | Parzen LL (test) | own-chain proposal | infusion proposal "
             "| own chain − infusion | prior exact, same images | val bound at the last epoch, own "
             "chain / infusion (K=4) | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for variant in LONG_ROWS:
        runs = [r for r in _runs(records, data, variant) if "tight" in r]
        if runs:
            lines.append(_long_row(variant, runs))
    return "\n".join(lines)


def _long_row(variant: str, runs: list[Record]) -> str:
    t = [r["tight"] for r in runs]
    gaps = [x["chain"]["test"] - x["infusion"]["test"] for x in t]
    last = [r["trace"][-1] for r in runs if r.get("trace")]
    return (f"| {variant} | {_distinct([round(r['epochs']) for r in runs])} | {len(runs)} | "
            f"{mean_std([r['score']['chain']['parzen']['test_ll'] for r in runs])} | "
            f"{mean_std([x['chain']['test'] for x in t])} | "
            f"{mean_std([x['infusion']['test'] for x in t])} | {mean_std(gaps)} | "
            f"{mean_std([x['prior_exact_same_images'] for x in t])} | "
            f"{mean_std([x[1] for x in last])} / {mean_std([x[2] for x in last])} | "
            f"{statistics.mean(r['train_s'] for r in runs):.0f} |")


def trace_table(raw: Path, data: str = "digits") -> str:
    """The per-epoch validation bounds (K = 4 on 128 val images, s = 0.02) of the 4×-epoch runs:
    does the infusion-proposal bound close on the own-chain one as training goes on?"""
    records = load_records(raw)
    runs = {v: [dict((round(t[0]), t[1:]) for t in r.get("trace", []))
                for r in _runs(records, data, v)] for v in TRACE_VARIANTS}
    runs = {v: traces for v, traces in runs.items() if traces}
    heads = [f"{v}: {p}" for v in runs for p in ("own chain", "infusion proposal")]
    lines = [_row("epoch", heads), _row("---", ["---"] * len(heads))]
    present = {e for traces in runs.values() for t in traces for e in t}
    for epoch in (e for e in TRACE_EPOCHS if e in present):
        lines.append(_row(str(epoch), [mean_std([t[epoch][i] for t in traces if epoch in t])
                                       for traces in runs.values() for i in (0, 1)]))
    return "\n".join(lines)


# NAME (the docs marker) → the table, from the raw folder (docs/results/infusion)
TABLES: dict[str, Callable[[Path], str]] = {
    "infusion-digits": lambda raw: main_table(raw, "digits"),
    "infusion-fashion": lambda raw: main_table(raw, "fashion-mnist"),
    "infusion-digits-tight": lambda raw: tight_table(raw, "digits"),
    "infusion-fashion-tight": lambda raw: tight_table(raw, "fashion-mnist"),
    "infusion-digits-k": lambda raw: k_table(raw, "digits"),
    "infusion-fashion-k": lambda raw: k_table(raw, "fashion-mnist"),
    "infusion-long": lambda raw: long_table(raw, "digits"),
    "infusion-long-trace": lambda raw: trace_table(raw, "digits"),
}
