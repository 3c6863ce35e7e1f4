"""The studies' tables and plots: `python bench/studies.py report` (bench/studies.py holds the
study definitions, running, freezing and the command line).

Reads whatever study runs have finished under --out/<scale> (each run's summary.json and its
evals/<dataset tag>.json, seed by seed), and builds per study (REPORTS: guillotine, width,
cheap) a markdown table, mean ± std over the seeds found, and its plots under --docs/img.
A run family with no finished seed is left out of its table; a plot with nothing to draw is
not written.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssl_lab.eval.run import dataset_tag
from ssl_lab.plots import plt, save_figure  # headless backend

sys.path.insert(0, str(Path(__file__).parent))
from studies import NOISE_STDS, PROJ_DIMS, SHAPES_FACTORS, WIDTHS  # noqa: E402

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


def per_layer_table(families: list[Seeds], random_init: bool = True) -> str:
    """Linear-probe test top-1 per layer, mean ± std over seeds, + best layer (on val) counts."""
    layers = next((layers_of(f) for f in families if f.reports), [])
    head = "| run | seeds | " + " | ".join(layers) + " | best layer (val) | backbone − last |"
    lines = [head, "|" + "---|" * (len(layers) + 4)]
    for fam in families:
        if not fam.reports:
            continue
        gap = [
            r["layers"]["backbone"]["linear_test"] - r["layers"][layers[-1]]["linear_test"]
            for r in fam.reports
        ]
        best = ", ".join(sorted(r["best_layer"] for r in fam.reports))
        lines.append(
            f"| {fam.name} | {len(fam.reports)} | "
            + " | ".join(cell(layer_values(fam, k)) for k in layers)
            + f" | {best} | {cell(gap)} |"
        )
    if random_init:
        fam = next((f for f in families if f.reports and "random_init" in f.reports[0]), None)
        if fam:
            lines.append(
                f"| random-init ({fam.name} arch) | {len(fam.reports)} | "
                + " | ".join(cell(layer_values(fam, k, source="random_init")) for k in layers)
                + " | | |"
            )
            pix = [r["pixels"]["linear_test"] for r in fam.reports if "pixels" in r]
            lines += ["", f"Raw pixels, same probe: {cell(pix)} ({len(pix)} seeds)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the reports


def report_guillotine(out: Path, seeds: int, img: Path) -> str:
    names = ["simclr", "vicreg", "simclr-weak", "supcon"]
    parts = ["## Guillotine: per-layer linear probe (test top-1 %, mean ± std over seeds)", ""]
    for title, make in (("", per_layer_table), ("kNN top-1 per layer: ", _knn_table)):
        for where, tag in (("In distribution (Fashion-MNIST)", None),
                           ("Transfer to digits (encoder frozen, images resized to 28 px)",
                            "digits")):
            parts += [f"### {title}{where}", "", make([load(out, n, seeds, tag) for n in names]),
                      ""]
    factor_fams = [load(out, "simclr-shapes", seeds, f"shapes-{f}") for f in SHAPES_FACTORS]
    for fam, factor in zip(factor_fams, SHAPES_FACTORS, strict=True):
        fam.name = f"factor: {factor}"
    own = load(out, "simclr-shapes", seeds)  # its own evaluation: the default factor, shape
    floor = [f"| random-init, factor: shape | {len(own.reports)} | "
             + " | ".join(cell(layer_values(own, k, source="random_init")) for k in layers_of(own))
             + " | | |"] if own.reports else []
    parts += [
        "### shapes: one SimCLR encoder, probed per factor",
        "",
        "\n".join([per_layer_table(factor_fams, random_init=False), *floor]),
        "",
    ]
    _plot_layers(
        [load(out, n, seeds) for n in names],
        img / "study-guillotine.png",
        "Fashion-MNIST, linear probe per layer",
    )
    _plot_layers(factor_fams, img / "study-guillotine-shapes.png", "shapes: SimCLR layers per factor")
    return "\n".join(parts)


def _knn_table(families: list[Seeds]) -> str:
    layers = next((layers_of(f) for f in families if f.reports), [])
    lines = ["| run | " + " | ".join(layers) + " |", "|" + "---|" * (len(layers) + 1)]
    for fam in families:
        if fam.reports:
            lines.append(
                f"| {fam.name} | " + " | ".join(cell(layer_values(fam, k, "knn_test")) for k in layers) + " |"
            )
    return "\n".join(lines)


def report_width(out: Path, seeds: int, img: Path) -> str:
    head = (
        "| method | last_width | seeds | backbone linear | best layer linear | digits transfer (backbone) "
        "| zero frac | binarised gap | MLP − linear | RankMe | random-init backbone | random-init digits |"
    )
    lines = [
        "## Expand/Narrow: last_width with the projector fixed (backbone layer unless said)",
        "",
        head,
        "|" + "---|" * 12,
    ]
    curves: dict[str, dict[str, list]] = {}
    for method in ("simclr", "supervised"):
        for w in WIDTHS:
            name = "simclr" if (method, w) == ("simclr", 512) else f"{method}-lw{w}"
            fam, tr = load(out, name, seeds), load(out, name, seeds, "digits")
            if not fam.reports:
                continue
            rows = {
                "backbone linear": layer_values(fam, "backbone"),
                "best layer linear": metric(fam, lambda r: r["layers"][r["best_layer"]]["linear_test"]),
                "digits transfer": layer_values(tr, "backbone"),
                "zero frac": layer_values(fam, "backbone", "zero_frac"),
                "binarised gap": metric(
                    fam,
                    lambda r: (
                        r["layers"]["backbone"]["linear_test"] - r["layers"]["backbone"]["binarized_test"]
                    ),
                ),
                "MLP − linear": metric(
                    fam,
                    lambda r: (
                        r["layers"]["backbone"].get("mlp_test", float("nan"))
                        - r["layers"]["backbone"]["linear_test"]
                    ),
                ),
            }
            rank = mean_std(layer_values(fam, "backbone", "rankme"))
            floors = [cell(layer_values(f, "backbone", source="random_init")) for f in (fam, tr)]
            lines.append(
                f"| {method} | {w} | {len(fam.reports)} | "
                + " | ".join(cell(v) for v in rows.values())
                + f" | {rank[0]:.1f} | {floors[0]} | {floors[1]} |"
            )
            for key, values in rows.items():
                curves.setdefault(key, {}).setdefault(method, []).append((w, *mean_std(values)))
    _plot_width(curves, img / "study-width.png")
    return "\n".join(lines)


def report_cheap(out: Path, seeds: int, img: Path) -> str:
    names = ["simclr", "simclr-neg1", *(f"simclr-noise{s}" for s in NOISE_STDS), "simclr-b32"]
    lines = [
        "## Cheap SSL: SimCLR variants (test top-1 %, mean ± std over seeds)",
        "",
        "| run | seeds | backbone linear | best layer linear (val-chosen) | kNN @best | train s |",
        "|---|---|---|---|---|---|",
    ]
    floor = None
    for name in names:
        fam = load(out, name, seeds)
        if not fam.reports:
            continue
        floor = floor or fam
        lines.append(_cheap_row(name, fam))
    if floor:
        rnd = metric(floor, lambda r: max(v["linear_test"] for v in r["random_init"].values()))
        lines.append(f"| random-init floor (its best layer) | {len(rnd)} | | {cell(rnd)} | | |")
    lines += [
        "",
        "## Small projectors: multiview_barlow, projector d ∈ {16, 256}, β fixed (0.04) vs β = 0.04·64/d",
        "",
        "| run | seeds | backbone linear | best layer linear (val-chosen) | kNN @best | train s |",
        "|---|---|---|---|---|---|",
    ]
    for d in PROJ_DIMS:
        for kind in ("fixed", "scaled"):
            name = f"mvbarlow-d{d}-{kind}-v2"
            fam = load(out, name, seeds)
            if fam.reports:
                lines.append(_cheap_row(name, fam))
    lines += [
        "",
        "## Views vs data: V=2 on the whole subset vs V=4 on half of it (equal epochs)",
        "",
        "| run | seeds | backbone linear | best layer linear (val-chosen) | kNN @best | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("mvbarlow-d256-scaled-v2", "mvbarlow-d256-scaled-v4-f0.185"):
        fam = load(out, name, seeds)
        if fam.reports:
            lines.append(_cheap_row(name, fam))
    _plot_wallclock(out, seeds, img / "study-views-wallclock.png")
    return "\n".join(lines)


def _cheap_row(name: str, fam: Seeds) -> str:
    best = metric(fam, lambda r: r["layers"][r["best_layer"]]["linear_test"])
    knn = metric(fam, lambda r: r["layers"][r["best_layer"]]["knn_test"])
    train_s = mean_std([s["train_s"] for s in fam.summaries])
    return (
        f"| {name} | {len(fam.reports)} | {cell(layer_values(fam, 'backbone'))} | {cell(best)} | "
        f"{cell(knn)} | {train_s[0]:.0f} |"
    )


# ----------------------------------------------------------------------------- plots


def _plot_layers(families: list[Seeds], path: Path, title: str) -> None:
    families = [f for f in families if f.reports]
    if not families:
        return
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


def _plot_width(curves: dict[str, dict[str, list]], path: Path) -> None:
    if not curves:
        return
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


def _plot_wallclock(out: Path, seeds: int, path: Path) -> None:
    runs = {
        "V=2, whole subset": "mvbarlow-d256-scaled-v2",
        "V=4, half subset": "mvbarlow-d256-scaled-v4-f0.185",
    }
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
        return
    ax.set_xlabel("training time (s, this machine, 1 thread)")
    ax.set_ylabel("online backbone probe (train views, %)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)


REPORTS = {"guillotine": report_guillotine, "width": report_width, "cheap": report_cheap}
