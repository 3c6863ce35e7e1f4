"""Small-map convolutions as one matmul (models/small_conv.py) against nn.Conv2d's own path.

    python bench/small_conv.py [--threads 2] [--repeats 3] [--steps 20] [--out F] [key=value ...]

1. Every convolution of the configured model that sees a map of at most 4x4 pixels, forward +
   backward under the training precision, dense vs nn.Conv2d (median ms of 10 calls).
2. The model-only training step (bench_train.model_only: forward + loss + backward + optimizer
   on one fixed batch of views), dense on and off, alternated --repeats times so that the
   machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from ssl_lab.config import load_config
from ssl_lab.models.small_conv import MAX_DENSE_PIXELS, SmallMapConv2d, dense_conv2d
from ssl_lab.runtime import autocast
from ssl_lab.train_setup import build

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import model_only  # noqa: E402
from bench_views import time_it  # noqa: E402  (median seconds per call)


def small_map_convs(cfg) -> tuple[dict[tuple, tuple[SmallMapConv2d, torch.Size]], object]:
    """The model's convs that get <= MAX_DENSE_PIXELS input pixels, by (shape, hyper-parameters),
    found with forward hooks on one real batch (benchmark only: the library never does this),
    and the built run (its device and precision)."""
    s = build(cfg)
    x = torch.from_numpy(s.data.train.images[: s.batch_size]).to(s.device)
    views = s.views(x, torch.Generator(s.device).manual_seed(0))
    found: dict[tuple, tuple[SmallMapConv2d, torch.Size]] = {}

    def hook(module, inputs, _output):
        shape = inputs[0].shape
        if shape[-2] * shape[-1] <= MAX_DENSE_PIXELS:
            key = (*shape, module.out_channels, module.kernel_size[0], module.stride[0])
            found.setdefault(key, (module, shape))

    handles = [m.register_forward_hook(hook) for m in s.model.modules()
               if isinstance(m, SmallMapConv2d)]
    with torch.no_grad(), autocast(s.device, s.amp_dtype):
        s.model(views, [])
    for h in handles:
        h.remove()
    return found, s


def time_conv(module: nn.Conv2d, shape: torch.Size, s, dense: bool) -> float:
    """ms per forward + backward of nn.Conv2d's path, or of dense_conv2d (forced, so that the
    layers where SmallMapConv2d keeps nn.Conv2d's path show why)."""
    x = torch.randn(shape, device=s.device).to(memory_format=torch.channels_last).requires_grad_()

    def call():
        with autocast(s.device, s.amp_dtype):
            y = (dense_conv2d(x, module.weight, module.bias, module.stride, module.padding)
                 if dense else nn.Conv2d.forward(module, x))
        y.float().sum().backward()

    return time_it(call, repeats=10, warmup=3) * 1e3


def table(result: dict) -> str:
    """docs/RESULTS.md's per-conv table from the JSON this script writes (`--out`): forward +
    backward ms of nn.Conv2d's path and of the dense matmul, and the path the model uses."""
    lines = ["| input (N, C, H, W) | out | kernel | stride | nn.Conv2d ms | dense ms | used |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for layer in result["layers"]:
        used = "dense" if layer["used"] == "dense" else "nn.Conv2d"
        lines.append(f"| {tuple(layer['input'])} | {layer['out']} | {layer['kernel']} "
                     f"| {layer['stride']} | {layer['conv_ms']:.1f} | {layer['dense_ms']:.1f} "
                     f"| {used} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    base = [*args.overrides, f"train.threads={args.threads}", "eval.enabled=false"]
    result: dict = {"command": " ".join(sys.argv), "layers": [], "steps": {"dense": [], "conv": []}}
    with tempfile.TemporaryDirectory() as tmp:
        convs, s = small_map_convs(load_config(None, [*base, f"run.dir={tmp}/shapes"]))
        print("| input (N, C, H, W) | out | k | stride | nn.Conv2d ms | dense ms | speed-up | used |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for key, (module, shape) in convs.items():
            conv_ms, dense_ms = time_conv(module, shape, s, False), time_conv(module, shape, s, True)
            used = "dense" if module.uses_dense(torch.empty(shape, device="meta")) else "conv"
            result["layers"].append({"input": list(shape), "out": key[4], "kernel": key[5],
                                     "stride": key[6], "conv_ms": conv_ms, "dense_ms": dense_ms,
                                     "used": used})
            print(f"| {tuple(shape)} | {key[4]} | {key[5]} | {key[6]} | {conv_ms:.1f} | "
                  f"{dense_ms:.1f} | {conv_ms / dense_ms:.2f}x | {used} |")
        for r in range(args.repeats):
            for kind in ("conv", "dense"):
                SmallMapConv2d.dense = kind == "dense"
                cfg = load_config(None, [*base, f"run.dir={tmp}/{kind}{r}"])
                result["steps"][kind].append(model_only(cfg, args.steps))
    SmallMapConv2d.dense = True
    conv, dense = (statistics.median(result["steps"][k]) for k in ("conv", "dense"))
    print(f"\nmodel-only step, median of {args.repeats}: nn.Conv2d {conv:.0f} views/s, "
          f"dense small maps {dense:.0f} views/s ({dense / conv:.2f}x); runs: {result['steps']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
