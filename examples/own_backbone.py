"""Bring your own network and your own arrays: pretrain with SimCLR, probe every named layer,
export the best one, and condition an RCDM on a layer of your choice.

    python examples/own_backbone.py            # the full example (20 SSL epochs on digits)
    python examples/own_backbone.py --tiny     # tiny sizes: what the test suite runs

The images here are scikit-learn's 8x8 digits upscaled to 16 px, standing in for whatever
uint8 (N, H, W, C) arrays you have.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ssl_lab


class SmallCNN(nn.Module):
    """Any nn.Module works; ssl-lab only needs the dotted names of the layers to probe."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                   nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, 10)  # a classifier head ssl-lab never uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


def digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels): uint8 NHWC, int labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)
    images = images.repeat(2, axis=1).repeat(2, axis=2)[..., None]  # 16x16, one channel
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:360], order[360:]
    return images[train], bunch.target[train], images[test], bunch.target[test]


def main(tiny: bool, out: Path) -> dict:
    train_x, train_y, test_x, test_y = digits_arrays()
    if tiny:
        train_x, train_y = train_x[:256], train_y[:256]
    data = ssl_lab.data.from_arrays(train_x, train_y, test_x, test_y, name="digits16")
    backbone = ssl_lab.models.from_module(
        SmallCNN(8 if tiny else 32), layers={"stem": "stem", "block": "block", "pooled": "pool"},
        input_size=16, in_chans=1, mean=(0.5,), std=(0.25,))
    cfg = ssl_lab.load_config("simclr", [
        f"run.dir={out / 'ssl'}", "views.size=16", "model.projector=64-32",
        f"train.epochs={0.1 if tiny else 20}", "optim.batch_size=64", "eval.baselines=false",
        f"eval.knn_k={10 if tiny else 200}"])
    run_dir = ssl_lab.train(cfg, backbone=backbone, data=data)
    report = ssl_lab.evaluate(run_dir, data=data, backbone=backbone)
    for name, row in report["layers"].items():
        print(f"{name:<8} linear val {100 * row['linear_val']:5.1f}%  "
              f"test {100 * row['linear_test']:5.1f}%")
    exported = ssl_lab.export_encoder(run_dir, layer="best", backbone=backbone)
    net = ssl_lab.load_exported(exported, backbone=backbone)
    feats = net(torch.from_numpy(test_x[:4]).permute(0, 3, 1, 2).float() / 255)
    print(f"exported {report['best_layer']} ({tuple(feats.shape)}) to {exported}")

    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    rcdm = load_train_config(str(run_dir), [
        f"run.dir={out / 'rcdm'}", "layer=block", "unet.size=16", "unet.channels=16-32",
        f"train.epochs={1 if tiny else 10}", "train.batch_size=64", "train.preview=false"])
    print(f"RCDM on layer 'block': {train_rcdm(rcdm, backbone=backbone, data=data)}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go "
                        "(default: a temporary folder)")
    ns = parser.parse_args()
    main(ns.tiny, ns.out or Path(tempfile.mkdtemp(prefix="ssl-lab-example-")))
