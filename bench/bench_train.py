"""Training throughput: the full loop (data, views, probes, logging) vs the model step alone.

    python bench/bench_train.py [--steps 60] [--rounds 2] [key=value ...]

Both are measured in the same process, same model, precision and batch: the "model-only" number
replays one pre-made batch of views through forward + loss + backward + optimizer step, the
ceiling any pipeline could reach. Prints a markdown row and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssl_lab.config import load_config
from ssl_lab.methods import get_method
from ssl_lab.runtime import autocast
from ssl_lab.seeding import step_generator
from ssl_lab.train_loop import train
from ssl_lab.train_setup import build, load_training_data


def model_only(cfg, steps: int, warmup: int = 5) -> float:
    """views/s of forward + loss + backward + step on one fixed batch of views (no probes, no
    data, no view generation: the ceiling)."""
    s = build(cfg)
    method = get_method(cfg.method.name)
    x = torch.from_numpy(s.data.train.images[: s.batch_size]).to(s.device)
    y = torch.from_numpy(s.data.train.labels[: s.batch_size]).to(s.device)
    gen = step_generator(s.device, cfg.seed, 0)
    views = s.views(x, gen)

    def one_step():
        with autocast(s.device, s.amp_dtype):
            loss = method.loss(s.model(views, []), y, cfg.method, gen)
        loss.backward()
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return steps * views.shape[0] * views.shape[1] / (time.perf_counter() - start)


def full_loop(cfg, steps: int) -> float:
    """views/s the training loop reports over its whole run (data, views, probes, logging)."""
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows  # skip the warm-up window when there is more than one
    return sum(r["views_per_s"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2,
                        help="loop runs, each bracketed by model-only runs before and after")
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # The machine's speed drifts by more than the loop's overhead between two measurements, so
    # each loop run is compared with the mean of the model-only runs just before and after it.
    with tempfile.TemporaryDirectory() as tmp:
        base = [*args.overrides, "eval.enabled=false", "train.log_every_steps=10",
                "train.ckpt_every_steps=100000"]

        def ceiling(i: int) -> float:
            return model_only(load_config(None, [*base, f"run.dir={tmp}/a{i}"]), args.steps)

        ceilings, loops = [ceiling(0)], []
        for r in range(args.rounds):
            cfg = load_config(None, [*base, f"run.dir={tmp}/b{r}", "train.epochs=1"])
            cfg.train.budget_s = None
            loops.append(full_loop_steps(cfg, args.steps))
            ceilings.append(ceiling(r + 1))
    ratios = [loop / ((before + after) / 2)
              for loop, before, after in zip(loops, ceilings, ceilings[1:], strict=False)]
    result = {"model_only_views_per_s": statistics.median(ceilings),
              "loop_views_per_s": statistics.median(loops), "ratio": statistics.median(ratios),
              "model_only_runs": ceilings, "loop_runs": loops, "bracketed_ratios": ratios,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "overrides": args.overrides}
    print("| model-only views/s (runs) | full loop views/s (runs) | ratio to the bracketing "
          "model-only mean (runs) |\n|---|---|---|")
    print(f"| {result['model_only_views_per_s']:.0f} ({', '.join(f'{c:.0f}' for c in ceilings)}) | "
          f"{result['loop_views_per_s']:.0f} ({', '.join(f'{x:.0f}' for x in loops)}) | "
          f"{result['ratio']:.1%} ({', '.join(f'{x:.1%}' for x in ratios)}) |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def table(result: dict) -> str:
    """docs/RESULTS.md's table from the JSON this script writes (`--out`): every model-only and
    full-loop run, and each loop's ratio to the mean of the model-only runs bracketing it."""
    ceilings, loops = result["model_only_runs"], result["loop_runs"]
    ratios = ", ".join(f"{100 * r:.1f} %" for r in result["bracketed_ratios"])
    return "\n".join([
        f"| model-only views/s ({len(ceilings)} runs) | full loop views/s ({len(loops)} runs) "
        "| loop / mean of its two brackets |",
        "|---|---|---|",
        f"| {', '.join(f'{c:,.0f}' for c in ceilings)} | {', '.join(f'{x:,.0f}' for x in loops)} "
        f"| {ratios} (median **{100 * result['ratio']:.1f} %**) |"])


def full_loop_steps(cfg, steps: int) -> float:
    """Run the real loop for one epoch of a training subset sized to `steps` steps."""
    n_train = len(load_training_data(cfg).train.images)
    cfg.data.fraction = min(1.0, steps * cfg.optim.batch_size / n_train)
    return full_loop(cfg, steps)


if __name__ == "__main__":
    main()
