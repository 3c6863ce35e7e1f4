"""The RCDM study's tables in docs/rcdm.md, built only from its committed raw files.

bench/study_rcdm.py writes, per scale and seed, to docs/results/rcdm/scale<s>/seed<k>/:

    encoder.json       the SimCLR run: overrides, resolved config, summary (online probes, steps)
    <condition>.json   one per conditioning: overrides, config, score.json, summary.json
    study.json         scale, seed, threads, software/CPU, grid settings, stage CPU/wall seconds

The functions here read nothing else (no runs/, no torch), so bench/report.py can regenerate and
check the tables anywhere. A file that is missing gives "-" cells, not an error: a study that was
interrupted, or not run yet, still renders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# conditioning -> its row label (the study's order, and the table's)
CONDITIONS = {"backbone": "trained backbone", "projector": "trained projector",
              "random_init": "random-init encoder"}
ENCODER_FILE = "encoder.json"
STUDY_FILE = "study.json"
MISSING = "-"


def raw_dir(raw: Path, scale: int = 1, seed: int = 0) -> Path:
    """Where one (scale, seed) of the study keeps its raw files."""
    return Path(raw) / f"scale{scale}" / f"seed{seed}"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bold(text: str, best: bool) -> str:
    return f"**{text}**" if best else text


# (name, how to read it from a condition record, format, whether lower is better); the best of
# each among the rows present is bolded, as the hand-made table did
_RANKED: list[tuple[str, Callable[[dict], float], Callable[[float], str], bool]] = [
    ("mean", lambda c: c["score"]["retrieval"]["mean_rank"], "{:.1f}".format, True),
    ("median", lambda c: c["score"]["retrieval"]["median_rank"], "{:.1f}".format, True),
    ("top1", lambda c: c["score"]["retrieval"]["top1"], _pct, False),
    ("top5", lambda c: c["score"]["retrieval"]["top5"], _pct, False),
    ("pix_mean", lambda c: c["score"]["retrieval_pixels"]["mean_rank"], "{:.1f}".format, True),
    ("pix_top1", lambda c: c["score"]["retrieval_pixels"]["top1"], _pct, False),
]


def _best(records: dict[str, dict]) -> dict[str, set[str]]:
    """Per ranked column, the conditions holding its best value (ties all bolded); nothing is
    bolded with fewer than two rows to compare."""
    if len(records) < 2:
        return {name: set() for name, *_ in _RANKED}
    best = {}
    for name, get, fmt, lower in _RANKED:
        # compared as printed, so two cells that read the same are both bold or neither
        shown = {cond: float(fmt(get(rec)).rstrip("%")) for cond, rec in records.items()}
        target = (min if lower else max)(shown.values())
        best[name] = {cond for cond, v in shown.items() if v == target}
    return best


def _study_row(cond: str, rec: dict, best: dict[str, set[str]]) -> str:
    r, s = rec["score"]["retrieval"], rec["score"]
    cell = {name: _bold(fmt(get(rec)), cond in best[name]) for name, get, fmt, _ in _RANKED}
    layer = rec["layer"] + (" (z)" if cond == "projector" else "")
    loss = rec["train"].get("final_loss")
    cells = [CONDITIONS[cond], layer, cell["mean"], cell["median"], cell["top1"], cell["top5"],
             str(r["n"]),
             f"{r['chance_mean_rank']:.1f} / {_pct(r['chance_top1'])} / {_pct(r['chance_top5'])}",
             f"{cell['pix_mean']} / {cell['pix_top1']}", f"{s['diversity']['mean']:.3f}",
             MISSING if loss is None else f"{loss:.4f}"]
    return "| " + " | ".join(cells) + " |"


def study_table(raw: Path, scale: int = 1, seed: int = 0) -> str:
    """Retrieval (own space and pixel space), diversity and final loss per conditioning."""
    keep = raw_dir(raw, scale, seed)
    records = {c: rec for c in CONDITIONS if (rec := load(keep / f"{c}.json")) is not None}
    best = _best(records)
    lines = ["| conditioning | layer | mean rank | median rank | top-1 | top-5 | N | chance mean "
             "rank / top-1 / top-5 | pixel-space mean rank / top-1 | diversity | final train "
             "loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cond, label in CONDITIONS.items():
        if cond in records:
            lines.append(_study_row(cond, records[cond], best))
        else:
            lines.append(f"| {label} |" + f" {MISSING} |" * 10)
    return "\n".join(lines)


def _minutes(timings: dict, stage: str, key: str) -> str:
    t = timings.get(stage)
    return MISSING if t is None else f"{t[key] / 60:.1f}"


def _span(cells: list[str]) -> str:
    """'lo–hi' of per-condition minutes ('x' when they print the same; '-' if any is missing)."""
    if MISSING in cells:
        return MISSING
    lo, hi = min(cells, key=float), max(cells, key=float)
    return lo if lo == hi else f"{lo}–{hi}"


def _same(values: list) -> str:
    """One value when every condition agrees (`each` rows), else all of them."""
    if not values or None in values:
        return MISSING
    shown = [f"{v:,}" if isinstance(v, int) else str(v) for v in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def _labels(enc: dict | None, conds: dict[str, dict | None], grids: dict | None) -> list[str]:
    present = [c for c in conds.values() if c is not None]
    steps = [c["train"].get("steps") for c in present] if len(present) == len(conds) else []
    queries = _same([c["score"]["retrieval"]["queries"] for c in present])
    ddim = _same([c["score"]["steps"] for c in present])
    grid = (f"{grids['n']}×{grids['k']} + {grids['k']}×{grids['interp']} samples × "
            f"{grids['steps']} steps" if grids else MISSING)
    enc_steps = _same([enc["summary"]["steps"]]) if enc else MISSING
    return [f"SimCLR encoder ({enc_steps} steps)",
            f"RCDM backbone / projector / random-init ({_same(steps)} steps"
            + (" each)" if len(set(steps)) == 1 else ")"),
            f"score ({queries} samples × {ddim} DDIM steps + re-encoding), each",
            f"grids ({grid}), each"]


def cost_table(raw: Path, scale: int = 1, seed: int = 0) -> str:
    """CPU and wall minutes of each stage, as the study measured them (summed over resumes)."""
    keep = raw_dir(raw, scale, seed)
    study = load(keep / STUDY_FILE) or {}
    conds = {c: load(keep / f"{c}.json") for c in CONDITIONS}
    t = study.get("timings", {})
    labels = _labels(load(keep / ENCODER_FILE), conds, study.get("grids"))
    lines = ["| stage | CPU min | wall min |", "|---|---|---|"]
    for label, stage in zip(labels, ("encoder", "train", "score", "grids"), strict=True):
        per = {key: [_minutes(t, f"{stage}_{c}", key) for c in CONDITIONS]
               for key in ("cpu_s", "wall_s")}
        if stage == "encoder":
            cells = [_minutes(t, "encoder", key) for key in ("cpu_s", "wall_s")]
        elif stage == "train":
            cells = [" / ".join(per[key]) for key in ("cpu_s", "wall_s")]
        else:
            cells = [_span(per[key]) for key in ("cpu_s", "wall_s")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    total = [f"**{study[k] / 60:.1f}**" if k in study else MISSING
             for k in ("total_cpu_s", "total_wall_s")]
    lines.append(f"| **total** | {total[0]} | {total[1]} |")
    return "\n".join(lines)
