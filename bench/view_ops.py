"""Where view time goes at one size: the simclr recipe with ops switched off one by one (fast
views also with their GEMMs in float32, i.e. where bf16 matmuls are not native), and the exact
views' CPU blur: its masked-samples path against blurring the whole batch (identity kernels
where not drawn) and against the same path in bf16.

    python bench/view_ops.py [--size 96] [--batch 128] [--threads 1] [--repeats 5] [--glibc-default]

Random uint8 images of side --size, --batch images x 2 views per call, median of --repeats calls.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ssl_lab.data import augment as A
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from bench_views import time_it  # noqa: E402  (median seconds per call)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--glibc-default", action="store_true",
                        help="skip runtime.keep_freed_memory() (which `ssl-lab train` calls)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.glibc_default and keep_freed_memory()
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    full = get_recipe("simclr", size=args.size)
    variants = {"full recipe": full, "no blur": replace(full, blur_p=0.0),
                "no jitter/grayscale": replace(full, jitter_p=0.0, grayscale_p=0.0),
                "crop + flip only": replace(full, blur_p=0.0, jitter_p=0.0, grayscale_p=0.0)}
    if full.fast:  # fast views with float32 GEMMs, and exact views
        variants |= {"fast, fp32 GEMMs": full, "exact (fast=False)": replace(full, fast=False)}
    print(f"{args.size} px, {args.batch} images x 2 views per call, {args.threads} thread(s), "
          f"fast views: {full.fast}, keep_freed_memory: {kept}")
    native = A.native_bf16_matmul
    for name, recipe in variants.items():
        # "fast, fp32 GEMMs": fast views as where bf16 matmuls are not native
        A.native_bf16_matmul = (lambda device: False) if name == "fast, fp32 GEMMs" else native
        views = ViewGenerator(recipe, args.size, 2)
        gen = torch.Generator().manual_seed(0)
        s = time_it(lambda views=views, gen=gen: views(images, gen), args.repeats, warmup=1)
        print(f"{name:<22} {2 * args.batch / s:8,.0f} views/s")
    A.native_bf16_matmul = native

    m = 2 * args.batch
    x = torch.rand(m, 3, args.size, args.size)
    work = torch.empty_like(x)
    sigma = 0.1 + 1.9 * torch.rand(m)
    mask = torch.rand(m) < 0.5  # the recipe's blur p
    k = A.blur_kernel_size(args.size, full.blur_kernel_frac)
    whole = time_it(lambda: A._blur(x.clone(), A.gauss_kernels(sigma, mask, k), work),
                    args.repeats, warmup=1)
    masked = time_it(lambda: A.gaussian_blur(x.clone(), sigma, mask, k, work), args.repeats,
                     warmup=1)
    low = time_it(lambda: A.gaussian_blur(x.clone(), sigma, mask, k, work, bf16=True),
                  args.repeats, warmup=1)
    print(f"blur of {m} views: whole batch {1e3 * whole:.0f} ms, gaussian_blur (this size's path) "
          f"{1e3 * masked:.0f} ms, {whole / masked:.2f}x; the same in bf16 (fast views where "
          f"native: {A.native_bf16_matmul(x.device)}) {1e3 * low:.0f} ms, {masked / low:.2f}x "
          "(exact views' blur; fast views fold theirs into the crop's GEMMs)")


if __name__ == "__main__":
    main()
