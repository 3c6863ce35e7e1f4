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
    return tmp_path


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
    "truncated npz": (["train", "data.name=npz:{d}/trunc.npz"], "trunc.npz"),
    "pickle disguised as npz": (["train", "data.name=npz:{d}/pickle.npz"], "pickle.npz"),
    "missing npz": (["train", "data.name=npz:{d}/none.npz"], "none.npz"),
    "empty image folder": (["train", "data.name=imagefolder:{d}/emptydir"], "emptydir"),
    "missing image folder": (["train", "data.name=imagefolder:{d}/nodir"], "nodir"),
    "run dir exists": (["train", "data.name=digits", "run.dir={d}/exists"], "resume=true"),
    "resume without run dir": (["train", "resume=true"], "run.dir"),
    "eval of missing run": (["eval", "{d}/nodir"], "nodir"),
    "eval of a non-run folder": (["eval", "{d}/emptydir"], "encoder.json"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_user_mistake_is_one_line_exit_2(case, broken, capsys):
    args, fragment = CASES[case]
    args = [a.replace("{d}", str(broken)) for a in args]
    before = sorted(p.relative_to(broken) for p in broken.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
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
