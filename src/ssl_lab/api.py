"""The public Python API, re-exported by `ssl_lab` (docs/library.md walks through it):

    cfg = ssl_lab.load_config("configs/simclr.yaml", ["train.epochs=1"])
    backbone = ssl_lab.models.from_module(net, layers={"mid": "layer2", "backbone": "pool"})
    data = ssl_lab.data.from_arrays(train_images, train_labels, test_images, test_labels)
    run_dir = ssl_lab.train(cfg, backbone=backbone, data=data)
    report = ssl_lab.evaluate(run_dir, data=data, backbone=backbone)
    out = ssl_lab.export_encoder(run_dir, layer="best", backbone=backbone)

The command line is a thin layer over the same functions.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ssl_lab.config import Config, load_config
from ssl_lab.data.splits import DatasetSplits


def train(cfg: Config | None = None, *, backbone: nn.Module | None = None,
          data: DatasetSplits | None = None, allow_import: bool = False) -> Path:
    """Pretrain (or resume, with `resume=true`) an encoder and probe every layer; returns the
    run directory. `cfg` defaults to `load_config()` (the main job).

    `backbone`: any module wrapped by `ssl_lab.models.from_module` (trained in place), instead
    of `model.backbone`. `data`: `ssl_lab.data.from_arrays` / `from_dataset` splits, instead of
    `data.name`. `allow_import=True` lets `model.backbone=import:package.module:factory` import
    and call that factory (never done otherwise).
    """
    from ssl_lab.train_loop import train as run_training

    return run_training(cfg if cfg is not None else load_config(), backbone=backbone, data=data,
                        allow_import=allow_import)


def evaluate(run_dir: str | Path, overrides: list[str] = (), *, data: DatasetSplits | None = None,
             backbone: nn.Module | None = None, allow_import: bool = False) -> dict:
    """Offline probes of every layer of a run (linear and kNN, val-chosen weight decay, the
    baselines) on its dataset, on `eval.data=NAME` (in `overrides`), or on `data`; writes and
    returns eval.json as a dict. A run of a wrapped module needs that `backbone` again."""
    from ssl_lab.eval.run import evaluate_run

    return evaluate_run(Path(run_dir), list(overrides), data=data, backbone=backbone,
                        allow_import=allow_import)


__all__ = ["Config", "DatasetSplits", "evaluate", "load_config", "train"]
