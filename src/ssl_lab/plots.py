"""Plots people would rather look at than read: per-layer probe accuracy (the Guillotine plot)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: plt.Figure, path: Path, dpi: float | None = None) -> Path:
    """Lay out, write (making parent folders) and close a figure: every plot ends here."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_layer_probes(report: dict, path: Path) -> Path:
    """Linear and kNN test top-1 per layer (shallow → deep), random-init and raw-pixel floors."""
    layers = list(report["layers"])
    xs = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(layers) + 2), 3.6), dpi=120)
    ax.plot(xs, [100 * report["layers"][k]["linear_test"] for k in layers], "o-", label="linear")
    ax.plot(xs, [100 * report["layers"][k]["knn_test"] for k in layers], "s--", label="kNN")
    if "random_init" in report:
        ax.plot(xs, [100 * report["random_init"][k]["linear_test"] for k in layers], "^:",
                color="grey", label="random init (linear)")
    if "pixels" in report:
        ax.axhline(100 * report["pixels"]["linear_test"], color="black", lw=0.8, ls="-.",
                   label="raw pixels (linear)")
    best = layers.index(report["best_layer"])
    ax.axvline(best, color="tab:green", alpha=0.3, lw=6, label="best layer (val)")
    ax.set_xticks(list(xs), layers, rotation=30)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"per-layer probes on {report['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)
