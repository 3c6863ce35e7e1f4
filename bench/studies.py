"""The layer / width / cheap-SSL studies (docs/RESULTS.md, "Studies"; tables in docs/studies/).

    python bench/studies.py run    [--scale cpu|gpu] [--seeds 3] [--worker 0/2] [--out runs/studies]
    python bench/studies.py report [--scale cpu|gpu] [--seeds 3] [--out runs/studies] [--docs docs/studies]

`run` trains every run the studies need (each an ordinary run directory under --out, shared
between studies: the SimCLR baseline serves the Guillotine, width and cheap-SSL tables) and
the extra evaluations (transfer to digits, one per shapes factor). Finished runs and evals are
skipped and interrupted runs resume, so the command continues where it stopped. Runs are
ordered seed by seed, so an early stop leaves every study with the same, complete seeds.
`--worker i/n` takes every n-th run from the i-th: n processes split the work (one thread each
at the cpu scale). `report` writes markdown tables and plots of whatever has finished.

`--scale cpu` is sized for a 2-core CPU (1/8-width ResNet-18, a 20k-image subset, 3 epochs);
`--scale gpu` is the full-size version (full-width ResNet-18, every image, 100 epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssl_lab.eval.run import dataset_tag
from ssl_lab.plots import plt, save_figure  # headless backend

ROOT = Path(__file__).resolve().parents[1]
SCALES = {
    "cpu": (
        "model.width=0.125",
        "data.fraction=0.37",
        "eval.train_fraction=0.37",
        "train.epochs=3",
        "train.threads=1",
    ),
    "gpu": (
        "model.width=1.0",
        "data.fraction=1.0",
        "eval.train_fraction=1.0",
        "train.epochs=100",
        "optim.warmup_epochs=10",
    ),
}
TRANSFER = ("data.name=digits",)
SHAPES_FACTORS = ("shape", "colour", "x", "y", "scale")
WIDTHS = (32, 128, 512, 2048)
NOISE_STDS = (0.1, 0.4)
PROJ_DIMS = (16, 256)
# The defaults every study run used: lr 2e-3, features extracted under the training
# precision (bf16 here) and last_width 512. All three defaults have moved since
# (docs/RESULTS.md: "How the defaults were chosen", "Evaluation precision"); pinning them keeps
# the documented runs' settings (bit-exact numbers need commit 6cec663, before the small-map
# convs changed the float order). A config file's own value and a scale or run override still
# win.
STUDY_DEFAULTS = {"optim.lr": 0.002, "eval.precision": "train", "model.last_width": 512}
IMAGE_SIZES = {"fashion-mnist": 28}  # for the view-size pin of study_config
NO_BASELINES = ("eval.baselines=false",)  # their random-init floor is the SimCLR architecture's


@dataclass(frozen=True)
class Run:
    """One training run (name = directory) and the extra `ssl-lab eval` override lists it needs."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    evals: tuple[tuple[str, ...], ...] = ()

    def seeded(self, seed: int) -> Run:
        return Run(f"{self.name}-s{seed}", self.config, (*self.overrides, f"seed={seed}"), self.evals)


def _barlow(d: int, scaled: bool, views: int = 2, fraction: float | None = None) -> Run:
    """multiview_barlow with the fastssl projector of width d; beta fixed at the d=64 value of
    Ghosh et al. (0.04) or scaled as 0.04 * 64 / d."""
    name = f"mvbarlow-d{d}-{'scaled' if scaled else 'fixed'}-v{views}" + (f"-f{fraction}" if fraction else "")
    extra = (f"data.fraction={fraction}",) if fraction else ()
    return Run(
        name,
        "multiview_barlow",
        (
            f"model.projector={d}n-{d}",
            f"views.n={views}",
            f"method.beta_scaling={'inverse_dim' if scaled else 'none'}",
            *extra,
            *NO_BASELINES,
        ),
    )


# the SimCLR baseline (last_width 512, pinned in STUDY_DEFAULTS) doubles as the width study's 512 point
SIMCLR = Run("simclr", "simclr", ("eval.mlp=true",), evals=(TRANSFER,))
STUDIES: dict[str, list[Run]] = {
    # Guillotine Regularization: per-layer probes in and out of distribution; weak vs strong
    # views; label positives
    "guillotine": [
        SIMCLR,
        Run("vicreg", "vicreg", evals=(TRANSFER,)),
        Run("simclr-weak", "simclr", ("views.recipe=weak",), evals=(TRANSFER,)),
        Run("supcon", "supcon", evals=(TRANSFER,)),
        # per-factor probes skip the baselines (5 more cold evaluations per seed); the run's own
        # evaluation (default target: shape) has them
        Run(
            "simclr-shapes",
            "simclr",
            ("data.name=shapes", "data.fraction=1.0"),
            evals=tuple((f"data.target={f}", *NO_BASELINES) for f in SHAPES_FACTORS),
        ),
    ],
    # Expand or Narrow: last_width with the projector fixed, SSL and supervised
    "width": [
        *(
            Run(f"simclr-lw{w}", "simclr", (f"model.last_width={w}", "eval.mlp=true"), evals=(TRANSFER,))
            if w != 512
            else SIMCLR
            for w in WIDTHS
        ),
        *(
            Run(
                f"supervised-lw{w}",
                "supervised",
                (f"model.last_width={w}", "eval.mlp=true"),
                evals=(TRANSFER,),
            )
            for w in WIDTHS
        ),
    ],
    # Democratizing JE-SSL (one negative, noise-only views, small batches) and small projectors
    # with more views (Ghosh et al. 2024: projector width, views vs data)
    "cheap": [
        SIMCLR,
        Run("simclr-neg1", "simclr", ("method.negatives=1",)),
        *(
            Run(f"simclr-noise{s}", "simclr", ("views.recipe=noise", f"views.noise_std={s}"))
            for s in NOISE_STDS
        ),
        Run("simclr-b32", "simclr", ("optim.batch_size=32",)),
        *(_barlow(d, scaled) for d in PROJ_DIMS for scaled in (False, True)),
        _barlow(256, True, views=2),
        _barlow(256, True, views=4, fraction=0.185),
    ],
}


def all_runs(seeds: int) -> list[Run]:
    """Every distinct run, seed by seed (seed 0 of every study first)."""
    unique = {}
    for seed in range(seeds):
        for runs in STUDIES.values():
            for run in runs:
                unique.setdefault(run.seeded(seed).name, run.seeded(seed))
    return list(unique.values())


# ----------------------------------------------------------------------------- running


def eval_tag(overrides: tuple[str, ...], cfg_path: Path) -> str:
    from ssl_lab.config import load_config

    cfg = load_config(cfg_path, list(overrides))
    return dataset_tag(cfg.data.name, cfg.data.target)


def study_config(run: Run, out: Path, scale: tuple[str, ...]):
    """The run's config: its YAML, the pinned defaults, the scale, its overrides, and views at
    the image size wherever `views.size=0` means a smaller default (Fashion-MNIST: 20 px; every
    study ran with 28-px views, before that default)."""
    from ssl_lab.config import load_config
    from ssl_lab.data.sources import VIEW_SIZES

    path = ROOT / "configs" / f"{run.config}.yaml"
    overrides = [*pinned_defaults(path), *scale, *run.overrides, f"run.dir={out / run.name}"]
    cfg = load_config(path, overrides)
    if cfg.views.size == 0 and cfg.data.name in VIEW_SIZES:
        cfg = load_config(path, [*overrides, f"views.size={IMAGE_SIZES[cfg.data.name]}"])
    return cfg


def execute(run: Run, out: Path, scale: tuple[str, ...]) -> None:
    from ssl_lab.eval.run import evaluate_run
    from ssl_lab.sweep import run_point

    run_dir = out / run.name
    cfg = study_config(run, out, scale)
    failure = run_point(run.name, cfg, run_dir, "[study]", _train)
    if failure or not (run_dir / "summary.json").is_file():
        return
    for overrides in run.evals:
        if not (run_dir / "evals" / f"{eval_tag(overrides, run_dir / 'config.yaml')}.json").is_file():
            evaluate_run(run_dir, list(overrides))


def pinned_defaults(config_path: Path) -> list[str]:
    """STUDY_DEFAULTS as overrides, except the keys the config file sets itself."""
    from ssl_lab.config_io import read_yaml

    tree = read_yaml(config_path)

    def sets(key: str) -> bool:
        section, leaf = key.split(".")
        return leaf in (tree.get(section) or {})

    return [f"{key}={value}" for key, value in STUDY_DEFAULTS.items() if not sets(key)]


def _train(cfg) -> None:
    from ssl_lab.train_loop import train

    train(cfg)


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
    parts = [
        "## Guillotine: per-layer linear probe (test top-1 %, mean ± std over seeds)",
        "",
        "### In distribution (Fashion-MNIST)",
        "",
        per_layer_table([load(out, n, seeds) for n in names]),
        "",
        "### Transfer to digits (encoder frozen, images resized to 28 px)",
        "",
        per_layer_table([load(out, n, seeds, "digits") for n in names]),
        "",
    ]
    parts += [
        "### kNN top-1 per layer (Fashion-MNIST)",
        "",
        _knn_table([load(out, n, seeds) for n in names]),
        "",
        "### kNN top-1 per layer (transfer to digits)",
        "",
        _knn_table([load(out, n, seeds, "digits") for n in names]),
        "",
    ]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["run", "report", "list"])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th run starting at the i-th")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "studies")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "studies")
    args = parser.parse_args()
    runs = all_runs(args.seeds)
    if args.action == "list":
        print("\n".join(f"{r.name}: {r.config} {' '.join(r.overrides)}" for r in runs))
    elif args.action == "run":
        i, n = (int(x) for x in args.worker.split("/"))
        for run in runs[i::n]:
            execute(run, args.out / args.scale, SCALES[args.scale])
    else:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name, fn in REPORTS.items():
            text = fn(args.out / args.scale, args.seeds, args.docs / "img")
            command = f"python bench/studies.py report --scale {args.scale} --seeds {args.seeds}"
            header = (f"<!-- made by `{command}` from the run directories; scale, machine and "
                      "seeds: docs/RESULTS.md, Studies -->\n\n")
            (args.docs / f"{name}.md").write_text(header + text + "\n")
            print(text, "\n")


if __name__ == "__main__":
    main()
