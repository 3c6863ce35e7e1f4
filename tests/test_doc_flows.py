"""Every flow README.md and docs/*.md show, run as shown (tiny sizes) through `ssl_lab.cli.main`,
and the messages around them: the line before an evaluation, Ctrl-C, `eval` of a folder that is
not a run, import bounds, RCDM checks before its run directory exists, `rcdm sample images=`."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import interrupt_trainer_at, tiny_run_overrides
from PIL import Image
from safetensors.torch import save_file
from test_data_sources import write_fashion
from test_export_import import torchvision_resnet

import ssl_lab
from ssl_lab import train_loop
from ssl_lab.cli import main
from ssl_lab.config import load_config
from ssl_lab.data.sources import load_dataset
from ssl_lab.errors import UserError
from ssl_lab.export import load_exported
from ssl_lab.gen import rcdm_train
from ssl_lab.train_setup import view_size

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RCDM = ["unet.size=16", "unet.content=8", "unet.channels=16-32", "data.fraction=0.1", "train.batch_size=32",
        "train.epochs=1", "train.preview=false", "train.ckpt_every_steps=2", "sample.steps=2"]


def tiny(run, **extra) -> list[str]:
    """tests/conftest.py's tiny run, one epoch, no baselines unless a flow needs them."""
    return tiny_run_overrides(run, **{"train.epochs": 1, "eval.baselines": "false", **extra})


def cli(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("ssl-lab: error: "), err
    return err[0]


def eval_notice_first(out: str) -> None:
    """The line before an evaluation says what it computes and how to make it cheaper."""
    notice = next(line for line in out.splitlines() if line.startswith("evaluating:"))
    for words in ("whole labelled train split", "eval.train_fraction", "eval.layers",
                  "eval.baselines=false"):
        assert words in notice, notice
    assert out.index("evaluating:") < out.index("per-layer probes")


# ----------------------------------------------------------------------------- README


def test_train_eval_on_another_dataset_export_and_load(tmp_path, stripes_npz, capsys):
    """README: `train configs/vicreg.yaml ...`, `eval RUN data.name=digits`, `export RUN
    layer=best`, `ssl_lab.export.load_exported(PATH)`."""
    run = tmp_path / "run"
    assert cli("train", CONFIGS / "vicreg.yaml", *tiny(run, **{"data.name": f"npz:{stripes_npz}",
                                                               "optim.batch_size": 32})) == 0
    eval_notice_first(capsys.readouterr().out)
    assert json.loads((run / "summary.json").read_text())["best_layer"]
    assert cli("eval", run, "data.name=digits") == 0
    eval_notice_first(capsys.readouterr().out)
    assert json.loads((run / "evals" / "digits.json").read_text())["dataset"] == "digits"
    assert cli("export", run, "layer=best", f"out={tmp_path / 'exp'}") == 0
    exported = load_exported(tmp_path / "exp")
    with torch.no_grad():
        out = exported(torch.rand(2, exported.in_chans, exported.image_size, exported.image_size))
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_ctrl_c_names_the_run_and_its_resume_command(tmp_path, monkeypatch, capsys):
    """README: `train method.name=simclr method.negatives=1 views.recipe=noise ...`, Ctrl-C,
    then the `train run.dir=X resume=true` the message gives finishes the run."""
    real_step = train_loop.train_step

    def interrupted(s, step, batch):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(s, step, batch)

    monkeypatch.setattr(train_loop, "train_step", interrupted)
    run = tmp_path / "run"
    args = tiny(run, **{"train.epochs": 2, "train.ckpt_every_steps": 2, "eval.enabled": "false"})
    assert cli("train", "method.name=simclr", "method.negatives=1", "views.recipe=noise",
               "views.noise_std=0.2", *args) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssl-lab: interrupted; run directory ") and str(run) in err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert f"{run / 'checkpoints' / latest} (step {int(latest[5:])})" in err
    command = err.split("`")[1]
    assert command == f"ssl-lab train run.dir={run} resume=true"
    monkeypatch.setattr(train_loop, "train_step", real_step)
    assert main(shlex.split(command)[1:]) == 0
    assert (run / "summary.json").is_file()
    capsys.readouterr()
    # interrupted before a run directory exists: nothing to name, nothing written
    monkeypatch.setattr(train_loop, "build", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))
    assert cli("train", *tiny(tmp_path / "never")) == 130
    assert capsys.readouterr().err.strip() == "ssl-lab: interrupted"
    assert not (tmp_path / "never").exists()


def test_views_and_sweep_then_export_a_point(tmp_path, capsys):
    """README: `views views.recipe=byol out=byol.png`, `sweep KEY=[a,b] out=DIR`, `export
    DIR/POINT layer=best`."""
    assert cli("views", "views.recipe=byol", "data.name=digits", "data.fraction=0.2",
               f"out={tmp_path / 'byol.png'}", "rows=4") == 0
    assert Image.open(tmp_path / "byol.png").size[0] > 0
    out = tmp_path / "width"
    args = [a for a in tiny(tmp_path / "unused") if not a.startswith(("run.dir", "model.last"))]
    assert cli("sweep", *args, "model.last_width=[16,24]", f"out={out}") == 0
    assert (out / "sweep.csv").is_file() and (out / "sweep.md").is_file()
    assert cli("export", out / "model.last_width=24", "layer=best") == 0
    assert "load_exported" in capsys.readouterr().out


# ----------------------------------------------------------------------------- docs/data.md


def test_packed_store_trains_and_evaluates_with_the_default_evaluation(tmp_path, capsys):
    """docs/data.md: `data pack SOURCE DEST`, `data info DEST verify=true`, `train
    data.name=packed:DEST` with the default evaluation (raw-pixel and random-init baselines
    read from the store), `eval RUN`; docs/eval.md: `eval RUN data.name=packed:STORE`."""
    store = tmp_path / "store"
    assert cli("data", "pack", "digits", store) == 0
    assert cli("data", "info", store, "verify=true") == 0
    assert "checksums  ok" in capsys.readouterr().out
    run = tmp_path / "run"
    overrides = tiny(run, **{"data.name": f"packed:{store}", "eval.baselines": "true"})
    assert cli("train", *overrides) == 0
    captured = capsys.readouterr()
    eval_notice_first(captured.out)
    # the baseline's progress bars say whose they are (they repeat the trained encoder's)
    assert "random-init features/train" in captured.err and "random-init probes" in captured.err
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < summary["pixel_probe"] <= 1 and summary["random_init_probes"]
    assert cli("eval", run) == 0
    assert cli("eval", run, f"data.name=packed:{store}", "eval.baselines=false") == 0
    assert json.loads((run / "eval.json").read_text())["dataset"] == f"packed:{store}"


def test_a_store_views_its_images_as_its_source_does(tmp_path):
    """docs/data.md: a run on `packed:DEST` is the run on SOURCE, also its default view size
    (Fashion-MNIST's 28-px images are viewed at 20 px); a resized store is viewed at its size."""
    write_fashion(tmp_path / "fm", n_train=30, n_test=10, hw=(28, 28))
    root = tmp_path / "fm"
    assert cli("data", "pack", "fashion-mnist", tmp_path / "same", f"root={root}") == 0
    assert cli("data", "pack", "fashion-mnist", tmp_path / "r16", f"root={root}",
               "resolution=16") == 0
    sizes = {}
    for name, data_root in (("fashion-mnist", str(root)), (f"packed:{tmp_path / 'same'}", None),
                            (f"packed:{tmp_path / 'r16'}", None)):
        cfg = load_config(None, [f"data.name={name}"])
        sizes[name.split("/")[-1]] = view_size(cfg, load_dataset(name, data_root))
    assert sizes == {"fashion-mnist": 20, "same": 20, "r16": 16}


# ----------------------------------------------------------------------------- import + RCDM


def test_import_eval_rcdm_train_resume_sample_score(tmp_path, monkeypatch, capsys):
    """README/docs/rcdm.md: `import SRC DEST image_size=32` (an RGB ResNet, grey data), `eval
    DEST`, `rcdm train DEST layer=backbone run.dir=R`, Ctrl-C and the resume it names, `rcdm
    sample R split=test n= k=`, `rcdm sample R images=a.png,b.png [out=]` (a second call never
    replaces the first one's samples), `rcdm score R`."""
    save_file(torchvision_resnet("resnet18", width=1 / 16), str(tmp_path / "r18.safetensors"))
    imp = tmp_path / "imp"
    assert cli("import", tmp_path / "r18.safetensors", imp, "backbone=resnet18", "width=0.0625",
               "image_size=32", "data.name=digits") == 0
    assert cli("eval", imp, "eval.baselines=false", "eval.train_fraction=0.2") == 0
    real_step = interrupt_trainer_at(monkeypatch, rcdm_train.RCDMTrainer, 3)
    r1 = tmp_path / "r1"
    assert cli("rcdm", "train", imp, "layer=backbone", f"run.dir={r1}", *RCDM) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step-0000002 (step 2)" in err
    assert err.split("`")[1] == f"ssl-lab rcdm train run.dir={r1} resume=true"
    monkeypatch.setattr(rcdm_train.RCDMTrainer, "train_step", real_step)
    assert main(shlex.split(err.split("`")[1])[1:]) == 0
    assert json.loads((r1 / "env.json").read_text())["resumed_at_step"] == 2
    assert cli("rcdm", "sample", r1, "split=test", "n=2", "k=2") == 0
    for name, value in (("a.png", 0), ("b.png", 255), ("c.png", 128)):
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / name)
    ab, ac = (f"images={tmp_path / 'a.png'},{tmp_path / x}" for x in ("b.png", "c.png"))
    capsys.readouterr()
    assert cli("rcdm", "sample", r1, ab, "k=2") == 0
    folder = Path(capsys.readouterr().out.split("grid: ")[1].split()[0]).parent
    first = (folder / "samples.npz").read_bytes()
    assert cli("rcdm", "sample", r1, ac, "k=2") == 2  # other images, same default folder
    assert "overwrite=true" in one_line_error(capsys)
    assert (folder / "samples.npz").read_bytes() == first
    assert cli("rcdm", "sample", r1, ac, "k=2", f"out={tmp_path / 'ac'}") == 0
    arrays = np.load(tmp_path / "ac" / "samples.npz")
    assert arrays["samples"].shape[-1] == 3 == arrays["conditioning"].shape[-1]  # the encoder's
    assert cli("rcdm", "score", r1, "n=3", "k=2") == 0
    assert json.loads((r1 / "score.json").read_text())["retrieval"]["n"] == 3


# ----------------------------------------------------------------------------- messages


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "notarun"
    folder.mkdir()
    (folder / "encoder.json").write_text("{}")
    assert cli("eval", folder) == 2
    line = one_line_error(capsys)
    assert f"{folder} is not a run directory (no config.yaml)" in line and "ssl-lab train" in line
    with pytest.raises(UserError) as info:  # the Python API says the same, before any work
        ssl_lab.evaluate(folder)
    assert f"ssl-lab: error: {info.value}" == line
    assert _files(folder) == {"encoder.json"}


@pytest.mark.parametrize("command", ["rcdm", "infusion"])
def test_sample_help_lists_overwrite(command, capsys):
    """Both sample commands refuse an existing output folder: --help names the way out."""
    with pytest.raises(SystemExit):
        main([command, "sample", "--help"])
    assert "overwrite=true" in capsys.readouterr().out


@pytest.mark.parametrize("option, words", [
    ("image_size=100000", "image_size=100000 is out of range: use an integer in [8, 1024]"),
    ("image_size=" + "9" * 500, "is out of range"),
    ("in_chans=7", "in_chans=7 is not supported: use 3"),
    ("width=8", "does not match the chosen architecture"),  # 2.8 GB: checked before allocating
    ("last_width=65536", "does not match the chosen architecture"),
    ("backbone=[1]", "backbone must be one of"),
])
def test_import_options_are_bounded(tmp_path, capsys, option, words):
    save_file(torchvision_resnet("resnet18", width=1 / 16), str(tmp_path / "r18.safetensors"))
    assert cli("import", tmp_path / "r18.safetensors", tmp_path / "imp", "backbone=resnet18",
               "width=0.0625", option) == 2
    line = one_line_error(capsys)
    assert words in line and len(line) < 700
    assert not (tmp_path / "imp").exists()


def test_rcdm_checks_everything_before_making_its_run_directory(tmp_path, stripes_npz, capsys):
    """An encoder folder without config.yaml, and an encoder run whose data is gone: one line,
    exit 2, and no RCDM run directory (the data used to be read after it was made)."""
    save_file(torchvision_resnet("resnet18", width=1 / 16), str(tmp_path / "r18.safetensors"))
    imp = tmp_path / "imp"
    moved = tmp_path / "gone.npz"
    moved.write_bytes(stripes_npz.read_bytes())
    assert cli("import", tmp_path / "r18.safetensors", imp, "backbone=resnet18", "width=0.0625",
               "image_size=16", f"data.name=npz:{moved}") == 0
    moved.unlink()
    assert cli("rcdm", "train", imp, "layer=backbone", f"run.dir={tmp_path / 'r'}", *RCDM) == 2
    assert str(moved) in one_line_error(capsys)
    (imp / "config.yaml").unlink()
    assert cli("rcdm", "train", imp, "layer=backbone", f"run.dir={tmp_path / 'r'}", *RCDM) == 2
    assert "not an ssl-lab run directory (no config.yaml)" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()

