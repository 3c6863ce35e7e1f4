"""Train every config in configs/ on Fashion-MNIST with the main job's budget, then tabulate the
per-layer linear probes (the Guillotine gap between backbone and projector layers).

    python bench/methods_table.py [--out runs/methods] [key=value ...]

Each config is an ordinary run directory under --out; finished ones (summary.json present) are
skipped, so the script resumes. The markdown table goes to stdout and to --out/methods.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_lab.config import load_config
from ssl_lab.train import train

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def run_all(out: Path, overrides: list[str], run: bool = True) -> list[tuple[str, dict]]:
    results = []
    for path in CONFIGS:
        if path.stem == "default":
            continue
        run_dir = out / path.stem
        if not (run_dir / "summary.json").is_file():
            if not run:
                continue
            resume = ["resume=true"] if (run_dir / "config.yaml").is_file() else []
            train(load_config(path, [f"run.dir={run_dir}", *overrides, *resume]))
        results.append((path.stem, json.loads((run_dir / "summary.json").read_text())))
    return results


def table(results: list[tuple[str, dict]]) -> str:
    layers = list(results[0][1]["probes"])
    head = "| config | " + " | ".join(layers) + " | best (val) | kNN@best | train s | views/s |"
    lines = [head, "|" + "---|" * (len(layers) + 5)]
    for name, s in results:
        cells = [f"{100 * s['probes'][k]:.1f}" if k in s["probes"] else "-" for k in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['best_layer']} | "
                     f"{100 * s['knn_top1']:.1f} | {s['train_s']:.0f} | {s['views_per_s']:.0f} |")


    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--no-run", action="store_true", help="only tabulate finished runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    text = table(run_all(args.out, args.overrides, run=not args.no_run))
    (args.out / "methods.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
