"""RCDM study: what does a Fashion-MNIST SimCLR encoder keep at its backbone vs its projector?

Stages (each skipped when its output exists, resumed when it was interrupted):
  1. a short SimCLR run (¼-width ResNet-18, the library default) on a subset of Fashion-MNIST;
  2. three RCDMs conditioned on: the trained backbone output, the trained projector output (z),
     and the backbone output of a random-init encoder of the same architecture;
  3. `score` for each (retrieval among N held-out test images, diversity) and sample grids.

    .venv/bin/python bench/study_rcdm.py                     # scale 1: ~20 CPU-minutes (AMD EPYC)
    .venv/bin/python bench/study_rcdm.py --scale 2 --threads 8  # 32×32 (28 padded), wider UNet

`--scale` multiplies the canvas (16·s, content 14·s), the UNet width (32·s) and the training
length; scale ≥ 2 also uses two res-blocks per level. `--seed` seeds every run and the sampling
(the held-out test images scored are a fixed subset, the same for every seed).

Runs go to <out>/scale<s>-seed<k>/ (model weights, samples: never committed). The small raw
results go to <raw>/scale<s>/seed<k>/ (default docs/results/rcdm/, see bench/rcdm_tables.py):
one JSON per conditioning as soon as it is scored, then study.json with the stage timings. A
conditioning whose raw file exists is not run again, not even its grids; delete that file
(and its run directory, to retrain) to redo it. Grids are copied to <docs>/rcdm_*.png. The
tables in docs/rcdm.md are generated from the raw files by bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import rcdm_tables  # noqa: E402  (sibling script: the raw layout and the tables)

ROOT = Path(__file__).resolve().parents[1]
# the grids' sampling (study_samples/), also recorded in study.json for the cost table
GRIDS = {"n": 8, "k": 4, "steps": 50, "interp": 8}


def timed(timings: dict, name: str, path: Path, fn: Callable[[], object]) -> None:
    """Run a stage and record its wall and CPU seconds (kept across resumed invocations)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    prev = timings.get(name, {"wall_s": 0.0, "cpu_s": 0.0})
    timings[name] = {"wall_s": prev["wall_s"] + time.perf_counter() - wall,
                     "cpu_s": prev["cpu_s"] + time.process_time() - cpu}
    path.write_text(json.dumps(timings, indent=1))


def encoder_overrides(scale: int, seed: int, threads: int) -> list[str]:
    return [f"seed={seed}", "data.name=fashion-mnist", f"data.fraction={min(1.0, 0.25 * scale)}",
            f"train.epochs={3 * scale}", f"train.threads={threads}", "train.ckpt_every_steps=100",
            # the lr, last_width and view-size defaults of the documented run (the main job's
            # have moved since)
            "optim.lr=0.002", "model.last_width=512", "views.size=28", "eval.enabled=false"]


def encoder_stage(run: Path, scale: int, seed: int, threads: int) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.train_loop import train

    resume = (run / "config.yaml").is_file()
    train(load_config(None, [f"run.dir={run}", f"resume={str(resume).lower()}",
                             *encoder_overrides(scale, seed, threads)]))


def rcdm_overrides(scale: int, seed: int, threads: int) -> list[str]:
    return [f"unet.size={16 * scale}", f"unet.content={14 * scale}",
            f"unet.channels={32 * scale}-{64 * scale}-{64 * scale}",
            f"unet.layers_per_block={1 if scale == 1 else 2}",
            f"data.fraction={min(1.0, 0.25 * scale)}", f"train.epochs={6 * scale}",
            "train.batch_size=64", "train.lr=0.001", "train.warmup_steps=100",
            "train.ema_decay=0.995", f"train.threads={threads}", "train.ckpt_every_steps=200",
            "train.log_every_steps=25", "sample.steps=25", "sample.k=4", "score.n=200",
            f"seed={seed}", f"sample.seed={seed}"]


def rcdm_stage(run: Path, encoder: Path, layer: str, random_init: bool, scale: int, seed: int,
               threads: int) -> None:
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    resume = (run / "config.yaml").is_file()
    train_rcdm(load_train_config(str(encoder), [
        f"run.dir={run}", f"resume={str(resume).lower()}", f"layer={layer}",
        f"random_init={str(random_init).lower()}", *rcdm_overrides(scale, seed, threads)]))


def score_stage(run: Path) -> None:
    from ssl_lab.gen.rcdm_config import ScoreArgs
    from ssl_lab.gen.rcdm_score import score_command

    score_command(run, ScoreArgs())


def grid_stage(run: Path) -> None:
    from ssl_lab.gen.rcdm_config import SampleArgs
    from ssl_lab.gen.rcdm_sample import sample_command

    shutil.rmtree(run / "study_samples", ignore_errors=True)  # a partial one (out= must be new)
    sample_command(run, SampleArgs(split="test", **GRIDS, out=str(run / "study_samples")))


def docs_images(run: Path, name: str, docs: Path) -> None:
    """Small PNGs for docs/ from the saved arrays (no sampling): conditioning | k samples, and
    the interpolation rows."""
    from ssl_lab.gen.rcdm import save_grid

    arrays = np.load(run / "study_samples" / "samples.npz")
    cond, samples, interp = arrays["conditioning"], arrays["samples"], arrays["interp"]
    save_grid([[cond[i], *samples[i]] for i in range(len(cond))], docs / f"rcdm_{name}.png",
              scale=3)
    save_grid([[cond[0], *row, cond[1]] for row in interp], docs / f"rcdm_{name}_interp.png",
              scale=3, gap_after=None)


def z_layer(encoder: Path) -> str:
    """The projector's output layer name (proj<depth>) of the trained encoder."""
    from ssl_lab.models.encoder import read_spec

    return f"proj{len(read_spec(encoder)['model']['projector'].split('-'))}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def read_config(run: Path) -> dict:
    """A run's resolved config.yaml as a dict: the settings the raw file does not override."""
    return yaml.safe_load((run / "config.yaml").read_text())


def environment() -> dict:
    """What the timings depend on (the cost table's machine line)."""
    import diffusers

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if "model name" in line),
               platform.processor())
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count()}


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def write_new(path: Path, record: dict) -> None:
    """A raw file, written whole (a tmp file renamed): an interrupted write leaves none, so the
    next invocation redoes that part instead of skipping a truncated file."""
    tmp = path.with_suffix(".tmp")
    # default=str: a config value YAML 1.1 reads as a date stays readable text
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def suffix(scale: int, seed: int) -> str:
    """Image name suffix: the documented setting (scale 1, seed 0) keeps the plain names."""
    return (f"_s{scale}" if scale != 1 else "") + (f"_seed{seed}" if seed != 0 else "")


def run_condition(name: str, encoder: Path, out: Path, stamp: tuple[int, int, int],
                  timings: dict, tpath: Path, docs: Path) -> dict:
    """Train, score and grid one conditioning (each stage skipped when done); its raw record."""
    scale, seed, threads = stamp
    layer = z_layer(encoder) if name == "projector" else "backbone"
    random_init = name == "random_init"
    run = out / f"rcdm-{name}"
    if not (run / "summary.json").is_file():
        timed(timings, f"train_{name}", tpath,
              lambda: rcdm_stage(run, encoder, layer, random_init, scale, seed, threads))
    if not (run / "score.json").is_file():
        timed(timings, f"score_{name}", tpath, lambda: score_stage(run))
    if not (run / "study_samples" / "samples.npz").is_file():
        timed(timings, f"grids_{name}", tpath, lambda: grid_stage(run))
    docs_images(run, name + suffix(scale, seed), docs)
    return {"condition": name, "layer": layer, "random_init": random_init, "scale": scale,
            "seed": seed, "overrides": rcdm_overrides(scale, seed, threads),
            "config": read_config(run), "score": read_json(run / "score.json"),
            "train": read_json(run / "summary.json")}


def run_study(scale: int, seed: int, threads: int, out: Path, raw: Path, docs: Path) -> Path:
    """Every stage not yet recorded under raw; returns the folder of the raw files."""
    keep = rcdm_tables.raw_dir(raw, scale, seed)
    todo = [c for c in rcdm_tables.CONDITIONS if not (keep / f"{c}.json").is_file()]
    enc_file = keep / rcdm_tables.ENCODER_FILE
    if not todo and enc_file.is_file() and (keep / rcdm_tables.STUDY_FILE).is_file():
        return keep  # all recorded: nothing to load, train or write
    out = out / f"scale{scale}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    keep.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    tpath = out / "timings.json"
    timings = read_json(tpath) if tpath.is_file() else {}
    encoder = out / "encoder"
    # (only recording the timings left to do needs no encoder)
    if (todo or not enc_file.is_file()) and not (encoder / "summary.json").is_file():
        timed(timings, "encoder", tpath, lambda: encoder_stage(encoder, scale, seed, threads))
    if not enc_file.is_file():
        write_new(enc_file, {"scale": scale, "seed": seed,
                             "overrides": encoder_overrides(scale, seed, threads),
                             "config": read_config(encoder),
                             "summary": read_json(encoder / "summary.json")})
    for name in todo:
        record = run_condition(name, encoder, out, (scale, seed, threads), timings, tpath, docs)
        write_new(keep / f"{name}.json", record)
    # rewritten whenever something above ran: its timings then include that stage
    write_new(keep / rcdm_tables.STUDY_FILE, {
        "scale": scale, "seed": seed, "threads": threads, "env": environment(),
        "grids": GRIDS, "timings": timings,
        "total_cpu_s": sum(t["cpu_s"] for t in timings.values()),
        "total_wall_s": sum(t["wall_s"] for t in timings.values())})
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "study_rcdm")
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "rcdm",
                        help="where the small raw result files (JSON) go")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run_study(args.scale, args.seed, args.threads, args.out, args.raw, args.docs)
    print(rcdm_tables.study_table(args.raw, args.scale, args.seed))
    print(rcdm_tables.cost_table(args.raw, args.scale, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
