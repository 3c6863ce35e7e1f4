"""GPU readiness check: one command, under 5 minutes on one GPU, one JSON (docs/gpu.md).

    PYTHONPATH=src python3 bench/gpu_check.py [--out runs/gpu_check.json] [--dry-run]
        [--parts views,prefetch,ddp,amp,throughput] [--budget 285]

Parts (each in its own process with a time cap, so a hang, a crash or a poisoned CUDA context
costs that part only; its error or the partial results it saved land in the JSON):
- views: views made on the device equal CPU views. The per-sample random parameters are drawn
  from a generator on the images' device and CUDA's random stream differs from the CPU's, so
  they are drawn once on the CPU, and the device *replays* them (ViewGenerator.replay).
- prefetch: a packed store read by BatchLoader: pinned host memory + non_blocking copies.
- ddp: a 1-process DistributedDataParallel step (nccl on CUDA, gloo on CPU).
- amp: 200 steps of `ssl_lab.train_loop.train` in bf16 and in fp16 (GradScaler), all finite.
- throughput: ResNet-18/50 views/s, model only and full loop, eager and torch.compile.
`--dry-run`: CPU, tiny sizes, torch.compile with dynamo's eager backend (no code generation);
tests/test_gpu_check.py runs it.

This file: the runner and the training parts (amp, throughput); gpu_check_parts.py: the device
checks (views, prefetch, ddp) and what every part uses (Ctx, synthetic data, the SSL model).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config import MethodConfig, OptimConfig, load_config
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.views import ViewGenerator
from ssl_lab.errors import UserError
from ssl_lab.methods import get_method
from ssl_lab.optim import build_optimizer, scaled_lr
from ssl_lab.runtime import autocast, git_revision, pick_device, resolve_precision, utc_stamp

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check_parts import (  # noqa: E402  (a sibling script, not a package)
    Ctx,
    part_ddp,
    part_prefetch,
    part_views,
    ssl_model,
    synthetic_images,
    verdict,
    write_npz,
)

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("views", "prefetch", "ddp", "amp", "throughput")
# share of the budget each part is guaranteed; time a part leaves unused goes to the next ones
SHARE = {"views": 0.10, "prefetch": 0.08, "ddp": 0.10, "amp": 0.25, "throughput": 0.47}
AMP_STEPS = 200


# ----------------------------------------------------------------------------- (b) AMP


def amp_run(ctx: Ctx, npz: Path, precision: str, steps: int, batch: int, budget: float) -> dict:
    """`steps` steps of the real training loop; finite losses, weights and (fp16) scaler."""
    model = ["model.width=0.125", "model.projector=32-16", "model.last_width=null",
             "model.stem=cifar", "views.n=2"] if ctx.dry else []
    cfg = load_config(None, [
        f"run.dir={ctx.tmp / precision}", f"data.name=npz:{npz}", "data.val_fraction=0",
        f"optim.batch_size={batch}", "train.epochs=1", f"train.precision={precision}",
        f"train.budget_s={budget:.0f}", f"train.log_every_steps={max(1, steps // 20)}",
        f"train.ckpt_every_steps={10 * steps}", "eval.enabled=false", *model])
    try:
        run = ssl_train(cfg)
    except UserError as exc:
        if precision == "fp16" and ctx.device.type != "cuda":
            return {"status": "skipped", "reason": f"fp16 refused on {ctx.device}: {exc}"}
        raise
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses, scales = [r["loss"] for r in rows], [r["grad_scale"] for r in rows if "grad_scale" in r]
    summary = json.loads((run / "summary.json").read_text())
    env = json.loads((run / "env.json").read_text())
    found = ckpt_io.find_checkpoint(run)
    weights = load_file(str(found / ckpt_io.WEIGHTS))
    finite_w = all(torch.isfinite(t).all().item() for t in weights.values()
                   if t.is_floating_point())
    scaler = _scalars(ckpt_io.load_state(found).get("scaler"))
    out = {"steps": summary["steps"], "target_steps": steps, "losses_logged": len(losses),
           "losses_finite": bool(np.isfinite(losses).all()), "first_loss": losses[0],
           "last_loss": losses[-1], "weights_finite": finite_w, "train_s": summary["train_s"],
           "stopped_by_budget": summary["stopped_by_budget"], "checkpoint_scaler": scaler,
           "grad_scale_logged": {"min": min(scales), "last": scales[-1]} if scales else None,
           "env": {k: v for k, v in env.items() if "precision" in k or "scaler" in k}}
    ok = out["steps"] == steps and out["losses_finite"] and finite_w
    if precision == "fp16" and not (isinstance(scaler, dict) and "scale" in scaler):
        out["reason"] = "no GradScaler state (state['scaler']['scale']) in the checkpoint"
        ok = False
    return {"status": verdict(ok), **out}


def ssl_train(cfg) -> Path:
    """`ssl_lab.train_loop.train(cfg)`: the run directory."""
    from ssl_lab.train_loop import train  # the library's loop, imported only in this part's process

    return train(cfg)


def _scalars(value: object) -> dict | None:
    """The JSON-able entries of a state dict (GradScaler's scale, growth tracker...)."""
    if not isinstance(value, dict):
        return None
    return {k: v for k, v in value.items() if isinstance(v, (int, float, bool, str))}


def part_amp(ctx: Ctx) -> dict:
    """(b) The training loop in bf16 and in fp16 (GradScaler): AMP_STEPS steps each."""
    steps, batch, size = (4, 8, 16) if ctx.dry else (AMP_STEPS, 128, 32)
    npz = write_npz(ctx.tmp / "amp.npz", steps * batch, size)  # val_fraction=0: 1 epoch = steps
    runs: dict[str, dict] = {}
    for i, precision in enumerate(("bf16", "fp16")):
        budget = max(5.0, (ctx.left() - 10) / (2 - i) - 5)  # seconds of training, not of setup
        try:
            runs[precision] = amp_run(ctx, npz, precision, steps, batch, budget)
        except Exception as exc:
            runs[precision] = {"status": "error", "error": repr(exc),
                               "traceback": traceback.format_exc()[-2000:]}
        ctx.save({"status": "running", "runs": runs})
    ok = all(r["status"] in ("ok", "skipped") for r in runs.values())
    return {"status": verdict(ok), "runs": runs, "data": f"synthetic npz, {size} px",
            "summary": ", ".join(f"{p} {r['status']} ({r.get('steps', 0)} steps)"
                                 for p, r in runs.items())}


# ----------------------------------------------------------------------------- (c) throughput


def throughput_rows(dry: bool) -> list[tuple[str, int, bool]]:
    """(backbone, size, compile), eager rows first; compiled ones in order of interest."""
    if dry:
        return [("resnet18", 16, False), ("resnet50", 16, False), ("resnet18", 16, True)]
    eager = [(b, s, False) for b in ("resnet18", "resnet50") for s in (32, 96, 224)]
    return eager + [(b, s, True) for b, s in (("resnet18", 32), ("resnet50", 224), (
        "resnet18", 224), ("resnet50", 32), ("resnet18", 96), ("resnet50", 96))]


BATCH = {16: 8, 32: 256, 96: 128, 224: 64}  # images per step (x 2 views)
SOURCE = {16: 20, 32: 32, 96: 96, 224: 256}  # synthetic image side the views are cut from


def _rate(ctx: Ctx, step: Callable[[], None], views_per_step: int) -> dict:
    """views/s over >= 0.6 s (GPU) of steps after 3 warm-up steps; the first step (compile,
    cuDNN autotuning) is timed on its own. The dry run only checks that it runs: 3 steps."""
    target, lo, hi, warm = (0.0, 1, 1, 0) if ctx.dry else (0.6, 5, 50, 2)
    t = time.perf_counter()
    step()
    ctx.sync()
    first = time.perf_counter() - t
    for _ in range(warm):
        step()
    ctx.sync()
    t = time.perf_counter()
    step()
    ctx.sync()
    n = int(min(hi, max(lo, target / (time.perf_counter() - t))))
    t = time.perf_counter()
    for _ in range(n):
        step()
    ctx.sync()
    return {"views_per_s": n * views_per_step / (time.perf_counter() - t), "timed_steps": n,
            "first_step_s": first}


def throughput_row(ctx: Ctx, backbone: str, size: int, compiled: bool) -> dict:
    """views/s of one (backbone, size, compile) row: model only, and the full loop."""
    dev, batch = ctx.device, BATCH[size]
    model = ssl_model(backbone, size, 0.125 if ctx.dry else 1.0, dev)
    if compiled:  # the dry run traces with dynamo only: inductor's C++/Triton build is minutes
        from torch import _dynamo  # seconds to import: only where compiling

        _dynamo.reset()  # a fresh cache: the same classes at another size would go dynamic
        model.compile(backend="eager" if ctx.dry else "inductor")
    optim_cfg = OptimConfig(batch_size=batch)
    optimizer = build_optimizer(model.trainable_modules(), optim_cfg, scaled_lr(optim_cfg))
    amp = resolve_precision("auto", dev)
    loss_fn, mcfg = get_method("simclr").loss, MethodConfig()
    images = synthetic_images(4 * batch, SOURCE[size], seed=5)
    loader = BatchLoader(images, np.zeros(len(images), np.int64), batch, 0, device=dev)
    batches = loader.batches(0, 10**9)
    views_gen = ViewGenerator("simclr", size, 2)
    counter = iter(range(10**9))

    def train_step(views: torch.Tensor) -> None:
        with autocast(dev, amp):
            loss = loss_fn(model(views, []), None, mcfg, None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_step() -> None:  # batch -> views on the device -> step, as the training loop
        x, _ = next(batches)
        train_step(views_gen(x, torch.Generator(dev).manual_seed(next(counter))))

    fixed = views_gen(next(batches)[0], torch.Generator(dev).manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    row = {"model_only": _rate(ctx, lambda: train_step(fixed), fixed.shape[0] * batch),
           "full_loop": _rate(ctx, full_step, fixed.shape[0] * batch)}
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    backend = ("eager" if ctx.dry else "inductor") if compiled else None
    return {"status": "ok", "compile_backend": backend, "images_per_step": batch,
            "views_per_step": 2 * batch, "precision": str(amp).replace("torch.", "") if amp else "fp32",
            "stem": model.encoder.backbone.config.get("stem"), "peak_memory_gib": mem, **row}


def part_throughput(ctx: Ctx) -> dict:
    """(c) Every `throughput_rows` row the part's time cap leaves room for."""
    rows = {f"{b}-{s}px-{'compiled' if c else 'eager'}": {"status": "pending"}
            for b, s, c in throughput_rows(ctx.dry)}
    compile_s = [30.0]  # seconds to keep free before starting a compile: the slowest seen
    for (backbone, size, compiled), key in zip(throughput_rows(ctx.dry), list(rows), strict=True):
        if ctx.left() < (max(compile_s) if compiled else 5.0):
            rows[key] = {"status": "skipped", "reason": "not enough time left in the part's cap"}
            continue
        try:
            rows[key] = throughput_row(ctx, backbone, size, compiled)
            if compiled:
                compile_s.append(rows[key]["model_only"]["first_step_s"] * 1.5)
        except Exception as exc:  # e.g. out of memory: the other rows still run
            rows[key] = {"status": "error", "error": repr(exc)[:500]}
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        ctx.save({"status": "running", "rows": rows})
    ok = all(r["status"] in ("ok", "skipped") for r in rows.values())
    done = sum(r["status"] == "ok" for r in rows.values())
    return {"status": verdict(ok), "rows": rows, "method": "simclr, 2 views, channels_last",
            "summary": f"{done} of {len(rows)} rows measured"}


PARTS: dict[str, Callable[[Ctx], dict]] = {
    "views": part_views, "prefetch": part_prefetch, "ddp": part_ddp, "amp": part_amp,
    "throughput": part_throughput}


# ----------------------------------------------------------------------------- runner


def child(name: str, result: Path, deadline: float, dry: bool) -> int:
    """Run one part in this process and write its result JSON."""
    device = torch.device("cpu") if dry else pick_device()
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
        ctx = Ctx(dry, device, deadline - 3.0, Path(tmp), result)
        try:
            out = PARTS[name](ctx)
        except Exception as exc:
            out = {"status": "error", "error": repr(exc)[:1000],
                   "traceback": traceback.format_exc()[-3000:]}
        out["device"] = str(device)
        ctx.save(out)
    return 0


def run_part(name: str, seconds: float, dry: bool) -> dict:
    """One part in a child process (its own session, killed whole at the cap)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result",
               str(result), "--deadline", f"{time.time() + seconds:.1f}",
               *(["--dry-run"] if dry else [])]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            log, timed_out = proc.communicate(timeout=seconds)[0], False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and any compile workers it started
            log, timed_out = proc.communicate()[0], True
        out = json.loads(result.read_text()) if result.is_file() else {}
    return settle(out, timed_out, proc.returncode, seconds, log or "", start)


def settle(out: dict, timed_out: bool, returncode: int | None, seconds: float, log: str,
           start: float) -> dict:
    """The part's final record from what its process saved and how it ended."""
    finished = out.get("status") not in (None, "running")  # its final result was saved
    if timed_out and not finished:
        out |= {"status": "timeout", "error": f"killed at its cap of {seconds:.0f} s"}
    elif timed_out:
        out["note"] = f"finished, then killed at its cap of {seconds:.0f} s while exiting"
    elif not finished:
        out |= {"status": "error", "error": f"the part's process exited with {returncode}"}
    for sub in [*out.get("rows", {}).values(), *out.get("runs", {}).values()]:
        if sub.get("status") == "pending":  # never started (or killed while running)
            sub.update(status="skipped", reason="the part reached its time cap first")
    if out["status"] not in ("ok", "skipped"):
        out["log_tail"] = log[-3000:]
    out["seconds"] = time.perf_counter() - start
    return out


def run_all(parts: list[str], budget: float, dry: bool,
            save: Callable[[dict], None] = lambda results: None) -> dict:
    """Every part in turn, each capped so the ones after it keep their share of the budget;
    `save(results so far)` after each part."""
    start = time.monotonic()
    results: dict[str, dict] = {}
    for i, name in enumerate(parts):
        reserved = sum(SHARE[p] for p in parts[i + 1:]) * budget
        seconds = budget - (time.monotonic() - start) - reserved
        if seconds < 5:
            results[name] = {"status": "skipped", "reason": "the total budget was spent"}
            continue
        results[name] = run_part(name, seconds, dry)
        print(f"{name:<11} {results[name]['status']:<8} {results[name]['seconds']:5.0f}s",
              flush=True)
        save(results)
    return results


def print_table(report: dict) -> None:
    """The closing tables: one line per part, then views/s per throughput row."""
    print(f"\n{'part':<11} {'status':<8} {'time':>6}  result")
    for name, r in report["parts"].items():
        print(f"{name:<11} {r['status']:<8} {r.get('seconds', 0):5.0f}s  "
              f"{r.get('summary') or r.get('reason') or r.get('error', '')}")
    rows = report["parts"].get("throughput", {}).get("rows", {})
    if rows:
        print(f"\n{'views/s':<28} {'model only':>11} {'full loop':>10} {'1st step':>9}")
    for key, r in rows.items():
        if r["status"] == "ok":
            print(f"{key:<28} {r['model_only']['views_per_s']:11.0f} "
                  f"{r['full_loop']['views_per_s']:10.0f} {r['model_only']['first_step_s']:8.1f}s")
        else:
            print(f"{key:<28} {r['status']}: {r.get('reason') or r.get('error', '')}")


def main(argv: list[str] | None = None) -> int:
    """Run the parts (or, with --part, one part in this child process); 0 when all pass."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_check.json", help="the JSON report")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, compile traced only")
    ap.add_argument("--parts", default=",".join(ORDER), help="comma-separated subset of parts")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all parts (default 285; dry run 240: a cap for hangs)")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # the child process of one part
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return child(args.part, Path(args.result), args.deadline, args.dry_run)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(ORDER)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device here: run with --dry-run, or on a machine with a GPU")
    budget = args.budget or (240.0 if args.dry_run else 285.0)
    start, out = time.perf_counter(), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"tool": "bench/gpu_check.py", "dry_run": args.dry_run, "utc": utc_stamp(),
              "budget_s": budget, "env": {
                  "torch": torch.__version__, "cuda": torch.version.cuda, "python":
                  sys.version.split()[0], "git_revision": git_revision(),
                  "device_name": "cpu" if args.dry_run else torch.cuda.get_device_name(0)}}

    def save(results: dict) -> None:  # after every part: a killed run keeps what it measured
        report.update(parts=results, total_s=time.perf_counter() - start, ok=all(
            r["status"] in ("ok", "skipped") for r in results.values()) and len(results) == len(parts))
        out.write_text(json.dumps(report, indent=1))

    save(run_all(parts, budget, args.dry_run, save))
    print_table(report)
    print(f"\n{'all parts ok' if report['ok'] else 'SOME PARTS FAILED'}: {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
