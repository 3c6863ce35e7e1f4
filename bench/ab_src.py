"""Model-only training step of two source trees, alternated: the machine's drift hits both.

    git worktree add /tmp/old COMMIT
    python bench/ab_src.py /tmp/old/src src [--rounds 3] [--steps 30] [--out F] [key=value ...]

Each measurement is a fresh process whose `ssl_lab` is imported from the given tree (checked)
and which runs this checkout's `bench_train.model_only` (forward + loss + backward + AdamW on
one fixed batch of views), so the library code is the only difference. Prints a markdown row
and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CHILD = """
import json, sys, tempfile
from pathlib import Path
import ssl_lab
if not Path(ssl_lab.__file__).resolve().is_relative_to(Path({src!r}).resolve()):
    sys.exit(f"ssl_lab was imported from {{ssl_lab.__file__}}, not from {src}")
sys.path.insert(0, {bench!r})
from bench_train import model_only
from ssl_lab.config import load_config
with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(None, [*{overrides!r}, "eval.enabled=false", f"run.dir={{tmp}}/a"])
    print(model_only(cfg, {steps}))
"""


def measure(src: Path, steps: int, overrides: list[str]) -> float:
    code = CHILD.format(src=str(src), bench=str(BENCH_DIR), overrides=overrides, steps=steps)
    child = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(src)),
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(child.stderr.strip().splitlines()[-1] if child.stderr else "child failed")
    return float(child.stdout.strip().splitlines()[-1])


def table(result: dict, a: str = "A", b: str = "B") -> str:
    """docs/RESULTS.md's table from the JSON this script writes (`--out`): each tree's median
    and runs (views/s), and the ratio of the medians, B over A."""
    def runs(key: str) -> str:
        return (f"{result['median'][key]:,.0f} "
                f"({', '.join(f'{x:,.0f}' for x in result['runs'][key])})")
    return "\n".join([f"| {a} views/s | {b} views/s | speed-up |", "|---|---|---:|",
                      f"| {runs('a')} | {runs('b')} | **{result['b_over_a']:.2f}×** (medians) |"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path, help="source tree A (the directory holding ssl_lab/)")
    parser.add_argument("b", type=Path, help="source tree B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    runs: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.rounds):
        for key in ("a", "b") if r % 2 == 0 else ("b", "a"):  # alternate who goes first
            runs[key].append(measure(getattr(args, key), args.steps, args.overrides))
        print(f"round {r}: A {runs['a'][-1]:.0f}, B {runs['b'][-1]:.0f} views/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"a": str(args.a), "b": str(args.b), "runs": runs, "median": med,
              "b_over_a": med["b"] / med["a"], "steps": args.steps, "overrides": args.overrides,
              "cpu": platform.processor() or platform.machine()}
    print(f"| A views/s (runs) | B views/s (runs) | B / A |\n|---|---|---|\n"
          f"| {med['a']:.0f} ({', '.join(f'{x:.0f}' for x in runs['a'])}) | "
          f"{med['b']:.0f} ({', '.join(f'{x:.0f}' for x in runs['b'])}) | {result['b_over_a']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
