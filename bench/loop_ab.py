"""Full training-loop throughput of two source trees, alternated A B B A ... so that the machine's
drift hits both: each measurement is a fresh `ssl-lab train` process of the main job's config
(views, model, loss, optimizer, probes, logging, checkpoints), timed by its own summary.json.

    python bench/loop_ab.py /tmp/old/src src OUT.json [--rounds 2] [key=value ...]

Default run: a quarter of the main job's training split for one epoch (105 steps), two threads,
no offline evaluation. Prints the median views/s of each tree and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from main_job import cpu_model  # noqa: E402

DEFAULT = ["data.fraction=0.25", "train.epochs=1", "eval.enabled=false", "train.threads=2"]


def views_per_s(src: Path, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"PYTHONPATH": str(src.resolve()), "SSL_LAB_CACHE": f"{tmp}/cache"}
        proc = subprocess.run([sys.executable, "-m", "ssl_lab", "train", f"run.dir={tmp}/r",
                               *DEFAULT, *overrides], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{src}: training failed:\n{proc.stderr[-2000:]}")
        return json.loads(Path(f"{tmp}/r/summary.json").read_text())["views_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for key in ("ab" if r % 2 == 0 else "ba"):
            runs[key].append(views_per_s(getattr(args, key), args.overrides))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"a": str(args.a), "b": str(args.b), "overrides": [*DEFAULT, *args.overrides],
              "views_per_s": runs, "median": med, "ratio_b_over_a": med["b"] / med["a"],
              "cpu": cpu_model()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"a {med['a']:.0f} views/s, b {med['b']:.0f} views/s, b/a {result['ratio_b_over_a']:.3f}"
          f" (runs: {runs})")


if __name__ == "__main__":
    main()
