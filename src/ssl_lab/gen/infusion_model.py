"""What `infusion train`, `sample` and `score` share: the data as pixels, the model (operator +
prior) built from a config, and a trained run's model loaded from its newest checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.config_io import short
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import InfusionConfig
from ssl_lab.runtime import read_json, short_path

SHAPE_FILE = "shape.json"  # the image shape (C, H, W): the model's spec


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) → float (N, C, H, W) in [0, 1]; a packed store is read whole (the chain
    trains on every image every epoch, in memory)."""
    return torch.from_numpy(np.asarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def load_data(cfg: InfusionConfig) -> DatasetSplits:
    return load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                        seed=cfg.seed, fraction=cfg.data.fraction)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator for the fixed draws of evaluation (monitor bounds, sampling, scoring)."""
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class Model:
    operator: torch.nn.Module
    prior: inf.PixelGaussianPrior
    alphas: torch.Tensor
    steps: int

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"operator": self.operator, "prior": self.prior}


def build_model(cfg: InfusionConfig, shape: tuple[int, int, int], device: torch.device) -> Model:
    c = cfg.infusion
    torch.manual_seed(cfg.seed)  # operator initialisation
    op = inf.build_operator(c.operator, shape, c.steps, c.hidden, c.layers, c.var_scale,
                            c.var_min).to(device)
    prior = inf.PixelGaussianPrior(shape).to(device)
    return Model(op, prior, inf.alpha_schedule(c.steps, c.alpha0, c.omega), c.steps)


def load_model(run_dir: Path, cfg: InfusionConfig, device: torch.device) -> Model:
    """The operator and prior of a trained run (its newest verified checkpoint)."""
    run_dir = Path(run_dir)
    shape = read_shape(run_dir)  # the model's size: checked before any checkpoint is read
    found = ckpt_io.find_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{short_path(run_dir)} has no complete checkpoint; train it first "
                        f"(ssl-lab infusion train run.dir={short_path(run_dir)} resume=true)")
    model = build_model(cfg, shape, device)
    ckpt_io.load_weights(found, model.modules())
    return model


MAX_SIDE = 4096  # the model is allocated from shape.json: a damaged one must not ask for TB


def read_shape(run_dir: Path) -> tuple[int, int, int]:
    """The image shape (C, H, W) of a trained run (shape.json), checked."""
    path = Path(run_dir) / SHAPE_FILE
    if not path.is_file():
        raise UserError(f"{short_path(run_dir)} has no {SHAPE_FILE}; it was not made by "
                        "`ssl-lab infusion train`")
    fix = "restore it ([channels, height, width] of the training images) or train again"
    shape = read_json(path, "image shape", fix)
    if not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIDE for v in shape)):
        raise UserError(f"{short_path(path)} holds {short(shape)}, not [channels, height, width] "
                        f"of 1 to {MAX_SIDE} each: the file is damaged; {fix}")
    return tuple(shape)
