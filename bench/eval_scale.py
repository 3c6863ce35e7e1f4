"""Peak RSS and wall time of `ssl-lab eval` on synthetic packed stores of growing size.

    python bench/eval_scale.py [--sizes 50000,500000] [--work DIR] [--out docs/bench/eval_scale.json]

For each size N: N procedural shape images (`data.shapes`, 32 px, label = the shape) plus a
fixed val (5,000) and test (10,000) split are written to an npz and packed once into
WORK/store-N (`ssl-lab data pack`; the npz is deleted afterwards). One short run is trained on
the smallest store (only its encoder matters: the main job's architecture by default). Then
`python -m ssl_lab eval RUN data.name=packed:WORK/store-N eval.baselines=false` runs in a
child process, once with `eval.layers=backbone,proj1` and once with every layer; the parent
records the child's wall time and, sampled every 0.2 s from /proc, its peak RSS (the kernel's
VmHWM) and the peaks of its anonymous and file-backed resident memory (pages of the
store's memory map count in RSS until released). `--baselines` adds the random-init and
raw-pixel baselines. Val and test keep their size, so the kNN's work grows linearly with N.

The ratios between the largest and the smallest size are written with the raw rows; the
evaluation's per-layer `solver` (in-memory or blocked) and accuracies come from its eval.json.
Nothing is timed inside the evaluation: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ssl_lab.config import load_config
from ssl_lab.data.pack import pack
from ssl_lab.data.shapes import draw
from ssl_lab.eval.run import dataset_tag
from ssl_lab.train_loop import train

sys.path.insert(0, str(Path(__file__).parent))
from main_job import cpu_model  # noqa: E402  (a sibling script)

ROOT = Path(__file__).resolve().parents[1]
LAYER_SETS = ("backbone,proj1", "all")
_CHUNK = 50_000  # images drawn at a time (bounded memory while drawing)


def synthetic_npz(path: Path, n_train: int, n_val: int, n_test: int, size: int) -> Path:
    """x_/y_train, val, test of procedural shapes (labels: the shape, 4 classes)."""
    arrays = {}
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        images = np.empty((n, size, size, 3), np.uint8)
        labels = np.empty(n, np.int64)
        rng = np.random.default_rng([7, stream])
        for start in range(0, n, _CHUNK):
            part = draw(min(_CHUNK, n - start), size, rng)
            images[start:start + len(part.labels)] = part.images
            labels[start:start + len(part.labels)] = part.labels[:, 0]
        arrays |= {f"x_{split}": images, f"y_{split}": labels}
    np.savez(path, **arrays)
    return path


def make_store(work: Path, n: int, args: argparse.Namespace) -> Path:
    store = work / f"store-{n}"
    if not (store / "header.json").is_file():
        npz = synthetic_npz(work / f"synthetic-{n}.npz", n, args.val, args.test, args.image_size)
        pack(f"npz:{npz}", store, progress=False)
        npz.unlink()
    return store


def make_run(work: Path, store: Path, overrides: list[str]) -> Path:
    run = work / "run"
    if not (run / "checkpoints" / "latest").is_file():
        cfg = load_config(None, [f"data.name=packed:{store}", f"run.dir={run}",
                                 "eval.enabled=false", *overrides])
        train(cfg)
    return run


def _status(pid: int) -> dict[str, int]:
    """RssAnon / RssFile / VmHWM of a process in MB (empty once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) // 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(command: list[str]) -> dict:
    """Run `command`; its wall time, peak RSS and sampled anon / file RSS peaks.

    The peak RSS is the child's VmHWM read from /proc every 0.2 s (a high-water mark, so only a
    peak in the last 0.2 s could be missed). Not wait4's ru_maxrss: Linux starts the child's
    high-water mark at the size of the forked parent, before exec, and this parent holds the
    synthetic images it generated."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            for key, value in _status(child.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, _usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    err = child.stderr.read().decode(errors="replace")
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": peaks["VmHWM"],
            "peak_rss_anon_mb_sampled": peaks["RssAnon"],
            "peak_rss_file_mb_sampled": peaks["RssFile"]}


def evaluate(run: Path, store: Path, layers: str, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "ssl_lab", "eval", str(run), f"data.name=packed:{store}",
               f"eval.layers={layers}", *extra]
    row = measure(command)
    report = json.loads((run / "evals" / f"{dataset_tag(f'packed:{store}')}.json").read_text())
    row["layers"] = {name: {"solver": r["solver"], "linear_test": r["linear_test"],
                            "knn_test": r["knn_test"]} for name, r in report["layers"].items()}
    row["eval_s_reported"] = round(report["eval_s"], 2)
    return row


def ratios(rows: list[dict]) -> dict:
    """Largest over smallest size, per layer set: RSS and time (and the size ratio)."""
    out = {}
    for layers in {r["eval_layers"] for r in rows}:
        mine = sorted((r for r in rows if r["eval_layers"] == layers), key=lambda r: r["n_train"])
        lo, hi = mine[0], mine[-1]
        out[layers] = {"size": hi["n_train"] / lo["n_train"],
                       "peak_rss": round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3),
                       "peak_rss_anon": round(hi["peak_rss_anon_mb_sampled"]
                                              / max(1, lo["peak_rss_anon_mb_sampled"]), 3),
                       "wall_time": round(hi["wall_s"] / lo["wall_s"], 3)}
    return out


def table(result: dict) -> str:
    """docs/eval.md's table, from the JSON this script writes (`--table`)."""
    lines = ["| store | eval.layers | wall | peak RSS | peak anon RSS | solvers |",
             "|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        solvers = ", ".join(sorted({v["solver"] for v in r["layers"].values()}))
        lines.append(f"| {r['n_train']:,} | {r['eval_layers']} | {r['wall_s']:.0f} s | "
                     f"{r['peak_rss_mb']:,} MB | {r['peak_rss_anon_mb_sampled']:,} MB | {solvers} |")
    for layers, q in sorted(result["ratios_largest_over_smallest"].items()):
        if q["size"] == 1:  # one size: no ratio to show
            continue
        lines.append(f"| ×{q['size']:g} | {layers} | ×{q['wall_time']} | ×{q['peak_rss']} | "
                     f"×{q['peak_rss_anon']} | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50000,500000", help="train images per store")
    parser.add_argument("--val", type=int, default=5000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("runs/eval_scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "eval_scale.json")
    parser.add_argument("--baselines", action="store_true", help="random-init + pixel baselines")
    parser.add_argument("--train", nargs="*", default=["train.epochs=0.02"],
                        help="overrides of the short run whose encoder is probed")
    parser.add_argument("--eval", nargs="*", default=[], help="extra `ssl-lab eval` overrides")
    parser.add_argument("--table", action="store_true", help="print the table of --out; run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.table:
        result = json.loads(args.out.read_text())
        print(table(result))
        return result
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    stores = {n: make_store(args.work, n, args) for n in sizes}
    run = make_run(args.work, stores[sizes[0]], args.train)
    extra = [f"eval.baselines={'true' if args.baselines else 'false'}", *args.eval]
    rows = []
    for n in sizes:
        for layers in LAYER_SETS:
            row = {"n_train": n, "n_val": args.val, "n_test": args.test, "eval_layers": layers,
                   **evaluate(run, stores[n], layers, extra)}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "machine": {"cpu": cpu_model(),
                          "cores": os.cpu_count(), "python": platform.python_version()},
              "image_size": args.image_size, "eval_overrides": extra, "rows": rows,
              "ratios_largest_over_smallest": ratios(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios_largest_over_smallest"], indent=1))
    return result


if __name__ == "__main__":
    main()
