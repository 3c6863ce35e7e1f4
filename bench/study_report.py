"""The studies' tables (`python bench/report.py`, TABLES) and plots (`python bench/studies.py
report`); bench/studies.py holds the study definitions, running, freezing and the command line.

Both read a folder of runs laid out as <run>-s<seed>/ with summary.json and evals/<dataset
tag>.json: the committed raw results (docs/results/studies/<scale>) or a run folder. A table
cell is the mean ± sample std over the seeds found (seeds 0..SEEDS-1); a run family with no
finished seed is left out of its table; a plot with nothing to draw is not written.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ssl_lab.eval.run import dataset_tag
from ssl_lab.plots import plt, save_figure  # headless backend

sys.path.insert(0, str(Path(__file__).parent))
from studies import NOISE_STDS, PROJ_DIMS, SHAPES_FACTORS, WIDTHS  # noqa: E402

SEEDS = 3  # the seeds the published tables use: runs <name>-s0 .. -s2
VIEWS_VS_DATA = ["mvbarlow-d256-scaled-v2", "mvbarlow-d256-scaled-v4-f0.185"]

# ----------------------------------------------------------------------------- reading results


@dataclass
class Seeds:
    """One named run family across seeds: the eval report per dataset tag, and summaries."""

    name: str
    reports: list[dict] = field(default_factory=list)  # one per seed, for one eval tag
    summaries: list[dict] = field(default_factory=list)


def load(out: Path, name: str, seeds: int, tag: str | None = None) -> Seeds:
    family = Seeds(name)
    for seed in range(seeds):
        run_dir = out / f"{name}-s{seed}"
        if not (run_dir / "summary.json").is_file():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        path = run_dir / "evals" / f"{tag or dataset_tag(summary['dataset'])}.json"
        if path.is_file():
            family.reports.append(json.loads(path.read_text()))
            family.summaries.append(summary)
    return family


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float], scale: float = 100.0) -> str:
    m, s = mean_std([scale * v for v in values])
    return "-" if m != m else f"{m:.1f} ± {s:.1f}"


def layer_values(fam: Seeds, layer: str, key: str = "linear_test", source: str = "layers") -> list[float]:
    return [r[source][layer][key] for r in fam.reports if layer in r.get(source, {})]


def metric(fam: Seeds, fn: Callable[[dict], float]) -> list[float]:
    return [fn(r) for r in fam.reports]


def layers_of(fam: Seeds) -> list[str]:
    return list(fam.reports[0]["layers"]) if fam.reports else []


def falls_through_projector(report: dict) -> bool:
    """Linear test top-1 strictly falls at every step from the backbone to the last layer."""
    layers = list(report["layers"])
    accs = [report["layers"][k]["linear_test"] for k in layers[layers.index("backbone"):]]
    return all(a > b for a, b in itertools.pairwise(accs))


def per_layer_table(families: list[Seeds], random_init: bool = True) -> str:
    """Linear-probe test top-1 per layer, mean ± std over seeds, the best layer (on val) of each
    seed, the backbone − last-layer gap and in how many seeds accuracy falls at every layer
    after the backbone."""
    layers = next((layers_of(f) for f in families if f.reports), [])
    head = ("| run | seeds | " + " | ".join(layers)
            + " | best layer (val) | backbone − last | falls through projector |")
    lines = [head, "|" + "---|" * (len(layers) + 5)]
    for fam in families:
        if not fam.reports:
            continue
        gap = [
            r["layers"]["backbone"]["linear_test"] - r["layers"][layers[-1]]["linear_test"]
            for r in fam.reports
        ]
        best = ", ".join(sorted(r["best_layer"] for r in fam.reports))
        falls = sum(falls_through_projector(r) for r in fam.reports)
        lines.append(
            f"| {fam.name} | {len(fam.reports)} | "
            + " | ".join(cell(layer_values(fam, k)) for k in layers)
            + f" | {best} | {cell(gap)} | {falls} of {len(fam.reports)} |"
        )
    if random_init:
        fam = next((f for f in families if f.reports and "random_init" in f.reports[0]), None)
        if fam:
            lines.append(
                f"| random-init ({fam.name} arch) | {len(fam.reports)} | "
                + " | ".join(cell(layer_values(fam, k, source="random_init")) for k in layers)
                + " | | | |"
            )
            pix = [r["pixels"]["linear_test"] for r in fam.reports if "pixels" in r]
            lines += ["", f"Raw pixels, same probe: {cell(pix)} ({len(pix)} seeds)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the tables

GUILLOTINE = ["simclr", "vicreg", "simclr-weak", "supcon"]
DIGITS = "digits"  # the transfer evaluation's dataset tag
CHEAP_HEAD = [
    "| run | seeds | backbone linear | best layer linear (val-chosen) | kNN @best | train s |",
    "|---|---|---|---|---|---|",
]


def guillotine_linear(raw: Path, tag: str | None = None, seeds: int = SEEDS) -> str:
    return per_layer_table([load(raw, n, seeds, tag) for n in GUILLOTINE])


def guillotine_knn(raw: Path, tag: str | None = None, seeds: int = SEEDS) -> str:
    return _knn_table([load(raw, n, seeds, tag) for n in GUILLOTINE])


def _shapes_families(raw: Path, seeds: int) -> list[Seeds]:
    factor_fams = [load(raw, "simclr-shapes", seeds, f"shapes-{f}") for f in SHAPES_FACTORS]
    for fam, factor in zip(factor_fams, SHAPES_FACTORS, strict=True):
        fam.name = f"factor: {factor}"
    return factor_fams


def guillotine_shapes(raw: Path, seeds: int = SEEDS) -> str:
    own = load(raw, "simclr-shapes", seeds)  # its own evaluation: the default factor, shape
    floor = [f"| random-init, factor: shape | {len(own.reports)} | "
             + " | ".join(cell(layer_values(own, k, source="random_init")) for k in layers_of(own))
             + " | | | |"] if own.reports else []
    return "\n".join([per_layer_table(_shapes_families(raw, seeds), random_init=False), *floor])


def _knn_table(families: list[Seeds]) -> str:
    layers = next((layers_of(f) for f in families if f.reports), [])
    lines = ["| run | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for fam in families:
        if fam.reports:
            lines.append(
                f"| {fam.name} | " + " | ".join(cell(layer_values(fam, k, "knn_test")) for k in layers) + " |"
            )
    return "\n".join(lines)


def _width_rows(raw: Path, seeds: int) -> Iterator[tuple[str, int, Seeds, Seeds, dict]]:
    """(method, width, family, its digits family, {metric: per-seed values}) per finished run."""
    for method in ("simclr", "supervised"):
        for w in WIDTHS:
            name = "simclr" if (method, w) == ("simclr", 512) else f"{method}-lw{w}"
            fam, tr = load(raw, name, seeds), load(raw, name, seeds, DIGITS)
            if not fam.reports:
                continue
            backbone = [r["layers"]["backbone"] for r in fam.reports]
            yield method, w, fam, tr, {
                "backbone linear": layer_values(fam, "backbone"),
                "best layer linear": metric(fam, lambda r: r["layers"][r["best_layer"]]["linear_test"]),
                "digits transfer": layer_values(tr, "backbone"),
                "zero frac": layer_values(fam, "backbone", "zero_frac"),
                "binarised gap": [b["linear_test"] - b["binarized_test"] for b in backbone],
                "MLP − linear": [b.get("mlp_test", float("nan")) - b["linear_test"] for b in backbone],
            }


def width_table(raw: Path, seeds: int = SEEDS) -> str:
    lines = [
        "| method | last_width | seeds | backbone linear | best layer linear | best layer (val) "
        "| digits transfer (backbone) | zero frac | binarised gap | MLP − linear | RankMe "
        "| random-init backbone | random-init digits |",
        "|" + "---|" * 13,
    ]
    for method, w, fam, tr, rows in _width_rows(raw, seeds):
        values = list(rows.values())
        rank = mean_std(layer_values(fam, "backbone", "rankme"))
        floors = [cell(layer_values(f, "backbone", source="random_init")) for f in (fam, tr)]
        best = ", ".join(sorted(r["best_layer"] for r in fam.reports))
        lines.append(
            f"| {method} | {w} | {len(fam.reports)} | "
            + " | ".join(cell(v) for v in values[:2]) + f" | {best} | "
            + " | ".join(cell(v) for v in values[2:])
            + f" | {rank[0]:.1f} | {floors[0]} | {floors[1]} |"
        )
    return "\n".join(lines)


def cheap_simclr(raw: Path, seeds: int = SEEDS) -> str:
    names = ["simclr", "simclr-neg1", *(f"simclr-noise{s}" for s in NOISE_STDS), "simclr-b32"]
    families = [fam for fam in (load(raw, n, seeds) for n in names) if fam.reports]
    lines = [*CHEAP_HEAD, *(_cheap_row(fam) for fam in families)]
    if families:
        rnd = metric(families[0], lambda r: max(v["linear_test"] for v in r["random_init"].values()))
        lines.append(f"| random-init floor (its best layer) | {len(rnd)} | | {cell(rnd)} | | |")
    return "\n".join(lines)


def cheap_projector(raw: Path, seeds: int = SEEDS) -> str:
    names = [f"mvbarlow-d{d}-{kind}-v2" for d in PROJ_DIMS for kind in ("fixed", "scaled")]
    return _cheap_rows(raw, names, seeds)


def cheap_views(raw: Path, seeds: int = SEEDS) -> str:
    return _cheap_rows(raw, VIEWS_VS_DATA, seeds)


def _cheap_rows(raw: Path, names: list[str], seeds: int) -> str:
    families = [fam for fam in (load(raw, n, seeds) for n in names) if fam.reports]
    return "\n".join([*CHEAP_HEAD, *(_cheap_row(fam) for fam in families)])


def _cheap_row(fam: Seeds) -> str:
    best = metric(fam, lambda r: r["layers"][r["best_layer"]]["linear_test"])
    knn = metric(fam, lambda r: r["layers"][r["best_layer"]]["knn_test"])
    train_s = mean_std([s["train_s"] for s in fam.summaries])
    return (
        f"| {fam.name} | {len(fam.reports)} | {cell(layer_values(fam, 'backbone'))} | {cell(best)} | "
        f"{cell(knn)} | {train_s[0]:.0f} |"
    )


# name -> table of the raw-results folder of one scale (docs/results/studies/<scale>); registered
# in bench/report.py, which fills the marked tables of docs/studies/*.md and docs/RESULTS.md
TABLES: dict[str, Callable[[Path], str]] = {
    "study-guillotine": guillotine_linear,
    "study-guillotine-digits": lambda raw: guillotine_linear(raw, DIGITS),
    "study-guillotine-knn": guillotine_knn,
    "study-guillotine-knn-digits": lambda raw: guillotine_knn(raw, DIGITS),
    "study-guillotine-shapes": guillotine_shapes,
    "study-width": width_table,
    "study-cheap-simclr": cheap_simclr,
    "study-cheap-projector": cheap_projector,
    "study-cheap-views": cheap_views,
}


# ----------------------------------------------------------------------------- plots


def _plot_layers(families: list[Seeds], path: Path, title: str) -> Path | None:
    families = [f for f in families if f.reports]
    if not families:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = layers_of(families[0])
    for fam in families:
        stats = [mean_std([100 * v for v in layer_values(fam, k)]) for k in layers]
        ax.errorbar(
            range(len(layers)),
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            marker="o",
            capsize=3,
            label=fam.name,
        )
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("linear probe test top-1 (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
    return path


def _plot_width(curves: dict[str, dict[str, list]], path: Path) -> Path | None:
    if not curves:
        return None
    keys = ["backbone linear", "digits transfer", "zero frac", "binarised gap", "MLP − linear"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, key in zip(axes, keys, strict=True):
        for method, points in curves.get(key, {}).items():
            w, m, s = zip(*points, strict=True)
            ax.errorbar(
                w, [100 * v for v in m], yerr=[100 * v for v in s], marker="o", capsize=3, label=method
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("last_width")
        ax.set_title(key + (" (%)" if key != "zero frac" else " (% of entries)"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, dpi=110)
    return path


def online_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(cumulative training seconds, online backbone probe accuracy) from metrics.jsonl: each log
    record covers the steps since the previous one at its measured views/s."""
    cfg_views, batch = _views_and_batch(run_dir)
    t, prev_step, xs, ys = 0.0, 0, [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "online/backbone" not in rec:
            continue
        t += (rec["step"] - prev_step) * cfg_views * batch / rec["views_per_s"]
        prev_step = rec["step"]
        xs.append(t)
        ys.append(100 * rec["online/backbone"])
    return xs, ys


def _views_and_batch(run_dir: Path) -> tuple[int, int]:
    from ssl_lab.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    return cfg.views.n, cfg.optim.batch_size


def _plot_wallclock(out: Path, seeds: int, path: Path) -> Path | None:
    runs = dict(zip(("V=2, whole subset", "V=4, half subset"), VIEWS_VS_DATA, strict=True))
    fig, ax = plt.subplots(figsize=(6, 4))
    drew = False
    for (label, name), colour in zip(runs.items(), ("C0", "C1"), strict=True):
        for seed in range(seeds):
            run_dir = out / f"{name}-s{seed}"
            if (run_dir / "summary.json").is_file():
                xs, ys = online_curve(run_dir)
                ax.plot(xs, ys, color=colour, alpha=0.7, label=label if seed == 0 else None)
                drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.set_xlabel("training time (s, this machine, 1 thread)")
    ax.set_ylabel("online backbone probe (train views, %)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
    return path


def plot_all(raw: Path, seeds: int, img: Path) -> list[Path]:
    """Draw every study plot that has data into img/; the paths written."""
    curves: dict[str, dict[str, list]] = {}
    for method, w, _, _, rows in _width_rows(raw, seeds):
        for key, values in rows.items():
            curves.setdefault(key, {}).setdefault(method, []).append((w, *mean_std(values)))
    drawn = [
        _plot_layers([load(raw, n, seeds) for n in GUILLOTINE], img / "study-guillotine.png",
                     "Fashion-MNIST, linear probe per layer"),
        _plot_layers(_shapes_families(raw, seeds), img / "study-guillotine-shapes.png",
                     "shapes: SimCLR layers per factor"),
        _plot_width(curves, img / "study-width.png"),
        _plot_wallclock(raw, seeds, img / "study-views-wallclock.png"),
    ]
    return [path for path in drawn if path]
