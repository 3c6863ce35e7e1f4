"""The bad-input catalogue: each user mistake ends with one clear line, exit 2, no partial files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from conftest import tiny_run_overrides

from ssl_lab.cli import main


def _idx_images(path, n=4, truncate=False):
    data = struct.pack(">IIII", 2051, n, 28, 28) + bytes(n * 28 * 28)
    path.write_bytes(gzip.compress(data[: len(data) // 2] if truncate else data))


@pytest.fixture
def broken(tmp_path):
    """Files for the data mistakes, in the real formats but wrong."""
    (tmp_path / "fm").mkdir()
    _idx_images(tmp_path / "fm" / "train-images-idx3-ubyte.gz", truncate=True)
    np.savez(tmp_path / "obj.npz", images=np.array([object()] * 4), labels=np.zeros(4))
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 3), np.uint8), labels=np.zeros(4, np.int64))
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "pickle.npz").write_bytes(b"\x80\x04\x95 pickle bytes")
    (tmp_path / "bad.yaml").write_text("optim: {lr: [\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "config.yaml").write_text("seed: 0\n")
    _config_files(tmp_path)
    _fake_runs(tmp_path)
    return tmp_path


def _config_files(d):
    """Config files damaged in the ways a parser can be attacked or a disk can damage them."""
    (d / "latin1.yaml").write_bytes(b"run: {name: caf\xe9}\n")
    lol = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    (d / "bomb.yaml").write_text(lol)
    (d / "huge.yaml").write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    (d / "deep.yaml").write_text("optim: " + "[" * 3000 + "]" * 3000 + "\n")
    (d / "longint.yaml").write_text("seed: " + "7" * 5000 + "\n")
    (d / "nan.yaml").write_text("optim: {lr: .nan}\n")


def _fake_runs(d):
    """Just enough of other commands' runs for their checks (which come before any loading)."""
    (d / "ssl").mkdir()
    (d / "ssl" / "config.yaml").write_text("run: {name: x}\n")
    (d / "ssl" / "encoder.json").write_text("{}")
    inf = d / "inf"
    (inf / "samples" / "n64-chains8-seed0").mkdir(parents=True)
    (inf / "config.yaml").write_text("seed: 0\n")
    (inf / "shape.json").write_text("[1, 8, 8]")
    (inf / "samples" / "n64-chains8-seed0" / "samples.png").write_bytes(b"earlier samples")
    rc = d / "rc"
    (rc / "samples" / "images-k4-steps50-seed0").mkdir(parents=True)
    (rc / "config.yaml").write_text("encoder: /nowhere\n")
    (rc / "rcdm.json").write_text("{}")
    (rc / "samples" / "images-k4-steps50-seed0" / "grid.png").write_bytes(b"earlier samples")
    (d / "rcbad").mkdir()
    (d / "rcbad" / "config.yaml").write_text("train: {lr: -1}\n")
    (d / "rcbad" / "rcdm.json").write_text("{}")
    np.save(d / "empty.npy", np.zeros((0, 8, 8), np.uint8))
    np.savez(d / "tiny.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.arange(3))
    (d / "enc").mkdir()  # an encoder run as far as `rcdm sample images=` reads one
    (d / "enc" / "config.yaml").write_text("seed: 0\n")
    (d / "enc" / "encoder.json").write_text('{"model": {}, "in_chans": 1, "image_size": 8, '
                                            '"mean": [0.5], "std": [0.5], "dataset": "digits"}')
    (d / "rc2").mkdir()
    (d / "rc2" / "config.yaml").write_text(f"encoder: {d / 'enc'}\n")
    (d / "rc2" / "rcdm.json").write_text("{}")


CASES = {
    "unknown key": (["train", "optim.lrr=0.1"], "optim.lrr"),
    "unknown section": (["train", "trainer.epochs=1"], "trainer"),
    "wrong type": (["train", "optim.batch_size=big"], "optim.batch_size"),
    "float for int": (["train", "optim.batch_size=64.5"], "optim.batch_size"),
    "negative lr": (["train", "optim.lr=-0.1"], "optim.lr"),
    "zero batch": (["train", "optim.batch_size=0"], "optim.batch_size"),
    "one view": (["train", "views.n=1"], "views.n"),
    "fraction > 1": (["train", "data.fraction=2"], "data.fraction"),
    "eval fraction 0": (["train", "eval.train_fraction=0"], "eval.train_fraction"),
    "unknown optimizer": (["train", "optim.name=adam"], "optim.name"),
    "unknown method": (["train", "method.name=no_such_method"], "method.name"),
    "unknown dataset": (["train", "data.name=mnist"], "mnist"),
    "unknown recipe": (["train", "data.name=digits", "views.recipe=strong"], "strong"),
    "unknown backbone": (["train", "data.name=digits", "model.backbone=resnet7"], "resnet7"),
    "bad projector spec": (["train", "data.name=digits", "model.projector=12x-4"], "12x-4"),
    "not key=value": (["train", "seed=1", "lr"], "lr"),
    "missing config file": (["train", "{d}/nope.yaml"], "nope.yaml"),
    "invalid yaml": (["train", "{d}/bad.yaml"], "bad.yaml"),
    "truncated idx": (["train", "data.root={d}/fm"], "train-images-idx3-ubyte.gz"),
    "npz of objects": (["train", "data.name=npz:{d}/obj.npz"], "obj.npz"),
    "npz wrong image shape": (["train", "data.name=npz:{d}/shape.npz"], "shape.npz"),
    "empty dataset": (["train", "data.name=npz:{d}/empty.npz"], "empty.npz"),
    "npz too small for a test split": (["train", "data.name=npz:{d}/tiny.npz"],
                                       "tiny.npz: its 3 images are too few to hold out"),
    "truncated npz": (["train", "data.name=npz:{d}/trunc.npz"], "trunc.npz"),
    "pickle disguised as npz": (["train", "data.name=npz:{d}/pickle.npz"], "pickle.npz"),
    "missing npz": (["train", "data.name=npz:{d}/none.npz"], "none.npz"),
    "empty image folder": (["train", "data.name=imagefolder:{d}/emptydir"], "emptydir"),
    "missing image folder": (["train", "data.name=imagefolder:{d}/nodir"], "nodir"),
    "run dir exists": (["train", "data.name=digits", "run.dir={d}/exists"], "resume=true"),
    "resume without run dir": (["train", "resume=true"], "run.dir"),
    "eval of missing run": (["eval", "{d}/nodir"], "nodir"),
    "eval of a non-run folder": (["eval", "{d}/emptydir"], "encoder.json"),
    # --- numeric config values: finite, sign, integer bounds (config.RANGES, one table) ---
    "epochs inf": (["train", "train.epochs=.inf"], "'train.epochs' must be a finite number"),
    "budget nan": (["train", "train.budget_s=.nan"], "'train.budget_s' must be a finite"),
    "lr nan": (["train", "optim.lr=nan"], "'optim.lr' must be a finite number"),
    "weight decay inf": (["train", "optim.weight_decay=inf"], "'optim.weight_decay'"),
    "lr 1e999": (["train", "optim.lr=1e999"], "'optim.lr' must be a finite number"),
    "lr of 400 digits": (["train", "optim.lr=1" + "0" * 400], "'optim.lr' must be a finite"),
    "seed beyond 64 bits": (["train", "seed=100000000000000000000"], "'seed' must be <="),
    "negative seed": (["train", "seed=-1"], "'seed' must be >= 0"),
    "negative threads": (["train", "train.threads=-1"], "'train.threads' must be >= 1"),
    "negative momentum": (["train", "optim.momentum=-0.5"], "'optim.momentum' must be >= 0"),
    "momentum above 1": (["train", "method.momentum=1.5"], "'method.momentum' must be <= 1"),
    "final lr frac -50": (["train", "optim.final_lr_frac=-50"], "'optim.final_lr_frac'"),
    "final lr frac 2": (["train", "optim.final_lr_frac=2"], "'optim.final_lr_frac' must be <= 1"),
    "batch of one": (["train", "optim.batch_size=1"], "'optim.batch_size' must be >= 2"),
    "batch of 10**30": (["train", "optim.batch_size=" + "1" + "0" * 30], "'optim.batch_size'"),
    "64 views max": (["train", "views.n=65"], "'views.n' must be <= 64"),
    "view size 100000": (["train", "views.size=100000"], "'views.size' must be <= 4096"),
    "knn_k 0": (["train", "eval.knn_k=0"], "'eval.knn_k' must be >= 1"),
    "negative vicreg weight": (["train", "method.var_weight=-25"], "'method.var_weight'"),
    "warmup -1": (["train", "optim.warmup_epochs=-1"], "'optim.warmup_epochs' must be >= 0"),
    "nan in a yaml file": (["train", "{d}/nan.yaml"], "'optim.lr' must be a finite number"),
    # --- rules between keys, once the data's size is known (train_setup.build) ---
    "negatives above the batch": (["train", "data.name=digits", "data.fraction=0.05",
                                   "model.width=0.125", "method.negatives=100000"],
                                  "method.negatives=100000 is more than the 256"),
    "negatives above a multi-crop batch": (["train", "data.name=digits", "data.fraction=0.05",
                                            "model.width=0.125", "views.small_n=2",
                                            "method.negatives=400"], "6 views x (batch 65 - 1)"),
    # --- sizes read from text: layer widths and string lengths are bounded too ---
    "projector width 10**30": (["train", "model.projector=" + "1" + "0" * 30],
                               "'model.projector' has a layer of width"),
    "predictor width 10**9": (["train", "method.predictor=1000000000"], "widths must be <="),
    "backbone name of 5000 chars": (["train", "model.backbone=" + "x" * 5000],
                                    "'model.backbone' is 5000 characters long"),
    "rcdm unet of 99999 channels": (["rcdm", "train", "{d}/nodir", "unet.channels=99999-3"],
                                    "'unet.channels' allows at most"),
    "rcdm ema_decay 1": (["rcdm", "train", "{d}/nodir", "train.ema_decay=1"],
                         "'train.ema_decay' must be < 1"),
    "rcdm final_lr_frac -1": (["rcdm", "train", "{d}/nodir", "train.final_lr_frac=-1"],
                              "'train.final_lr_frac' must be >= 0"),
    "infusion val_fraction 0": (["infusion", "train", "data.val_fraction=0"],
                                "σ is chosen on val"),
    # --- config files: encoding, alias bombs, size, nesting, unreadable numbers ---
    "config not utf-8": (["train", "{d}/latin1.yaml"], "latin1.yaml is not UTF-8"),
    "yaml alias bomb": (["train", "{d}/bomb.yaml"], "bomb.yaml uses a YAML alias"),
    "config over 1 MiB": (["train", "{d}/huge.yaml"], "huge.yaml is larger than 1 MiB"),
    "yaml nested 3000 deep": (["train", "{d}/deep.yaml"], "deep.yaml is nested too deeply"),
    "yaml int of 5000 digits": (["train", "{d}/longint.yaml"], "longint.yaml holds a number"),
    "override of 10k chars": (["train", "run.name=[" + "1," * 5000 + "]"], "run.name"),
    "key of 100k chars": (["train", "k" * 100000 + "=1"], "unknown config key 'kkk"),
    "import backbone of 5000 chars": (["import", "{d}/none.pt", "{d}/dest", "backbone=" + "x" * 5000],
                                      "backbone must be one of"),
    "import option of 5000 chars": (["import", "{d}/none.pt", "{d}/dest", "o" * 5000 + "=1"],
                                    "unknown import option 'ooo"),
    # --- rcdm / infusion sample and score options (checked before anything is loaded) ---
    "rcdm sample n=0": (["rcdm", "sample", "{d}/rc", "n=0"], "n must be >= 1"),
    "rcdm sample k=0": (["rcdm", "sample", "{d}/rc", "k=0"], "k must be >= 1"),
    "rcdm sample eta above 1": (["rcdm", "sample", "{d}/rc", "eta=2"], "eta must be <= 1"),
    "rcdm sample seed nan": (["rcdm", "sample", "{d}/rc", "seed=.nan"], "seed"),
    "rcdm sample empty images=": (["rcdm", "sample", "{d}/rc", "images=,"], "images= is empty"),
    "rcdm score huge n": (["rcdm", "score", "{d}/rc", "n=" + "9" * 30], "n must be <="),
    "rcdm sample over earlier samples": (["rcdm", "sample", "{d}/rc", "images={d}/x.png"],
                                         "overwrite=true"),
    "rcdm run with damaged config": (["rcdm", "sample", "{d}/rcbad"], "config.yaml is damaged"),
    "infusion sample n=-5": (["infusion", "sample", "{d}/inf", "n=-5"], "n must be >= 1"),
    "infusion sample chains=0": (["infusion", "sample", "{d}/inf", "chains=0"], "chains must be"),
    "infusion sample seed 2**40": (["infusion", "sample", "{d}/inf", f"seed={2**40}"],
                                   "seed must be <= 4294967295"),
    "infusion sample over earlier samples": (["infusion", "sample", "{d}/inf"], "overwrite=true"),
    "rcdm sample empty .npy": (["rcdm", "sample", "{d}/rc2", "images={d}/empty.npy"],
                               "empty.npy holds no images (shape (0, 8, 8))"),
    "rcdm sample folder of no images": (["rcdm", "sample", "{d}/rc2", "images={d}/emptydir"],
                                        "emptydir holds no image files"),
    "infusion sample of an SSL run": (["infusion", "sample", "{d}/ssl"],
                                      "not an infusion run (it is an SSL run"),
    "infusion train var_scale -1": (["infusion", "train", "infusion.var_scale=-1"],
                                    "'infusion.var_scale' must be >= 0"),
    "infusion sigma grid with inf": (["infusion", "train", "score.sigmas=0.1,inf"],
                                     "finite positive numbers"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_user_mistake_is_one_line_exit_2(case, broken, capsys):
    args, fragment = CASES[case]
    args = [a.replace("{d}", str(broken)) for a in args]
    before = sorted(p.relative_to(broken) for p in broken.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err[:1000]
    assert len(err) < 400, err[:1000]  # never an unbounded echo of the input
    assert fragment in err, err
    assert sorted(p.relative_to(broken) for p in broken.rglob("*")) == before  # nothing written
    assert not (broken / "runs").exists()


def test_layer_out_of_range_for_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run_overrides(run, **{"train.epochs": 1, "eval.enabled": False})]) == 0
    capsys.readouterr()
    from ssl_lab.errors import UserError
    from ssl_lab.models.encoder import load_encoder

    with pytest.raises(UserError, match="proj9"):
        load_encoder(run).features(__import__("torch").zeros(1, 1, 8, 8), ["proj9"])
