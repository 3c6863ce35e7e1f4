"""Offline evaluation of a run: features once per layer, probes per layer, baselines, plot.

`ssl-lab eval RUN_DIR [data.name=...]` lands here, and so does the end of `ssl-lab train`.
Baselines that do not depend on the run (raw pixels; a random-init encoder of the same
architecture) are cached by dataset and architecture, so a sweep pays for them once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config import Config, ModelConfig, load_config
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.errors import UserError
from ssl_lab.eval.metrics import evaluate_layer, knn_classify, linear_probe
from ssl_lab.methods import Encoder
from ssl_lab.runtime import autocast, pick_device, resolve_precision, write_text_atomic

SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- encoders


def read_spec(run_dir: Path) -> dict:
    path = Path(run_dir) / "encoder.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an ssl-lab run directory (no encoder.json); pass the "
                        "directory that `ssl-lab train` created")
    return json.loads(path.read_text())


def encoder_from_spec(spec: dict, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelConfig(**spec["model"]), spec["in_chans"], spec["image_size"],
                   spec["mean"], spec["std"])


def load_encoder(run_dir: Path) -> Encoder:
    """The trained encoder of a run (its newest verified checkpoint), in eval mode."""
    encoder = encoder_from_spec(read_spec(run_dir))
    found = ckpt_io.find_checkpoint(Path(run_dir))
    if found is None:
        raise UserError(f"no complete checkpoint in {run_dir}/checkpoints; train the run first "
                        "(or resume it with resume=true)")
    holder = torch.nn.Module()
    holder.encoder = encoder
    ckpt_io.load_weights(found, {"model": holder}, strict=False)
    return encoder.eval()


# ----------------------------------------------------------------------------- features


def probe_data(cfg: Config) -> DatasetSplits:
    """The labelled splits the probes use: eval.train_fraction of the training split
    (data.fraction limits SSL training only), val and test whole."""
    return load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                        seed=cfg.seed, fraction=cfg.eval.train_fraction
                        ).select_target(cfg.data.target)


def eval_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of offline feature extraction: None (fp32) unless eval.precision=train."""
    return resolve_precision(cfg.train.precision, device) if cfg.eval.precision == "train" else None


def to_model_input(batch: torch.Tensor, in_chans: int, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, in_chans, size, size) in [0, 1]: channels matched (grey
    repeated to RGB, RGB to luminance) and resized, so any dataset can be probed (transfer)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[1] == 1 and in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and in_chans == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
            1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def extract_features(encoder: Encoder, images: np.ndarray, layers: list[str], batch_size: int,
                     device: torch.device, amp_dtype: torch.dtype | None, desc: str = "features"
                     ) -> dict[str, torch.Tensor]:
    """All requested layers in one forward pass per batch; float32 CPU tensors (N, C)."""
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    # Written into preallocated tensors, not concatenated from per-batch chunks: chunks + their
    # concatenation held every layer's features twice at the evaluation's memory peak.
    out = {name: torch.empty(len(images), encoder.feature_dims[name]) for name in layers}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch"):
        batch = torch.from_numpy(images[start:start + batch_size]).to(device)
        with autocast(device, amp_dtype):
            feats = encoder.features(to_model_input(batch, encoder.in_chans, encoder.image_size), layers)
        for name in layers:
            out[name][start:start + len(batch)].copy_(feats[name])
    return out


def features_by_split(encoder: Encoder, data: DatasetSplits, layers: list[str], batch_size: int,
                      device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, dict]:
    return {split: extract_features(encoder, getattr(data, split).images, layers, batch_size,
                                    device, amp_dtype, desc=f"features/{split}")
            for split in SPLITS}


# ----------------------------------------------------------------------------- probes


def evaluate_encoder(encoder: Encoder, data: DatasetSplits, cfg: Config, device: torch.device,
                     amp_dtype: torch.dtype | None) -> dict[str, dict]:
    layers = encoder.layer_names
    feats = features_by_split(encoder, data, layers, cfg.eval.batch_size, device, amp_dtype)
    labels = {split: torch.from_numpy(getattr(data, split).labels) for split in SPLITS}
    results = {}
    for name in tqdm(layers, desc="probes", leave=False):
        results[name] = evaluate_layer(
            feats["train"][name], labels["train"], feats["val"][name], labels["val"],
            feats["test"][name], labels["test"], num_classes=data.num_classes[0],
            mlp=cfg.eval.mlp, seed=cfg.seed, knn_k=cfg.eval.knn_k,
            knn_temperature=cfg.eval.knn_temperature)
    return results


def pixel_features(data: DatasetSplits) -> dict[str, torch.Tensor]:
    """Raw pixels as features: (N, H*W*C) floats in [0, 1] per split."""
    return {split: torch.from_numpy(getattr(data, split).images).flatten(1).float().div_(255)
            for split in SPLITS}


def pixel_baseline(data: DatasetSplits, cfg: Config) -> dict[str, float]:
    flat = pixel_features(data)
    labels = {split: torch.from_numpy(getattr(data, split).labels) for split in SPLITS}
    k = data.num_classes[0]
    linear = linear_probe(flat["train"], labels["train"], flat["val"], labels["val"],
                          flat["test"], labels["test"], num_classes=k, seed=cfg.seed)
    knn = knn_classify(flat["train"], labels["train"], flat["test"], labels["test"],
                       num_classes=k, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    return {"linear_val": linear["val"], "linear_test": linear["test"], "knn_test": knn}


def _cache_dir() -> Path:
    root = os.environ.get("SSL_LAB_CACHE") or Path.home() / ".cache" / "ssl-lab"
    return Path(root) / "baselines"


def cached(kind: str, key: dict, compute) -> dict:
    """Baselines keyed by everything they depend on (dataset, split seed, architecture...)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = _cache_dir() / f"{kind}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "result": result}))
    return result


# ----------------------------------------------------------------------------- the command


def evaluate_run(run_dir: Path, overrides: list[str] = ()) -> dict:
    """Evaluate a run's encoder on its dataset (or another: `data.name=...`) and write
    eval.json, evals/<dataset>.json and plots/probes[-<dataset>].png."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if cfg.train.threads:  # as in training: the thread count sets the order of float sums
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    amp_dtype = eval_precision(cfg, device)
    data = probe_data(cfg)
    encoder = load_encoder(run_dir)
    report = {"dataset": cfg.data.name, "target": cfg.data.target,
              "probe_train_size": len(data.train.images),
              "layers": evaluate_encoder(encoder, data, cfg, device, amp_dtype)}
    report["best_layer"] = max(report["layers"], key=lambda k: report["layers"][k]["linear_val"])
    if cfg.eval.baselines:
        data_key = {"data": cfg.data.name, "root": cfg.data.root, "target": cfg.data.target,
                    "val_fraction": cfg.data.val_fraction, "seed": cfg.seed,
                    "eval": vars(cfg.eval) | {"enabled": True}}
        arch_key = data_key | {k: spec[k] for k in ("model", "in_chans", "image_size", "mean", "std")}
        report["random_init"] = cached("random-init", arch_key, lambda: evaluate_encoder(
            encoder_from_spec(spec), data, cfg, device, amp_dtype))
        report["pixels"] = cached("pixels", data_key, lambda: pixel_baseline(data, cfg))
    report["eval_s"] = time.perf_counter() - start
    _write_report(report, run_dir, cfg)
    return report


def dataset_tag(name: str, target: str | None = None) -> str:
    """The file-name tag of an evaluation: evals/<tag>.json, plots/probes-<tag>.png."""
    tag = name.replace(":", "_").replace("/", "_")
    return f"{tag}-{target}" if target else tag


def _dataset_tag(cfg: Config) -> str:
    return dataset_tag(cfg.data.name, cfg.data.target)


def _write_report(report: dict, run_dir: Path, cfg: Config) -> None:
    from ssl_lab.plots import plot_layer_probes

    train_cfg = load_config(run_dir / "config.yaml")
    same_data = _dataset_tag(train_cfg) == _dataset_tag(cfg)
    plot = run_dir / "plots" / ("probes.png" if same_data else f"probes-{_dataset_tag(cfg)}.png")
    report["plot"] = str(plot)
    text = json.dumps(report, indent=1)
    (run_dir / "evals").mkdir(exist_ok=True)
    write_text_atomic(run_dir / "evals" / f"{_dataset_tag(cfg)}.json", text)
    write_text_atomic(run_dir / "eval.json", text)
    plot_layer_probes(report, plot)


def print_layer_table(report: dict, run_dir: Path) -> None:
    rand = report.get("random_init", {})
    lines = [f"\nper-layer probes on {report['dataset']} (test top-1; best layer chosen on val)",
             f"{'layer':<10} {'linear':>8} {'kNN':>8} {'random-init':>12}"]
    for name, row in report["layers"].items():
        mark = "  <- best" if name == report["best_layer"] else ""
        r = rand.get(name, {}).get("linear_test")
        rand_txt = f"{100 * r:11.2f}%" if r is not None else f"{'-':>12}"
        lines.append(f"{name:<10} {100 * row['linear_test']:7.2f}% {100 * row['knn_test']:7.2f}% "
                     f"{rand_txt}{mark}")
    if "pixels" in report:
        lines.append(f"{'pixels':<10} {100 * report['pixels']['linear_test']:7.2f}% "
                     f"{100 * report['pixels']['knn_test']:7.2f}%")
    lines.append(f"plot: {report['plot']}   eval: {run_dir / 'eval.json'}")
    print("\n".join(lines))
