"""Throughput of ssl-lab's batched views vs kornia (and a per-image loop), same run, same ops.

    .venv/bin/python bench/bench_views.py --batch 256 --size 32 --threads 2 --repeats 20 \
        --out docs/bench_views.json

The batch is real pixels: random square crops of scikit-image's RGB sample photos, resized to
--size. Each timed call makes 2 views of every image (2 * batch views) with the "simclr" recipe:
random resized crop (scale (0.2, 1)) + flip 0.5 + colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 +
grayscale p=0.2. kornia gets the same ops on the batch repeated twice (its favourite case: one
call; its hue is an HSV shift where ssl-lab rotates YIQ chroma); the per-image loop calls
ssl-lab's generator on one image at a time (timed on 64 images, a quarter of the repeats).
Reported: median of --repeats timed calls after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_lab.data.views import ViewGenerator, get_recipe

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def photo_batch(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8: random square crops of real photos, antialiased to size."""
    import skimage.data

    gen = torch.Generator().manual_seed(seed)
    photos = [torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()
              for name in PHOTOS]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[1:]
        side = int(torch.randint(min(h, w) // 6, min(h, w) // 2, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = img[None, :, top:top + side, left:left + side]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def time_it(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kornia_fn(images: torch.Tensor, size: int, n_views: int) -> Callable[[], torch.Tensor]:
    import kornia.augmentation as K

    r = get_recipe("simclr", size=size)
    aug = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=r.crop_scale, ratio=r.crop_ratio),
        K.RandomHorizontalFlip(p=r.flip_p),
        K.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue, p=r.jitter_p),
        K.RandomGrayscale(p=r.grayscale_p),
    )

    def run() -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255)  # kornia takes float NCHW
        return aug(x.repeat(n_views, 1, 1, 1))

    return run


def per_image_fn(images: torch.Tensor, size: int, n_views: int) -> Callable[[], torch.Tensor]:
    """ssl-lab's own ops called one image at a time (what a Dataset.__getitem__ would do)."""
    views = ViewGenerator("simclr", size, n_views)
    gen = torch.Generator().manual_seed(0)

    def run() -> torch.Tensor:
        return torch.cat([views(images[i:i + 1], gen) for i in range(images.shape[0])], dim=1)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-loop", action="store_true", help="skip the per-image loop")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(f"warning: 1-minute load average {load_before:.1f}: other processes share the "
              "cores, numbers will be noisy")
    torch.manual_seed(0)
    images = photo_batch(args.batch, args.size)
    gen = torch.Generator().manual_seed(0)
    ours = ViewGenerator("simclr", args.size, args.views)
    n_out = args.views * args.batch
    # name -> (call, views per call, repeats, warm-up calls)
    fns: dict[str, tuple[Callable[[], object], int, int, int]] = {
        "ssl_lab": (lambda: ours(images, gen), n_out, args.repeats, args.warmup)}
    try:
        fns["kornia"] = (kornia_fn(images, args.size, args.views), n_out, args.repeats,
                         args.warmup)
    except ImportError:
        print("kornia not installed (pip install kornia): skipping it")
    if not args.no_loop:  # slow: timed on the first 64 images only, reported per view
        few = images[:64]
        fns["per_image_loop"] = (per_image_fn(few, args.size, args.views),
                                 args.views * few.shape[0], max(3, args.repeats // 4), 1)

    rows = {}
    for name, (fn, views, reps, warmup) in fns.items():
        sec = time_it(fn, reps, warmup)
        rows[name] = {"ms_per_call": sec * 1e3, "views_per_call": views,
                      "views_per_s": views / sec}
    base = rows["ssl_lab"]["views_per_s"]
    for row in rows.values():
        row["ssl_lab_speedup"] = base / row["views_per_s"]
    # The project's requirement for this configuration (simclr, 256 x 2 views, 32 px, 2 threads).
    target = {"views_per_s": 25_000, "speedup_vs_kornia": 3.0}
    meets = base >= target["views_per_s"] and (
        "kornia" not in rows or rows["kornia"]["ssl_lab_speedup"] >= target["speedup_vs_kornia"])

    print(f"\nsimclr views, batch {args.batch} x {args.views} views, {args.size}px, "
          f"{args.threads} threads, median of {args.repeats}\n")
    print("| pipeline | views / call | ms / call | views / s | ssl_lab speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['views_per_call']} | {row['ms_per_call']:.2f} "
              f"| {row['views_per_s']:,.0f} | {row['ssl_lab_speedup']:.2f}x |")
    print(f"\ntarget {target['views_per_s']:,} views/s and {target['speedup_vs_kornia']}x kornia: "
          f"{'met' if meets else 'NOT met'}")
    if args.out:
        result = {
            "command": "bench/bench_views.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("out", "no_loop")),
            "recipe": "simclr", "batch": args.batch, "views": args.views, "size": args.size,
            "threads": args.threads, "repeats": args.repeats, "results": rows,
            "target": target, "meets_target": meets,
            "torch": torch.__version__, "kornia": _version("kornia"),
        }
        write_result(args.out, result, load_before)


def table(result: dict) -> str:
    """docs/RESULTS.md's table from the JSON this script writes (`--out`): each pipeline's ms per
    call, views/s and ssl-lab's speed-up over it, to two decimals as measured."""
    rows = result["results"]
    labels = {"ssl_lab": "**ssl-lab** (`ssl_lab.data.views.ViewGenerator`)",
              "kornia": f"kornia {result.get('kornia')} `AugmentationSequential`, same ops and "
                        "parameters",
              "per_image_loop": "per-image torch ops in a Python loop "
                                f"({rows.get('per_image_loop', {}).get('views_per_call')} views / call)"}
    lines = [f"| pipeline | ms / call ({rows['ssl_lab']['views_per_call']} views) | views / s "
             "| ssl-lab speed-up |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        per_s, speedup = f"{row['views_per_s']:,.0f}", f"{row['ssl_lab_speedup']:.2f}×"
        if name == "ssl_lab":  # the two numbers the target is about, in bold
            per_s = f"**{per_s}**"
        elif name == "kornia":
            speedup = f"**{speedup}**"
        lines.append(f"| {labels.get(name, name)} | {row['ms_per_call']:.1f} | {per_s} | {speedup} |")
    return "\n".join(lines)


def write_result(path: Path, result: dict, load_before: float) -> None:
    """`result` + the machine it ran on, as JSON (the 1-minute load average says whether other
    work shared the cores)."""
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                         "cpu_count": os.cpu_count(), "python": platform.python_version(),
                         "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
