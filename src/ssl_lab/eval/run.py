"""Offline evaluation of a run: features once per split, probes per layer, baselines, plot.

`ssl-lab eval RUN_DIR [data.name=...]` lands here, and so does the end of `ssl-lab train`.
Each split's features of the selected layers (`eval.layers`) are written once, in one forward
pass, to feature files (eval.features); each layer is then probed from them, in RAM or block by
block (eval.probes), so memory does not grow with the dataset. Baselines that do not depend on
the run (raw pixels; a random-init encoder of the same architecture) are cached by dataset and
architecture, so a sweep pays for them once. docs/eval.md describes the protocols.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssl_lab.config import Config, load_config
from ssl_lab.config_io import cut, short
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.data.splits import subset
from ssl_lab.errors import UserError
from ssl_lab.eval import blocked, probes
from ssl_lab.eval.augmented import augmented_linear, check_layer
from ssl_lab.eval.features import FeatureDir, FeatureWriter, ImageRows, Rows, release_pages
from ssl_lab.eval.inputs import to_model_input
from ssl_lab.eval.metrics import knn_classify, linear_probe
from ssl_lab.models.encoder import Encoder, encoder_from_spec, load_encoder, read_spec
from ssl_lab.rundir import check_usable
from ssl_lab.runtime import (
    autocast,
    evaluable_run_dir,
    os_error_text,
    os_user_error,
    pick_device,
    resolve_precision,
    short_path,
    write_text_atomic,
)
from ssl_lab.seeding import numpy_rng

__all__ = ["SPLITS", "dataset_tag", "eval_precision", "evaluate_run", "extract_features",
           "features_by_split", "pixel_features", "print_layer_table", "probe_data",
           "to_model_input"]
SPLITS = ("train", "val", "test")
_RELEASE_EVERY = 32  # batches between releases of a packed store's read pages


# ----------------------------------------------------------------------------- features


def eval_dataset(cfg: Config) -> str:
    """The dataset the probes use: eval.data, else the training data (data.name)."""
    return cfg.eval.data or cfg.data.name


def probe_data(cfg: Config, data: DatasetSplits | None = None) -> DatasetSplits:
    """The labelled splits the probes use (`data` when given, else eval_dataset(cfg) loaded):
    eval.train_fraction of the training split (data.fraction limits SSL training only), val and
    test whole. data.target applies when the probes use the training data."""
    if data is None:
        data = load_dataset(eval_dataset(cfg), cfg.data.root, val_fraction=cfg.data.val_fraction,
                            seed=cfg.seed, fraction=cfg.eval.train_fraction,
                            image_size=cfg.data.image_size)
    elif cfg.eval.train_fraction < 1:
        # seeded as load_dataset seeds its fraction subset
        rng = numpy_rng(cfg.seed, zlib.crc32(data.name.encode()), 1)
        keep = subset(data.train, cfg.eval.train_fraction, rng)
        data = replace(data, train=keep)
    if data.name == cfg.data.name:
        data = data.select_target(cfg.data.target)
    if not data.has_labels:
        raise UserError(f"{cut(data.name)} cannot be probed: it {data.probe_gap()}; "
                        "evaluate on a labelled dataset: eval.data=NAME (or data= in Python)")
    return data


def eval_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of offline feature extraction: None (fp32) unless eval.precision=train."""
    return resolve_precision(cfg.train.precision, device) if cfg.eval.precision == "train" else None


@torch.no_grad()
def extract_features(encoder: Encoder, images: np.ndarray, layers: list[str], batch_size: int,
                     device: torch.device, amp_dtype: torch.dtype | None, desc: str = "features",
                     out: dict[str, FeatureWriter] | None = None) -> dict:
    """All requested layers in one forward pass per batch. Without `out`: float32 CPU tensors
    (N, C) per layer; with `out` ({layer: FeatureWriter}), each batch is appended to its file."""
    encoder = encoder.to(device).eval().to(memory_format=torch.channels_last)
    if out is None:
        # Written into preallocated tensors, not concatenated from per-batch chunks: chunks +
        # their concatenation held every layer's features twice at the memory peak.
        tensors = {name: torch.empty(len(images), encoder.feature_dims[name]) for name in layers}
    for i, start in enumerate(tqdm(range(0, len(images), batch_size), desc=desc, leave=False,
                                   unit="batch")):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        with autocast(device, amp_dtype):
            feats = encoder.features(
                to_model_input(batch.to(device), encoder.in_chans, encoder.image_size), layers)
        for name in layers:
            if out is None:
                tensors[name][start:start + len(batch)].copy_(feats[name])
            else:
                out[name].write(feats[name])
        if (i + 1) % _RELEASE_EVERY == 0:
            release_pages(images)
    release_pages(images)
    return tensors if out is None else out


def features_by_split(encoder: Encoder, data: DatasetSplits, layers: list[str], batch_size: int,
                      device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, dict]:
    """{split: {layer: (N, C) float32 CPU tensor}}, all in RAM (small data; tools)."""
    return {split: extract_features(encoder, getattr(data, split).images, layers, batch_size,
                                    device, amp_dtype, desc=f"features/{split}")
            for split in SPLITS}


def select_layers(encoder: Encoder, spec: str | None) -> list[str]:
    """eval.layers ("backbone,proj1"; null or "all" = every layer), in the encoder's order."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(encoder.layer_names)
    asked = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in asked if name not in encoder.feature_dims]
    if unknown or not asked:
        raise UserError(f"eval.layers: unknown layer(s) {short(', '.join(unknown) or spec)}; valid "
                        f"layers: {', '.join(encoder.layer_names)} (comma-separated, or all)")
    return [name for name in encoder.layer_names if name in asked]


def write_features(encoder: Encoder, data: DatasetSplits, layers: list[str], cfg: Config,
                   device: torch.device, amp_dtype: torch.dtype | None, fdir: FeatureDir,
                   label: str = "") -> dict[str, dict[str, Rows]]:
    """Each split's features of `layers`, written once into `fdir`: {split: {layer: Rows}}.
    `label` prefixes the progress bars ("random-init ": which encoder they are for)."""
    rows = {}
    for split in SPLITS:
        images = getattr(data, split).images
        writers = {name: fdir.writer(split, name, len(images), encoder.feature_dims[name],
                                     cfg.eval.feature_dtype) for name in layers}
        extract_features(encoder, images, layers, cfg.eval.batch_size, device, amp_dtype,
                         desc=f"{label}features/{split}", out=writers)
        rows[split] = {name: writer.finish() for name, writer in writers.items()}
    return rows


# ----------------------------------------------------------------------------- probes


def _labels(data: DatasetSplits) -> dict[str, torch.Tensor]:
    return {split: torch.from_numpy(getattr(data, split).labels) for split in SPLITS}


def evaluate_encoder(encoder: Encoder, data: DatasetSplits, cfg: Config, device: torch.device,
                     amp_dtype: torch.dtype | None,
                     feature_dir: Callable[[], FeatureDir] | None = None, label: str = ""
                     ) -> dict[str, dict]:
    """{layer: metrics} for the selected layers; the feature files live in `feature_dir()` (a
    temporary folder by default) and are gone afterwards unless kept. `label` prefixes the
    progress bars (the random-init baseline's read "random-init features/train" ...)."""
    layers = select_layers(encoder, cfg.eval.layers)
    labels = _labels(data)
    budget = cfg.eval.ram_budget_mb << 20
    with (feature_dir or (lambda: FeatureDir(Path(tempfile.gettempdir()))))() as fdir:
        rows = write_features(encoder, data, layers, cfg, device, amp_dtype, fdir, label)
        return {name: probes.evaluate_layer_rows(
                    rows["train"][name], labels["train"], rows["val"][name], labels["val"],
                    rows["test"][name], labels["test"], num_classes=data.num_classes[0],
                    budget_bytes=budget, device=device, mlp=cfg.eval.mlp, seed=cfg.seed,
                    knn_k=cfg.eval.knn_k, knn_temperature=cfg.eval.knn_temperature)
                for name in tqdm(layers, desc=f"{label}probes", leave=False)}


def pixel_features(data: DatasetSplits) -> dict[str, torch.Tensor]:
    """Raw pixels as features: (N, H*W*C) floats in [0, 1] per split (all in RAM)."""
    return {split: ImageRows(getattr(data, split).images).materialize() for split in SPLITS}


def pixel_baseline(data: DatasetSplits, cfg: Config, device: torch.device | None = None
                   ) -> dict[str, float]:
    """Linear probe and kNN on raw pixels, in RAM when they fit eval.ram_budget_mb."""
    device = device or torch.device("cpu")
    rows = {split: ImageRows(getattr(data, split).images) for split in SPLITS}
    labels, k, budget = _labels(data), data.num_classes[0], cfg.eval.ram_budget_mb << 20
    tr, va, te = rows["train"], rows["val"], rows["test"]
    if probes.in_memory_bytes(tr.n, va.n + te.n, tr.dim, k) <= budget:
        flat = {split: r.materialize().to(device) for split, r in rows.items()}
        linear = linear_probe(flat["train"], labels["train"], flat["val"], labels["val"],
                              flat["test"], labels["test"], num_classes=k, seed=cfg.seed)
        knn = knn_classify(flat["train"], labels["train"], flat["test"], labels["test"],
                           num_classes=k, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature)
    else:
        block = probes.block_rows(budget, tr.dim, k)
        linear = blocked.linear_probe_rows(tr, labels["train"], va, labels["val"], te,
                                           labels["test"], num_classes=k, block_rows=block,
                                           device=device)
        knn = blocked.knn_rows(tr, labels["train"], te, labels["test"], num_classes=k,
                               k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                               bank_rows=block, query_rows=block, device=device)
    return {"linear_val": linear["val"], "linear_test": linear["test"], "knn_test": knn}


def _cache_dir() -> Path:
    root = os.environ.get("SSL_LAB_CACHE") or Path.home() / ".cache" / "ssl-lab"
    return Path(root) / "baselines"


def cached(kind: str, key: dict, compute) -> dict:
    """Baselines keyed by everything they depend on (dataset, split seed, architecture...).

    A cache is never fatal: a damaged entry is recomputed and an unwritable cache folder only
    costs the recomputation next time (one warning line each); the run's results are written
    either way."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = _cache_dir() / f"{kind}-{digest}.json"
    if path.is_file():
        found = _read_entry(path)
        if found is not None:
            return found
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"key": key, "result": result}))
    except OSError as exc:
        _warn(f"cannot write the baseline cache {short_path(path.parent)} ({os_error_text(exc)}); "
              "the baseline is recomputed next time (set SSL_LAB_CACHE to a writable folder)")
    return result


def _read_entry(path: Path) -> dict | None:
    """A cache entry's result, or None (with a warning) when it is damaged."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))["result"]
        if isinstance(result, dict):
            return result
        why = "its result is not a mapping"
    except (OSError, UnicodeDecodeError) as exc:
        why = str(exc)[:80]
    except (ValueError, RecursionError, KeyError, TypeError):
        why = "not a complete cache entry (truncated?)"
    _warn(f"ignoring the damaged baseline cache entry {short_path(path)} ({why}); recomputing it")
    return None


def _warn(message: str) -> None:
    print(f"ssl-lab: warning: {message}", file=sys.stderr)


# eval.* keys that cannot change a baseline's numbers: left out of the cache key
_NOT_IN_KEY = {"enabled", "feature_dir", "keep_features", "linear", "aug_layer", "aug_epochs",
               "aug_batch_size", "aug_lr"}


def random_init_encoder(spec: dict, backbone: torch.nn.Module | None) -> Encoder:
    """The run's architecture untrained. A wrapped module is copied and every sub-module that
    can re-initialise itself (`reset_parameters`, as torch's layers do) does so."""
    if backbone is None:
        return encoder_from_spec(spec)
    torch.manual_seed(0)
    fresh = copy.deepcopy(backbone)
    for module in fresh.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return encoder_from_spec(spec, backbone=fresh)


def _baselines(report: dict, spec: dict, data: DatasetSplits, cfg: Config, device: torch.device,
               amp_dtype: torch.dtype | None, feature_dir: Callable[[str], FeatureDir],
               backbone: torch.nn.Module | None = None) -> None:
    settings = {k: v for k, v in vars(cfg.eval).items() if k not in _NOT_IN_KEY | {"data"}}
    data_key = {"data": data.name, "root": cfg.data.root, "target": cfg.data.target,
                "val_fraction": cfg.data.val_fraction, "seed": cfg.seed, "eval": settings}
    arch_key = data_key | {k: spec.get(k) for k in ("model", "in_chans", "image_size", "mean",
                                                    "std", "backbone")}
    report["random_init"] = cached("random-init", arch_key, lambda: evaluate_encoder(
        random_init_encoder(spec, backbone), data, cfg, device, amp_dtype,
        lambda: feature_dir("random-init"), label="random-init "))
    pixel_key = data_key | {"eval": {k: v for k, v in settings.items() if k != "layers"}}
    report["pixels"] = cached("pixels", pixel_key, lambda: pixel_baseline(data, cfg, device))


# ----------------------------------------------------------------------------- the command


def _protocols(report: dict, cfg: Config) -> dict:
    """Which protocol produced each group of numbers (docs/eval.md describes them)."""
    frozen = "frozen"
    out = {"layers": frozen, "feature_dtype": cfg.eval.feature_dtype,
           "knn": {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature}}
    out |= {group: frozen for group in ("random_init", "pixels") if group in report}
    if "augmented" in report:
        out["augmented"] = "augmented"
    return out


def evaluate_run(run_dir: Path, overrides: list[str] = (), *, data: DatasetSplits | None = None,
                 backbone: torch.nn.Module | None = None, allow_import: bool = False) -> dict:
    """Evaluate a run's encoder on its dataset (or another: `eval.data=...`, or `data` from
    ssl_lab.data) and write eval.json, evals/<dataset>.json and plots/probes[-<dataset>].png.
    A wrapped module's run needs its `backbone` again (see models/encoder.py)."""
    start = time.perf_counter()
    run_dir = evaluable_run_dir(run_dir)  # before any work, as the CLI checks it
    spec = read_spec(run_dir)
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if cfg.eval.feature_dir:  # only looks: an unusable folder stops here, not after the encoder
        check_usable(Path(cfg.eval.feature_dir).expanduser(), "eval.feature_dir")
    if cfg.train.threads:  # as in training: the thread count sets the order of float sums
        torch.set_num_threads(cfg.train.threads)
    device = pick_device()
    amp_dtype = eval_precision(cfg, device)
    encoder = load_encoder(run_dir, backbone, allow_import)
    data = probe_data(cfg, data)
    select_layers(encoder, cfg.eval.layers)  # bad names fail before any work
    if cfg.eval.linear == "augmented":
        check_layer(encoder, cfg.eval.aug_layer)

    def feature_dir(kind: str) -> FeatureDir:
        base = Path(cfg.eval.feature_dir).expanduser() if cfg.eval.feature_dir else run_dir
        keep = base / "features" / dataset_tag(data.name, cfg.data.target) / kind \
            if cfg.eval.keep_features else None
        return FeatureDir(base, keep)

    report = {"dataset": data.name, "target": cfg.data.target,
              "probe_train_size": len(data.train.images),
              "layers": evaluate_encoder(encoder, data, cfg, device, amp_dtype,
                                         lambda: feature_dir("trained"))}
    report["best_layer"] = max(report["layers"], key=lambda k: report["layers"][k]["linear_val"])
    if cfg.eval.linear == "augmented":
        report["augmented"] = augmented_linear(load_encoder(run_dir, backbone, allow_import),
                                               data, cfg, device, amp_dtype)
    if cfg.eval.baselines:
        _baselines(report, spec, data, cfg, device, amp_dtype, feature_dir, backbone)
    report["protocol"] = _protocols(report, cfg)
    report["eval_s"] = time.perf_counter() - start
    _write_report(report, run_dir, cfg)
    return report


def dataset_tag(name: str, target: str | None = None) -> str:
    """The file-name tag of an evaluation: evals/<tag>.json, plots/probes-<tag>.png."""
    tag = name.replace(":", "_").replace("/", "_")
    return f"{tag}-{target}" if target else tag


def _write_report(report: dict, run_dir: Path, cfg: Config) -> None:
    from ssl_lab.plots import plot_layer_probes

    train_cfg = load_config(run_dir / "config.yaml")
    tag = dataset_tag(report["dataset"], cfg.data.target)
    # the run's own evaluation (its data, or the eval.data it was trained with) is probes.png
    same_data = tag == dataset_tag(eval_dataset(train_cfg), train_cfg.data.target)
    plot = run_dir / "plots" / ("probes.png" if same_data else f"probes-{tag}.png")
    report["plot"] = str(plot)
    text = json.dumps(report, indent=1)
    path = run_dir / "evals" / f"{tag}.json"
    try:
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, text)
        path = run_dir / "eval.json"
        write_text_atomic(path, text)
        path = plot
        plot_layer_probes(report, plot)
    except OSError as exc:
        raise os_user_error("cannot write", path, exc, "the evaluation's results are lost; "
                            f"run `ssl-lab eval {short_path(run_dir)}` again") from None


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
    if "augmented" in report:
        aug = report["augmented"]
        lines.append(f"augmented linear evaluation of {aug['layer']} ({aug['epochs']} epochs): "
                     f"val {100 * aug['val']:.2f}%, test {100 * aug['test']:.2f}%")
    lines.append(f"plot: {report['plot']}   eval: {run_dir / 'eval.json'}")
    print("\n".join(lines))
