"""The tables and plots of a sweep (`ssl-lab sweep`, sweep.py): read every point's run, write
`sweep.csv`, `sweep.md` and `plots/<metric>_vs_<key>.png`.

`assemble(DIR)` rebuilds them from the runs alone, also for a plain directory of runs without
sweep.json (the axes are then the config keys whose values differ between the runs).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from ssl_lab.config_io import flatten, read_yaml
from ssl_lab.errors import UserError
from ssl_lab.runtime import read_json, short_path

SWEEP_FILE = "sweep.json"
# keys the sweep owns: each point's directory and whether it resumes are decided per point
RESERVED = ("run.dir", "resume")
UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._,=+-]")  # replaced in directory and file names
ACCURACY = ("best_linear", "knn_top1", "random_init_best", "pixel_probe")
SCALARS = ("best_layer", *ACCURACY, "views_per_s", "train_s", "wall_s")
PER_LAYER = ("probe", "zero_frac", "binarized", "rankme")  # column prefixes: "probe/stage3"


def format_value(value: Any) -> str:
    """YAML-like text of a value, as the user would type it (names, tables, plot ticks)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def point_status(run_dir: Path) -> str:
    """done (summary.json) | partial (started: resume it) | stale (killed before its config was
    written: nothing to keep) | new."""
    if (run_dir / "summary.json").is_file():
        return "done"
    if (run_dir / "config.yaml").is_file():
        return "partial"
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "checkpoints").exists():
        return "stale"
    return "new"


def write_text(path: Path, text: str) -> None:
    """Via a temporary file: an interrupted sweep never leaves a half-written table."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- the table


def sweep_points(sweep_dir: Path) -> tuple[dict[str, list[Any]], list[tuple[str, dict]]]:
    """(axes, [(point name, {axis: value})]) from sweep.json, else discovered from the runs."""
    path = sweep_dir / SWEEP_FILE
    if path.is_file():
        data = read_sweep_file(path)
        return dict(data["grid"]), [(p["name"], p["values"]) for p in data["points"]]
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file())
    if not runs:
        raise UserError(f"{sweep_dir} holds neither {SWEEP_FILE} nor run directories; pass a "
                        "directory made by `ssl-lab sweep`")
    flat = {run.name: flatten(read_yaml(run / "config.yaml")) for run in runs}
    keys = sorted({k for f in flat.values() for k in f})
    axes = {}
    for key in keys:
        if key in (*RESERVED, "run.name"):
            continue
        values = _unique([f.get(key) for f in flat.values()])
        if len(values) > 1:
            axes[key] = sorted(values, key=_sort_key)
    return axes, [(name, {k: flat[name].get(k) for k in axes}) for name in flat]


def read_sweep_file(path: Path) -> dict[str, Any]:
    """sweep.json, checked: a damaged or hand-edited one is one line naming it."""
    fix = "restore it, or start the sweep in a new out="
    data = read_json(path, "sweep record", fix)
    points = data.get("points") if isinstance(data, dict) else None
    grid = data.get("grid") if isinstance(data, dict) else None
    ok = isinstance(points, list) and all(
        isinstance(data.get(key), dict) for key in ("base", "fixed")) and isinstance(grid, list) \
        and all(isinstance(axis, list) and len(axis) == 2 and isinstance(axis[0], str)
                and isinstance(axis[1], list) for axis in grid) and all(
        isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("values"), dict)
        for p in points)
    if not ok:
        raise UserError(f"{short_path(path)} lacks the keys a sweep record has (base, fixed, grid, "
                        f"points): the file is damaged; {fix}")
    return data


def _run_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A run's JSON report (summary.json, eval.json) as a mapping, or one line naming it."""
    data = read_json(path, what, fix)
    if not isinstance(data, dict):
        raise UserError(f"{short_path(path)} is not a JSON object: the {what} is damaged; {fix}")
    return data


def _unique(values: list[Any]) -> list[Any]:
    seen, out = set(), []
    for v in values:
        if format_value(v) not in seen:
            seen.add(format_value(v))
            out.append(v)
    return out


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if _is_number(value) else (1, 0, format_value(value))


def read_row(run_dir: Path) -> dict[str, Any]:
    """Summary metrics of one run (empty when it has not finished)."""
    row: dict[str, Any] = {"status": point_status(run_dir)}
    if row["status"] == "stale":
        row["status"] = "new"
    if row["status"] != "done":
        return row
    summary = _run_json(run_dir / "summary.json", "run summary", "delete that point's directory "
                        "and continue the sweep (`ssl-lab sweep out=...`) to run it again")
    probes = _mapping(summary.get("probes"))
    best = summary.get("best_layer") if isinstance(summary.get("best_layer"), str) else None
    random_init = {k: v for k, v in _mapping(summary.get("random_init_probes")).items()
                   if _is_number(v)}
    row |= {"best_layer": best, "best_linear": probes.get(best),
            "knn_top1": summary.get("knn_top1"),
            # the strongest untrained layer: the floor a trained layer has to beat
            "random_init_best": max(random_init.values()) if random_init else None,
            "pixel_probe": summary.get("pixel_probe"), "views_per_s": summary.get("views_per_s"),
            "train_s": summary.get("train_s"), "wall_s": summary.get("wall_s")}
    row |= {f"probe/{k}": v for k, v in probes.items()}
    report = _train_eval(run_dir, summary)
    for name, layer in _mapping((report or {}).get("layers")).items():
        layer = _mapping(layer)
        row |= {f"zero_frac/{name}": layer.get("zero_frac"),
                f"binarized/{name}": layer.get("binarized_test"),
                f"rankme/{name}": layer.get("rankme")}
    return row


def _train_eval(run_dir: Path, summary: dict) -> dict | None:
    """The eval report on the run's own dataset (eval.json may hold a later transfer eval)."""
    for path in [run_dir / "eval.json", *sorted((run_dir / "evals").glob("*.json"))]:
        if path.is_file():
            report = _run_json(path, "evaluation report", f"run `ssl-lab eval "
                               f"{short_path(run_dir)}` again to rewrite it")
            if report.get("dataset") == summary.get("dataset"):
                return report
    return None


def _mapping(value: Any) -> dict:
    """A report's sub-mapping; anything else (a hand-edited file) counts as empty."""
    return value if isinstance(value, dict) else {}


def assemble(sweep_dir: str | Path, plots: bool = True) -> list[dict[str, Any]]:
    """Write sweep.csv, sweep.md (and plots/) for a sweep directory; returns the rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep directory {sweep_dir} does not exist")
    axes, points = sweep_points(sweep_dir)
    rows = [{"point": name, **values, **read_row(sweep_dir / name)} for name, values in points]
    columns = _columns(rows, list(axes))
    _write_csv(rows, columns, sweep_dir / "sweep.csv")
    _write_markdown(rows, columns, axes, sweep_dir)
    if plots:
        plot_sweep(rows, axes, sweep_dir / "plots")
    return rows


def _columns(rows: list[dict], axes: list[str]) -> list[str]:
    layer_cols = []
    for row in rows:  # layer order as the runs report it (shallow → deep)
        layer_cols += [k for k in row if "/" in k and k not in layer_cols]
    ordered = [c for prefix in PER_LAYER for c in layer_cols if c.startswith(prefix + "/")]
    return ["point", *axes, "status", *SCALARS, *ordered]


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else _csv_value(row[c]) for c in columns])
    tmp.replace(path)


def _csv_value(value: Any) -> Any:
    return format_value(value) if isinstance(value, (list, dict, bool)) else value


def _write_markdown(rows: list[dict], columns: list[str], axes: dict, sweep_dir: Path) -> None:
    # the markdown table keeps the columns people compare; sweep.csv has all of them
    shown = [c for c in columns if c != "point" and not c.startswith(("zero_frac/", "binarized/",
                                                                      "rankme/"))]
    done = sum(r["status"] == "done" for r in rows)
    lines = [f"# sweep {sweep_dir.name}", "",
             f"{done} of {len(rows)} points finished. Accuracies are test top-1 (%); "
             "`best_linear` is the linear probe at `best_layer` (chosen on val); "
             "`random_init_best` is the best layer of the untrained architecture.", "",
             "Axes: " + ("; ".join(f"`{k}` = {', '.join(format_value(v) for v in vs)}"
                                    for k, vs in axes.items()) or "none"), "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(c, row.get(c), c in axes) for c in shown) + " |")
    write_text(sweep_dir / "sweep.md", "\n".join(lines) + "\n")


def _md_cell(column: str, value: Any, is_axis: bool) -> str:
    if value is None:
        return "–"
    if is_axis or not _is_number(value):
        return format_value(value).replace("|", "\\|")
    if column in ACCURACY or column.startswith("probe/"):
        return f"{100 * value:.2f}"
    return f"{value:.0f}" if column == "views_per_s" else f"{value:.1f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- plots

SCALAR_PLOTS = ("best_linear", "knn_top1", "views_per_s", "wall_s")
LAYER_PLOTS = {"probes": "probe", "zero_frac": "zero_frac"}  # file stem -> column prefix


def plot_sweep(rows: list[dict], axes: dict[str, list], plot_dir: Path) -> list[Path]:
    """`<metric>_vs_<axis>.png` for every axis with more than one finished value; each point is
    the mean ± sample std over the other axes (seeds, usually)."""
    done = [r for r in rows if r["status"] == "done"]
    keys = [k for k in axes if len(_unique([r[k] for r in done])) > 1]
    if len(keys) > 1:  # metric-vs-seed says nothing: seeds are what the error bars average over
        keys = [k for k in keys if k != "seed"]
    written = []
    for key in keys:
        order = [v for v in axes[key] if any(_same(r[key], v) for r in done)]
        others = [k for k in axes if k != key]
        for metric in SCALAR_PLOTS:
            extra = ["random_init_best", "pixel_probe"] if metric == "best_linear" else []
            written.append(_plot(done, key, order, [metric, *extra], others,
                                 plot_dir / f"{metric}_vs_{UNSAFE_CHARS.sub('_', key)}.png"))
        for stem, prefix in LAYER_PLOTS.items():
            cols = [c for c in _columns(done, []) if c.startswith(prefix + "/")]
            if cols:
                written.append(_plot(done, key, order, cols, others,
                                     plot_dir / f"{stem}_vs_{UNSAFE_CHARS.sub('_', key)}.png"))
    return written


def _same(a: Any, b: Any) -> bool:
    return format_value(a) == format_value(b)


def _mean_std(rows: list[dict], key: str, value: Any, column: str) -> tuple[float, float]:
    vals = [r[column] for r in rows if _same(r[key], value) and _is_number(r.get(column))]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return mean, math.sqrt(var)


def _plot(rows: list[dict], key: str, order: list, columns: list[str], others: list[str],
          path: Path) -> Path:
    from ssl_lab.plots import plt, save_figure  # headless backend: sweeps run on servers

    numeric = all(_is_number(v) for v in order)
    xs = list(order) if numeric else list(range(len(order)))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    percent = columns[0] in ACCURACY or columns[0].startswith("probe/")
    for i, column in enumerate(columns):
        stats = [_mean_std(rows, key, v, column) for v in order]
        ys = [100 * m if percent else m for m, _ in stats]
        err = [100 * s if percent else s for _, s in stats]
        style = {"random_init_best": dict(ls=":", color="grey"),
                 "pixel_probe": dict(ls="-.", color="black")}.get(column, {})
        label = column.split("/", 1)[1] if "/" in column else column
        ax.errorbar(xs, ys, yerr=err, marker="os^vD<>"[i % 7], capsize=3, label=label, **style)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [format_value(v) for v in order], rotation=30 if not numeric else 0)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{columns[0].split('/')[0]}{' (%)' if percent else ''}")
    over = f" (mean ± std over {', '.join(others)})" if others else ""
    ax.set_title(f"{path.stem.split('_vs_')[0]} vs {key}{over}", fontsize=9)
    ax.grid(alpha=0.3)
    if len(columns) > 1:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
