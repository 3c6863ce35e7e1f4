"""Packing speed and loader throughput: ssl-lab's packed store + loader + batched views vs a
per-image PIL + torch DataLoader pipeline, same images, same run, same batches.

    quiet .venv/bin/python bench/bench_loader.py --n 20000 --size 96 --out-sizes 32,64,96 \
        --batch 256 --batches 40 --threads 2 --workers 2 --out docs/bench/loader.json \
        --plot docs/img/loader.png
    .venv/bin/python bench/bench_loader.py --replot docs/bench/loader.json --plot docs/img/loader.png

Data: a synthetic ImageFolder of --n JPEGs (quality 90) of --size px in 10 class folders, made
once in --work (random crops of scikit-image's photos, so the JPEGs compress like photos).

1. Packing: `ssl-lab data pack imagefolder:... resolution=--size` into a raw store and a JPEG
   store (right-sized JPEGs are kept as they are), images/s including the folder scan.
2. Loader throughput, 2 SimCLR views per image at each of --out-sizes px, views/s over --batches
   batches of --batch after 2 warm-up batches, all on CPU:
   - ssl_lab_raw / ssl_lab_jpeg: `BatchLoader` over the store's train split (memory-mapped
     reads or PIL decodes in its prefetch thread) + `ViewGenerator("simclr")` in the main process
     with --threads torch threads; also the loader alone (no views). Above 64 px the views are
     `fast` by default (crop, blur and colour in two GEMMs per view, bf16 where native, one
     clamp); at 64 px and above the other kind is timed too on the raw store
     (ssl_lab_raw_exact / ssl_lab_raw_fast). The whole process runs with
     `runtime.keep_freed_memory()`, as `ssl-lab train`, set before the DataLoader forks;
   - per_image_pil: a torch Dataset that does, per image, what torchvision's SimCLR transforms
     do on PIL images -- decode, random resized crop, flip, colour jitter (brightness, contrast,
     saturation, hue in random order, p=0.8), grayscale p=0.2, and above 64 px Gaussian blur
     p=0.5 as ssl-lab's recipe, to tensor -- twice, in a DataLoader with --workers worker
     processes (shuffle, drop_last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.pack import PackOptions, pack
from ssl_lab.data.store import open_store
from ssl_lab.data.views import Recipe, ViewGenerator, get_recipe
from ssl_lab.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from bench_views import photo_batch, write_result  # noqa: E402  (a sibling script, not a package)

CLASSES = 10


def make_folder(root: Path, n: int, size: int, chunk: int = 2000) -> list[Path]:
    """n JPEGs in root/class_k/, made once (a marker file records what is there)."""
    from PIL import Image

    marker = root / "made.json"
    want = {"n": n, "size": size}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return sorted(root.glob("*/*.jpg"))
    shutil.rmtree(root, ignore_errors=True)
    for k in range(CLASSES):
        (root / f"class_{k}").mkdir(parents=True)
    for start in range(0, n, chunk):  # chunks: 20k photos at once would hold GBs of floats
        batch = photo_batch(min(chunk, n - start), size, seed=start).numpy()
        for j, img in enumerate(batch):
            i = start + j
            Image.fromarray(img).save(root / f"class_{i % CLASSES}" / f"{i:06d}.jpg", quality=90)
    marker.write_text(json.dumps(want))
    return sorted(root.glob("*/*.jpg"))


# ----------------------------------------------------------------------------- the baseline


class PerImageSimCLR(torch.utils.data.Dataset):
    """Per-image SimCLR views with PIL and numpy, as torchvision's transforms do on PIL images."""

    def __init__(self, files: list[Path], size: int, recipe: Recipe, n_views: int = 2):
        self.files, self.size, self.r, self.n_views = files, size, recipe, n_views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
        views = [self._view(im, k) for k in range(self.n_views)]
        return torch.stack(views), i % CLASSES

    def _view(self, im, k: int) -> torch.Tensor:
        """View k: the recipe's ops in ssl-lab's order, each with its probability for view k."""
        from PIL import Image, ImageFilter, ImageOps

        r = self.r
        top, left, h, w = self._crop_box(*im.size[::-1])
        view = im.resize((self.size, self.size), Image.Resampling.BILINEAR,
                         box=(left, top, left + w, top + h))
        if random.random() < r.prob("flip_p", k):
            view = ImageOps.mirror(view)
        if random.random() < r.prob("jitter_p", k):
            view = self._jitter(view)
        if random.random() < r.prob("grayscale_p", k):
            view = view.convert("L").convert("RGB")
        if random.random() < r.prob("blur_p", k):  # ImageNet-size SimCLR (> 64 px) blurs
            view = view.filter(ImageFilter.GaussianBlur(random.uniform(*r.blur_sigma)))
        return torch.from_numpy(np.array(view)).permute(2, 0, 1).float().div(255)

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Random area fraction and log-uniform aspect ratio, 10 tries, then the whole image."""
        lo, hi = self.r.crop_scale
        for _ in range(10):
            area = height * width * random.uniform(lo, hi)
            ratio = math.exp(random.uniform(*map(math.log, self.r.crop_ratio)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        return 0, 0, height, width

    def _jitter(self, view):
        """torchvision's ColorJitter on PIL: each factor drawn, the four ops in random order."""
        from PIL import Image, ImageEnhance

        r = self.r
        enhancers = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                     "saturation": ImageEnhance.Color}
        ops = [(name, random.uniform(1 - getattr(r, name), 1 + getattr(r, name)))
               for name in enhancers] + [("hue", random.uniform(-r.hue, r.hue))]
        random.shuffle(ops)
        for name, factor in ops:
            view = _shift_hue(view, factor, Image) if name == "hue" \
                else enhancers[name](view).enhance(factor)
        return view


def _shift_hue(view, factor: float, image_module):
    """Rotate the HSV hue channel by factor * 255 (uint8 wrap-around), as torchvision on PIL."""
    h, s, v = view.convert("HSV").split()
    shifted = (np.asarray(h, np.uint8) + np.uint8(round(factor * 255) % 256)).astype(np.uint8)
    return image_module.merge("HSV", (image_module.fromarray(shifted, "L"), s, v)).convert("RGB")


def per_image_batches(files: list[Path], args: argparse.Namespace, size: int
                      ) -> Iterator[torch.Tensor]:
    loader = torch.utils.data.DataLoader(
        PerImageSimCLR(files, size, get_recipe("simclr", size=size)), batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers, drop_last=True, generator=torch.Generator().manual_seed(0))
    for views, _ in loader:
        yield views


# ----------------------------------------------------------------------------- ours


def store_batches(store: Path, args: argparse.Namespace, size: int | None,
                  fast: bool | None = None) -> Iterator[torch.Tensor]:
    """Packed store -> BatchLoader (prefetch thread) -> batched views of `size` px in this
    process (size None: the loader's uint8 batches alone); fast: Recipe.fast (None: by size)."""
    split = open_store(store)
    images, labels = split.images("train"), split.labels("train")
    loader = BatchLoader(images, labels, args.batch, seed=0, prefetch=2)
    views = ViewGenerator("simclr", size, 2, fast=fast) if size else None
    for step, (x, _) in enumerate(loader.batches(0, loader.steps_per_epoch)):
        yield views(x, torch.Generator().manual_seed(step)) if views else x


def time_batches(batches: Iterator[torch.Tensor], count: int, warmup: int = 2) -> dict:
    """Seconds for `count` batches after `warmup` (worker start-up, first decodes) untimed ones."""
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    n_views = 0
    for _ in range(count):
        out = next(batches)
        n_views += out.shape[0] * out.shape[1] if out.dtype != torch.uint8 else out.shape[0]
    sec = time.perf_counter() - start
    batches.close()
    return {"seconds": sec, "batches": count, "items": n_views, "per_s": n_views / sec}


LABELS = {"per_image_pil": "per-image PIL + DataLoader", "ssl_lab_jpeg": "ssl-lab JPEG store",
          "ssl_lab_raw": "ssl-lab raw store (default views)",
          "ssl_lab_raw_exact": "ssl-lab raw store, exact views",
          "ssl_lab_raw_fast": "ssl-lab raw store, fast views"}


def plot_speedups(result: dict, path: Path) -> Path:
    """Views/s of every pipeline at every view size (log scale), per-image PIL's x5 marked."""
    from ssl_lab.plots import plt, save_figure  # headless backend

    by_size = result["views_per_s_by_view_size"]
    names = sorted({name for rows in by_size.values() for name in rows})
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j, rows in enumerate(by_size.values()) if name in rows]
        ax.bar(xs, [rows[name]["per_s"] for rows in by_size.values() if name in rows], width,
               label=LABELS.get(name, name))
    for j, rows in enumerate(by_size.values()):
        ax.hlines(5 * rows["per_image_pil"]["per_s"], j - width / 2, j + 0.8 - width / 2,
                  color="black", ls="--", lw=1, label="5x per-image PIL" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(by_size))],
                  [f"{size} px" for size in by_size])
    ax.set_yscale("log")
    ax.set_ylabel("views / s")
    ax.set_title(f"2 SimCLR views per image from {result['n_images']:,} {result['size']}-px JPEGs")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


_ROWS = (("ssl_lab_raw", "default"), ("ssl_lab_raw_exact", "exact views"),
         ("ssl_lab_raw_fast", "fast views"))
_FAST_ABOVE = 64  # the default views are fast above this size (views.fast=null)


def table(results: dict[str, dict]) -> str:
    """views/s of every (run, view size, view kind) and the raw store's ratio to the per-image
    pipeline, to two decimals as measured (docs generate this from the committed JSONs)."""
    lines = ["| run | view size | views | ssl-lab, raw store | ssl-lab, JPEG store "
             "| per-image PIL + DataLoader (2 workers) | raw vs per-image |",
             "|---|---|---|---:|---:|---:|---:|"]
    for run, result in results.items():
        for size, rows in result["views_per_s_by_view_size"].items():
            per_image = rows["per_image_pil"]["per_s"]
            for key, kind in _ROWS:
                if key not in rows:
                    continue
                jpeg = f"{rows['ssl_lab_jpeg']['per_s']:,.0f}" if key == "ssl_lab_raw" else ""
                if key == "ssl_lab_raw":
                    kind = f"default ({'fast' if int(size) > _FAST_ABOVE else 'exact'} views)"
                lines.append(f"| {run} | {size} px | {kind} | {rows[key]['per_s']:,.0f} | {jpeg} "
                             f"| {per_image:,.0f} | {rows[key]['per_s'] / per_image:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="JPEGs in the synthetic ImageFolder")
    ap.add_argument("--size", type=int, default=96, help="their side, and the store resolution")
    ap.add_argument("--out-sizes", default="64", help="view sides, comma-separated")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (our process)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (per-image)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ssl-lab-bench-loader"))
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--plot", type=Path, default=None, help="bar chart PNG of the views/s")
    ap.add_argument("--replot", type=Path, default=None,
                    help="only draw --plot from this earlier --out JSON (no benchmark)")
    args = ap.parse_args()
    if args.replot:
        print(plot_speedups(json.loads(args.replot.read_text()), args.plot))
        return
    torch.set_num_threads(args.threads)
    # as `ssl-lab train` does; set before the per-image DataLoader forks, so both sides have it
    kept = keep_freed_memory()
    load_before = os.getloadavg()[0]

    t0 = time.perf_counter()
    files = make_folder(args.work / "folder", args.n, args.size)
    print(f"{len(files)} JPEGs of {args.size}px in {args.work / 'folder'} "
          f"({time.perf_counter() - t0:.0f} s)")
    packing, stores = {}, {}
    for encoding in ("raw", "jpeg"):
        dest = args.work / f"store-{encoding}"
        shutil.rmtree(dest, ignore_errors=True)
        start = time.perf_counter()
        pack(f"imagefolder:{args.work / 'folder'}", dest,
             PackOptions(resolution=args.size, encoding=encoding, workers=args.threads),
             progress=False)
        sec = time.perf_counter() - start
        size = sum(f.stat().st_size for f in dest.iterdir())
        packing[encoding] = {"seconds": sec, "images_per_s": len(files) / sec,
                             "bytes": size, "bytes_per_image": size / len(files)}
        stores[encoding] = dest
        print(f"pack {encoding}: {len(files) / sec:,.0f} images/s, {size / 2**20:.0f} MiB")

    loader_only = {encoding: time_batches(store_batches(stores[encoding], args, None),
                                          args.batches) for encoding in stores}
    for encoding, row in loader_only.items():
        print(f"loader alone, {encoding} store: {row['per_s']:,.0f} images/s")
    views: dict[int, dict[str, dict]] = {}
    for size in (int(s) for s in args.out_sizes.split(",")):
        rows = views[size] = {
            "ssl_lab_raw": time_batches(store_batches(stores["raw"], args, size), args.batches),
            "ssl_lab_jpeg": time_batches(store_batches(stores["jpeg"], args, size), args.batches),
            "per_image_pil": time_batches(per_image_batches(files, args, size), args.batches)}
        if size >= 64:  # the other kind of views too (fast is the default above 64 px)
            fast = not get_recipe("simclr", size=size).fast
            rows[f"ssl_lab_raw_{'fast' if fast else 'exact'}"] = time_batches(
                store_batches(stores["raw"], args, size, fast=fast), args.batches)
        for row in rows.values():
            row["speedup_vs_per_image"] = row["per_s"] / rows["per_image_pil"]["per_s"]
    print("\n| view size | pipeline | views / s | vs per-image PIL |\n|---|---|---:|---:|")
    for size, rows in views.items():
        for name, row in rows.items():
            print(f"| {size} | {name} | {row['per_s']:,.0f} | {row['speedup_vs_per_image']:.1f}x |")
    if args.out:
        result = {
            "command": "bench/bench_loader.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("out", "work")),
            "n_images": len(files), "size": args.size, "views_per_image": 2, "recipe": "simclr",
            "packing": packing, "loader_only_images_per_s": loader_only,
            "views_per_s_by_view_size": views,
            "torch": torch.__version__, "keep_freed_memory": kept,
        }
        write_result(args.out, result, load_before)
        if args.plot:
            print(plot_speedups(result, args.plot))


if __name__ == "__main__":
    main()
