"""The public Python API (docs/library.md): names, a hand-written backbone end to end, user
datasets, unlabelled training with a labelled evaluation dataset, and the import opt-in."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import ssl_lab
from ssl_lab.cli import main
from ssl_lab.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["views.size=16", "model.projector=16-8", "optim.batch_size=32", "train.threads=1",
        "eval.baselines=false", "eval.knn_k=5", "train.log_every_steps=1"]


class ThreeLayerNet(nn.Module):
    """Defined here, not in ssl-lab: what a user brings."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)  # never probed, never trained by the SSL loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(self.stem(x))).flatten(1))


LAYERS = {"early": "stem", "middle": "body", "pooled": "pool"}


def wrapped() -> nn.Module:
    torch.manual_seed(0)
    return ssl_lab.models.from_module(ThreeLayerNet(), layers=LAYERS, input_size=16, in_chans=1,
                                      mean=(0.5,), std=(0.25,))


def arrays(n: int = 96, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two classes a linear probe can tell apart: bright or dark images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 100, (n, 16, 16, 1)) + 120 * labels[:, None, None, None]
    return images.astype(np.uint8), labels


def user_data():
    x, y = arrays(96, 0)
    tx, ty = arrays(40, 1)
    return ssl_lab.data.from_arrays(x, y, tx, ty, name="bright")


def config(tmp_path: Path, name: str, *extra: str):
    return ssl_lab.load_config(None, [f"run.dir={tmp_path / name}", "train.epochs=1", *TINY,
                                      *extra])


PUBLIC = ["load_config", "train", "evaluate", "export_encoder", "load_exported", "models.from_module",
          "models.build_backbone", "data.from_arrays", "data.from_dataset", "data.load_dataset",
          "losses.simclr", "losses.dino"]


@pytest.mark.parametrize("dotted", PUBLIC)
def test_every_public_name_exists_with_a_docstring(dotted):
    obj = ssl_lab
    for part in dotted.split("."):
        obj = getattr(obj, part)
    assert callable(obj) and (obj.__doc__ or "").strip(), dotted


def test_hand_written_module_trains_evaluates_exports_and_conditions_rcdm(tmp_path):
    data, backbone = user_data(), wrapped()
    assert backbone.feature_dims == {"early": 8, "middle": 12, "backbone": 12}
    run_dir = ssl_lab.train(config(tmp_path, "ssl", "train.epochs=2", "eval.enabled=false"),
                            backbone=backbone, data=data)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4  # 86 train // 32 x 2
    saved = (run_dir / "config.yaml").read_text()
    assert "backbone: module" in saved and data.name in saved
    assert json.loads((run_dir / "encoder.json").read_text())["backbone"]["layers"] == {
        "early": "stem", "middle": "body", "backbone": "pool"}

    report = ssl_lab.evaluate(run_dir, data=data, backbone=wrapped())
    assert list(report["layers"]) == ["early", "middle", "backbone", "proj1", "proj2"]
    assert report["best_layer"] in report["layers"]
    assert json.loads((run_dir / "eval.json").read_text())["layers"].keys() == \
        report["layers"].keys()

    out = ssl_lab.export_encoder(run_dir, layer="middle", backbone=wrapped())
    net = ssl_lab.load_exported(out, backbone=wrapped())
    x = torch.rand(3, 1, 16, 16)
    trained = ssl_lab.models.encoder.load_encoder(run_dir, wrapped())
    with torch.no_grad():
        assert torch.allclose(net(x), trained.features(x, ["middle"])["middle"], atol=1e-6)

    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    rcdm = load_train_config(str(run_dir), [
        f"run.dir={tmp_path / 'rcdm'}", "layer=middle", "unet.size=16", "unet.channels=16-32",
        "train.epochs=1", "train.batch_size=32", "train.preview=false", "train.threads=1"])
    rcdm_dir = train_rcdm(rcdm, backbone=wrapped(), data=data)
    assert json.loads((rcdm_dir / "rcdm.json").read_text())["layer"] == "middle"
    assert (rcdm_dir / "summary.json").is_file()


def test_wrapped_run_reload_needs_the_backbone_and_never_imports(tmp_path):
    run_dir = ssl_lab.train(config(tmp_path, "ssl", "eval.enabled=false"), backbone=wrapped(),
                            data=user_data())
    with pytest.raises(UserError, match="ThreeLayerNet.*pass it as backbone="):
        ssl_lab.evaluate(run_dir, data=user_data())
    other = ssl_lab.models.from_module(ThreeLayerNet(), layers={"early": "stem", "pooled": "pool"},
                                       input_size=16, in_chans=1)
    with pytest.raises(UserError, match="pass the module the run trained"):
        ssl_lab.export_encoder(run_dir, layer="backbone", backbone=other)


def test_probes_learn_an_easy_task_and_baselines_cover_every_named_layer(tmp_path):
    """Not a benchmark: the probes see exactly the named layers and learn the task."""
    data = user_data()
    run_dir = ssl_lab.train(config(tmp_path, "ssl", "eval.baselines=true"), backbone=wrapped(),
                            data=data)
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report["random_init"]) == set(report["layers"])
    assert report["layers"]["backbone"]["linear_test"] >= 0.9  # bright vs dark


class PilDataset(torch.utils.data.Dataset):
    """PIL images of mixed sizes with int labels, as a torchvision-style dataset yields."""

    def __init__(self, n: int, seed: int):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            h, w = [(20, 24), (30, 30), (17, 40)][i % 3]
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            self.items.append((Image.fromarray(pixels), int(i % 2)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_a_dataset_of_mixed_size_pil_images_trains(tmp_path):
    data = ssl_lab.data.from_dataset(PilDataset(72, 0), PilDataset(12, 1), image_size=16)
    assert data.train.images.shape[1:] == (16, 16, 3)
    run_dir = ssl_lab.train(config(tmp_path, "ssl", "model.backbone=resnet18",
                                   "model.width=0.125", "model.last_width=null",
                                   "eval.enabled=false"), data=data)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] >= 1


def _write_folder(root: Path, labelled: bool, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / (f"c{i % 2}" if labelled else "")
        folder.mkdir(parents=True, exist_ok=True)
        value = rng.integers(0, 100) + (120 if labelled and i % 2 else 0)
        Image.fromarray(np.full((24, 24, 3), value, dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_unlabelled_folder_trains_with_a_labelled_evaluation_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_LAB_CACHE", str(tmp_path / "cache"))
    plain = _write_folder(tmp_path / "plain", labelled=False, n=40, seed=0)
    classes = _write_folder(tmp_path / "classes", labelled=True, n=40, seed=1)
    base = [f"data.name=imagefolder:{plain}", "model.backbone=resnet18", "model.width=0.125",
            "model.last_width=null"]
    with pytest.raises(UserError, match="eval.data"):  # probes need labels: said before training
        ssl_lab.train(config(tmp_path, "refused", *base))
    assert not (tmp_path / "refused").exists()
    run_dir = ssl_lab.train(config(tmp_path, "ssl", *base, f"eval.data=imagefolder:{classes}"))
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["dataset"] == f"imagefolder:{classes}"
    assert report["probe_train_size"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["online_probes"] == {}


FACTORY = '''
import torch
from torch import nn
import ssl_lab
CALLS = []
def make():
    CALLS.append(1)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    return ssl_lab.models.from_module(net, layers={"conv": "0", "backbone": "2"},
                                      input_size=16, in_chans=1)
'''


def test_an_import_path_runs_only_with_the_opt_in(tmp_path, monkeypatch, capsys):
    (tmp_path / "user_nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    npz = tmp_path / "d.npz"
    x, y = arrays(80, 0)
    np.savez(npz, images=x, labels=y)
    args = ["train", "model.backbone=import:user_nets:make", f"data.name=npz:{npz}",
            "eval.enabled=false", "train.epochs=1", *TINY]
    assert main([*args, f"run.dir={tmp_path / 'no'}"]) == 2
    assert "--allow-import" in capsys.readouterr().err
    assert "user_nets" not in sys.modules and not (tmp_path / "no").exists()
    assert main([*args, f"run.dir={tmp_path / 'yes'}", "--allow-import"]) == 0
    assert sys.modules["user_nets"].CALLS == [1]
    # the run directory names the import: reading it back needs the opt-in again
    assert main(["export", str(tmp_path / "yes"), "layer=conv"]) == 2
    assert "--allow-import" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "yes"), "layer=conv", "--allow-import"]) == 0


def test_the_example_script_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["own_backbone.py", "--tiny", "--out", str(tmp_path)])
    monkeypatch.setenv("SSL_LAB_CACHE", str(tmp_path / "cache"))
    runpy.run_path(str(ROOT / "examples" / "own_backbone.py"), run_name="__main__")
    report = json.loads((tmp_path / "ssl" / "eval.json").read_text())
    assert {"stem", "block", "backbone"} <= set(report["layers"])
    assert (tmp_path / "rcdm" / "summary.json").is_file()
