"""What `infusion train`, `sample` and `score` share: the data as pixels, the model (operator +
prior) built from a config, and a trained run's model loaded from its newest checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.data.sources import DatasetSplits, load_dataset
from ssl_lab.errors import UserError
from ssl_lab.gen import infusion as inf
from ssl_lab.gen.infusion_config import InfusionConfig

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
    found = ckpt_io.find_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has no complete checkpoint; train it first "
                        f"(ssl-lab infusion train run.dir={run_dir} resume=true)")
    if not (run_dir / SHAPE_FILE).is_file():
        raise UserError(f"{run_dir} has no {SHAPE_FILE}; it was not made by `ssl-lab infusion "
                        "train`")
    shape = tuple(json.loads((run_dir / SHAPE_FILE).read_text()))
    model = build_model(cfg, shape, device)
    ckpt_io.load_weights(found, model.modules())
    return model
