"""The device checks of bench/gpu_check.py (views, prefetch, ddp) and what every part uses:
`Ctx` (mode, device, deadline, where results go), synthetic data and the SSL model.

Each `part_*(ctx) -> dict` runs in its own process, started by gpu_check.py's runner; the
training parts (amp, throughput) are in gpu_check.py itself.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssl_lab.config import MethodConfig, ModelConfig
from ssl_lab.data import augment as A
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.views import ViewGenerator, get_recipe
from ssl_lab.methods import SSLModel, get_method
from ssl_lab.models.encoder import Encoder

# max |device - CPU| and mean |device - CPU| in [0, 1] pixel units. Exact views are fp32 on
# both sides (half a uint8 level at most); fast views use bf16 GEMMs where native, whose
# rounding alone moved fast views by up to 0.015 (mean 0.0012) on a CPU: twice that (each
# run records that gap again as cpu_bf16_vs_fp32_max_abs_diff).
TOLERANCE = {False: (2e-3, 2e-4), True: (3e-2, 3e-3)}


@dataclass
class Ctx:
    """What a part gets: mode, device, a deadline (time.time(): the parent's clock too) and
    where to save results."""

    dry: bool
    device: torch.device
    deadline: float
    tmp: Path
    result: Path

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self, result: dict) -> None:
        """Write (partial) results now: they survive if the part is killed at its cap."""
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, self.result)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def verdict(ok: bool) -> str:
    """A part's or case's status."""
    return "ok" if ok else "failed"


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3): smooth random colour fields plus pixel noise (crops, blur and
    colour ops all change them visibly, unlike constant or pure-noise images)."""
    g = torch.Generator().manual_seed(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(0, n, 4096):  # chunks: bounded float memory for large sets
        k = min(4096, n - i)
        img = F.interpolate(torch.rand(k, 3, 5, 5, generator=g), size=(size, size),
                            mode="bicubic", align_corners=False)
        img = img + 0.05 * torch.randn(img.shape, generator=g)
        out[i:i + k] = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def write_npz(path: Path, n_train: int, size: int) -> Path:
    """An `npz:PATH` dataset with its own train and test splits (10 random classes)."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=synthetic_images(n_train, size, 1),
             y_train=rng.integers(0, 10, n_train), x_test=synthetic_images(64, size, 2),
             y_test=rng.integers(0, 10, 64))
    return path


def ssl_model(backbone: str, size: int, width: float, device: torch.device) -> SSLModel:
    """SimCLR on `backbone` (CIFAR stem up to 64 px, ImageNet stem above), channels_last."""
    cfg = ModelConfig(backbone=backbone, width=width, last_width=None,
                      stem="cifar" if size <= 64 else "imagenet")
    encoder = Encoder(cfg, 3, size, [0.5] * 3, [0.25] * 3)
    model = SSLModel(encoder, get_method("simclr"), MethodConfig(), num_classes=10)
    return model.to(device).to(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- (a) views


def view_cases(dry: bool) -> dict[str, tuple[bool, int, int, int]]:
    """name -> (fast, view size, image size, images); every op of the vicreg recipe + noise."""
    if dry:
        return {"exact-16": (False, 16, 20, 8), "fast-16": (True, 16, 20, 8)}
    return {"exact-32": (False, 32, 32, 128), "exact-224": (False, 224, 256, 32),
            "fast-96": (True, 96, 96, 64), "fast-224": (True, 224, 256, 32)}


def _bf16_gap(recipe, size: int, images: torch.Tensor, params: list[dict]) -> float:
    """max |fast views with bf16 GEMMs - with fp32 GEMMs| on the CPU: the rounding the fast
    recipe accepts by design, for scale (augment.native_bf16_matmul forced both ways)."""
    native, outs = A.native_bf16_matmul, []
    try:
        for flag in (False, True):
            A.native_bf16_matmul = lambda device, flag=flag: flag
            outs.append(ViewGenerator(recipe, size, 2).replay(images, params))
    finally:
        A.native_bf16_matmul = native
    return (outs[0] - outs[1]).abs().max().item()


def part_views(ctx: Ctx) -> dict:
    """(a) Views replayed on the device from CPU-drawn parameters equal the CPU's views."""
    dev, cases = ctx.device, {}
    for name, (fast, size, src, n) in view_cases(ctx.dry).items():
        recipe = replace(get_recipe("vicreg", size=size, fast=fast), noise_std=0.05)
        images = torch.from_numpy(synthetic_images(n, src, seed=3))
        ref, params = ViewGenerator(recipe, size, 2)(images, torch.Generator().manual_seed(0),
                                                     return_params=True)
        on_dev = ViewGenerator(recipe, size, 2)
        moved = [{k: t.to(dev) for k, t in p.items()} for p in params]
        diff = (on_dev.replay(images.to(dev), moved).cpu() - ref).abs()
        # the device's own draw must replay on the device too (resume relies on it); fast views
        # may differ by a bf16 rounding there (scatter_add's order of additions is not fixed)
        own, own_params = on_dev(images.to(dev), torch.Generator(dev).manual_seed(0), True)
        again = (on_dev.replay(images.to(dev), own_params) - own).abs().max().item()
        tol_max, tol_mean = TOLERANCE[fast]
        ok = diff.max().item() <= tol_max and diff.mean().item() <= tol_mean and \
            again <= (tol_max if fast else 1e-5)
        cases[name] = {"status": verdict(ok), "fast": fast, "view_size": size,
                       "image_size": src, "images": n, "views": 2, "max_abs_diff":
                       diff.max().item(), "mean_abs_diff": diff.mean().item(),
                       "tolerance_max": tol_max, "tolerance_mean": tol_mean,
                       "device_draw_replay_max_abs_diff": again,
                       "cpu_bf16_vs_fp32_max_abs_diff": _bf16_gap(recipe, size, images, params)
                       if fast else None}
    worst = max(c["max_abs_diff"] for c in cases.values())
    return {"status": verdict(all(c["status"] == "ok" for c in cases.values())), "cases": cases,
            "compared": "CPU-drawn parameters: ViewGenerator on the CPU vs replay on the device",
            "bf16_gemms": {"device": A.native_bf16_matmul(dev),
                           "cpu": A.native_bf16_matmul(torch.device("cpu"))},
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "summary": f"{len(cases)} cases, worst max|device-CPU| {worst:.1e}"}


# ----------------------------------------------------------------------------- (d) prefetch


def _counting_copies(counts: dict[str, int]) -> Callable[[], None]:
    """Count pin_memory() calls (and pinned results) and non_blocking .to() from pinned memory
    while the loader runs; returns the function that restores torch.Tensor."""
    pin, to = torch.Tensor.pin_memory, torch.Tensor.to

    def counted_pin(self, *args, **kwargs):
        out = pin(self, *args, **kwargs)
        counts["pin_memory_calls"] += 1
        counts["pinned_results"] += int(out.is_pinned())
        return out

    def counted_to(self, *args, **kwargs):
        if kwargs.get("non_blocking") and self.is_pinned():
            counts["non_blocking_copies_from_pinned"] += 1
        return to(self, *args, **kwargs)

    torch.Tensor.pin_memory, torch.Tensor.to = counted_pin, counted_to

    def restore() -> None:
        torch.Tensor.pin_memory, torch.Tensor.to = pin, to
    return restore


def _start_profiler() -> tuple[torch.profiler.profile | None, str | None]:
    """A CPU + CUDA profiler, started; (None, why) where it cannot run (no CUPTI): the copy
    counts still tell then."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    try:
        prof = torch.profiler.profile(activities=acts)
        prof.start()
        return prof, None
    except Exception as exc:
        return None, repr(exc)


def part_prefetch(ctx: Ctx) -> dict:
    """(d) A packed store's batches: a prefetch thread, pinned memory, non_blocking copies."""
    from ssl_lab.data.pack import PackOptions, pack
    from ssl_lab.data.store import open_store

    n, size, batch, steps = (48, 16, 8, 4) if ctx.dry else (1024, 64, 128, 12)
    npz = write_npz(ctx.tmp / "prefetch.npz", n, size)
    store, _ = pack(f"npz:{npz}", ctx.tmp / "store", PackOptions(), progress=False)
    split = open_store(store).split("train")
    loader = BatchLoader(split.images, split.labels, batch, 0, device=ctx.device, prefetch=2)
    counts = dict.fromkeys(("pin_memory_calls", "pinned_results",
                            "non_blocking_copies_from_pinned"), 0)
    cuda = ctx.device.type == "cuda"
    prof, prof_error = _start_profiler() if cuda else (None, None)
    restore = _counting_copies(counts)
    try:
        batches = loader.batches(0, steps)
        got = [next(batches)]
        threads = sorted({t.name.rsplit("_", 1)[0] for t in threading.enumerate()
                          if t.name.startswith("ssl-lab-loader")})
        got += list(batches)
        ctx.sync()
    finally:
        restore()
        if prof is not None:
            prof.stop()
    match = all(torch.equal(x.cpu(), torch.from_numpy(split.images[loader.indices(s).numpy()]))
                for s, (x, _) in enumerate(got))
    out = {"source": "packed store (raw), as data.name=packed:PATH", "batches": steps,
           "streamed": loader.streamed, "prefetch_threads": threads, "batches_match": match,
           "copy_stream": getattr(loader, "_stream", None) is not None, **counts,
           "in_memory_sources": "put on the device once at start; no per-step copy to pin"}
    ok = loader.streamed and bool(threads) and match
    if cuda:
        out["profiler_memcpy"] = {"error": prof_error} if prof is None else dict(
            Counter(e.name for e in prof.events() if "memcpy" in e.name.lower()))
        pinned = counts["pinned_results"] >= steps and \
            counts["non_blocking_copies_from_pinned"] >= steps
        out["pinned"] = {"status": verdict(pinned)}
        ok = ok and pinned and out["copy_stream"]
    else:
        out["pinned"] = {"status": "skipped",
                         "reason": "CPU device: batches stay in host memory, nothing to pin"}
    out["summary"] = (f"{counts['pin_memory_calls']} pins, "
                      f"{counts['non_blocking_copies_from_pinned']} non_blocking copies, "
                      f"thread {'yes' if threads else 'no'}")
    return {"status": verdict(ok), **out}


# ----------------------------------------------------------------------------- (e) DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_tuple(version: int | tuple) -> tuple:
    return version if isinstance(version, tuple) else (version,)


def part_ddp(ctx: Ctx) -> dict:
    """(e) A 1-process DistributedDataParallel step: init time, gradients equal a plain model's."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    dev, cuda = ctx.device, ctx.device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:  # before init: NCCL binds its communicator to the current device
        torch.cuda.set_device(dev.index or 0)
    start = time.perf_counter()
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                             world_size=1, timeout=timedelta(seconds=max(10, ctx.left())))
    init_s = time.perf_counter() - start
    try:
        size, width, n = (16, 0.125, 8) if ctx.dry else (32, 0.5, 128)
        model = ssl_model("resnet18", size, width, dev)
        plain = copy.deepcopy(model)
        images = torch.from_numpy(synthetic_images(n, size, 4)).to(dev)
        views = ViewGenerator("simclr", size, 2)(images, torch.Generator(dev).manual_seed(0))
        loss_fn, mcfg = get_method("simclr").loss, MethodConfig()
        with warnings.catch_warnings(record=True) as caught:  # e.g. DDP's grad-stride warning
            warnings.simplefilter("always")
            ddp = DistributedDataParallel(model, device_ids=[dev.index or 0] if cuda else None)
            loss = loss_fn(ddp(views, []), None, mcfg, None)
            loss.backward()
        loss_fn(plain(views, []), None, mcfg, None).backward()
        pairs = [(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters(),
                                                  strict=True) if b.grad is not None]
        rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in pairs)
        torch.optim.SGD(ddp.parameters(), lr=0.01).step()
        finite = all(torch.isfinite(p).all().item() for p in model.parameters())
        probe = torch.ones(1, device=dev)
        tdist.all_reduce(probe)
        ok = finite and rel <= 1e-3 and probe.item() == 1.0 and bool(torch.isfinite(loss))
        nccl = ".".join(map(str, _as_tuple(torch.cuda.nccl.version()))) if cuda else None
        return {"status": verdict(ok), "backend": backend, "nccl_version": nccl, "world_size": 1,
                "init_s": init_s, "loss": loss.item(), "max_rel_grad_diff_vs_plain": rel,
                "params_finite_after_step": finite, "all_reduce_ok": probe.item() == 1.0,
                "warnings": sorted({str(w.message).split("\n")[0][:300] for w in caught}),
                "summary": f"{backend} init {init_s:.1f}s, grads vs plain {rel:.1e}"}
    finally:
        tdist.destroy_process_group()
