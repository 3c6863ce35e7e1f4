"""Time the cold main job (`ssl-lab train`, no arguments) of one source tree, optionally with the
CPU masked down to AVX2, and record what it measured as JSON.

    python bench/main_job.py SRC_DIR OUT.json [--avx2] [--tag NAME] [key=value ...]

SRC_DIR is the `src/` of the tree to run (e.g. a `git worktree` of an older commit), so before
and after can be timed back to back on one machine. "Cold": a fresh baseline cache (the
random-init and raw-pixel probes are recomputed) and a fresh run directory. `--avx2` sets
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 and train.precision=fp32 (what `auto`
resolves to on a CPU without native bf16). The JSON holds the wall time of the whole command,
its peak RSS (getrusage of the child), the run's summary.json and the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


ISA_PROBE = """
import torch
from torch.utils import mkldnn
mkldnn.to_mkldnn(torch.nn.Conv2d(8, 8, 3))(torch.randn(1, 8, 16, 16).to_mkldnn())  # oneDNN says its ISA
print("aten", torch.backends.cpu.get_cpu_capability())
"""


def isa_in_effect(env: dict) -> dict:
    """What ATen and oneDNN really dispatch to under `env` (oneDNN prints its ISA verbosely)."""
    out = subprocess.run([sys.executable, "-c", ISA_PROBE], env=env | {"ONEDNN_VERBOSE": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    aten = next((line.split()[1] for line in out.splitlines() if line.startswith("aten ")), None)
    onednn = next((line.split("isa:", 1)[1].split(",")[0] for line in out.splitlines()
                   if "isa:" in line), None)
    return {"aten_capability": aten, "onednn_isa": onednn}


def run(src: Path, overrides: list[str], avx2: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"PYTHONPATH": str(src.resolve()), "SSL_LAB_CACHE": f"{tmp}/cache"}
        extra = []
        if avx2:
            env |= {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
            extra = ["train.precision=fp32"]
        cmd = [sys.executable, "-m", "ssl_lab", "train", f"run.dir={tmp}/run", *overrides, *extra]
        isa = isa_in_effect(env)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"main job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        env_json = json.loads(Path(f"{tmp}/run/env.json").read_text())
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"src": str(src), "avx2_masked": avx2, "overrides": [*overrides, *extra],
            "isa": isa, "wall_s": wall, "peak_rss_gb": peak_kb / 1e6, "cpu": cpu_model(),
            "precision": env_json.get("precision"), "summary": summary,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def commit_of(src: Path) -> str | None:
    """The short commit of the tree `src` belongs to (None outside git)."""
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def table(paths: list[Path]) -> str:
    """One row per JSON this script wrote: docs/RESULTS.md's main-job tables (bench/report.py)."""
    lines = ["| tree | wall | train s | eval s | backbone test top-1 (best on val) | raw pixels "
             "| peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        r = json.loads(path.read_text())
        s = r["summary"]
        tree = r.get("tag") or path.stem
        if r.get("commit"):
            tree += f" ({r['commit']})"
        lines.append(f"| {tree} | {r['wall_s']:.0f} s | {s['train_s']:.0f} | {s['eval_s']:.0f} | "
                     f"{100 * s['probes'][s['best_layer']]:.2f} % | {100 * s['pixel_probe']:.2f} % "
                     f"| {r['peak_rss_gb']:.2f} GB |")
    return "\n".join(lines)


def protocols_table(path: Path, eval_json: Path | None = None) -> str:
    """Both linear protocols of one main-job JSON (eval.linear=augmented): the frozen per-layer
    probe at the val-chosen layer and the papers' augmented linear evaluation (from the
    summary, or from the run's eval.json where the summary predates its `augmented` key)."""
    s = json.loads(path.read_text())["summary"]
    best = s["best_layer"]
    aug = s.get("augmented") or json.loads(eval_json.read_text())["augmented"]
    return "\n".join([
        "| protocol | layer | val top-1 | test top-1 |", "|---|---|---:|---:|",
        f"| frozen (`eval.linear=frozen`, L-BFGS on frozen features, wd chosen on val) | {best} "
        f"| {100 * s['probes_val'][best]:.2f} % | {100 * s['probes'][best]:.2f} % |",
        f"| augmented (`eval.linear=augmented`, SGD {aug['epochs']} epochs on crops + flips) | "
        f"{aug['layer']} | {100 * aug['val']:.2f} % | {100 * aug['test']:.2f} % |",
        f"| raw pixels (frozen protocol) | | | {100 * s['pixel_probe']:.2f} % |"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--avx2", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()  # overrides may follow --tag
    result = run(args.src, args.overrides, args.avx2) | {"tag": args.tag,
                                                         "commit": commit_of(args.src)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    s = result["summary"]
    print(f"{args.tag}: wall {result['wall_s']:.0f} s (train {s['train_s']:.0f}, eval "
          f"{s.get('eval_s', 0):.0f}), best {s['best_layer']} {100 * s['probes'][s['best_layer']]:.2f}"
          f", pixels {100 * s['pixel_probe']:.2f}, RSS {result['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
