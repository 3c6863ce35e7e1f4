"""Writes that fail half-way (full disk, permissions) keep what was there and say so in one line;
damaged caches are rebuilt, never fatal (the table of damaged inputs: test_damaged_files.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import as_shown, tiny_run_overrides
from PIL import Image

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.cli import main
from ssl_lab.errors import UserError


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """The second checkpoint hits a full disk: one line naming it; the first one survives."""
    run = tmp_path / "r"
    real, calls = ckpt_io._write_bytes, []

    def fills_up(path, data):
        calls.append(path)
        if len(calls) > 3:  # the first checkpoint's weights, state and meta are written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ckpt_io, "_write_bytes", fills_up)
    args = tiny_run_overrides(run, **{"train.epochs": 2, "train.ckpt_every_steps": 4,
                                      "eval.enabled": False})
    assert main(["train", *args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write checkpoint" in line and "step-0000008" in line, line
    assert "No space left on device" in line and "checkpoint, step-0000004, is kept" in line, line
    assert "resume=true" in line
    kept = ckpt_io.find_checkpoint(run)
    assert kept.name == "step-0000004" and ckpt_io.verify(kept)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")] == []


def test_permission_error_writing_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt_io, "_write_bytes", lambda *a: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, os.strerror(errno.EACCES))))
    run = tmp_path / "r"
    args = tiny_run_overrides(run, **{"train.epochs": 1, "eval.enabled": False})
    assert main(["train", *args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoints/step-" in line and "Permission denied" in line, line
    assert not list((run / "checkpoints").iterdir())


def test_unwritable_cache_after_training_keeps_the_results(tmp_path, monkeypatch, capsys):
    """The baseline cache cannot be created (SSL_LAB_CACHE lies under a file): a warning, and
    the run's eval.json and summary.json are written all the same."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SSL_LAB_CACHE", str(tmp_path / "file" / "cache"))
    run = tmp_path / "r"
    assert main(["train", *tiny_run_overrides(run, **{"train.epochs": 1})]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings and all("cannot write the baseline cache" in w for w in warnings), warnings
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_layer"] and (run / "eval.json").is_file()


def test_damaged_imagefolder_cache_is_decoded_again(tmp_path, capsys):
    from ssl_lab.data.sources import load_dataset

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (10, 10), 30 * i + 100 * (c == "b")).save(tmp_path / "imgs" / c / f"{i}.png")
    first = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    (header,) = (tmp_path / "cache" / "imagefolder").glob("*/header.json")
    header.write_text('{"format": "ssl-lab-store", "version": 1}')  # keys missing
    capsys.readouterr()
    again = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged imagefolder cache" in err[0] and "decoding" in err[0], err
    assert np.array_equal(np.asarray(first.train.images), np.asarray(again.train.images))
    assert json.loads(header.read_text())["splits"]  # written again whole


def test_damaged_jpeg_in_a_store_names_the_image(tmp_path):
    from ssl_lab.data.store import open_store

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", images=rng.integers(0, 256, (20, 16, 16), dtype=np.uint8),
             labels=np.arange(20) % 2)
    assert main(["data", "pack", f"npz:{tmp_path / 's.npz'}", str(tmp_path / "st"),
                 "encoding=jpeg"]) == 0
    blobs = tmp_path / "st" / "train.jpeg"
    raw = bytearray(blobs.read_bytes())
    raw[:64] = bytes(64)  # the first image's header, same file size
    blobs.write_bytes(bytes(raw))
    images = open_store(tmp_path / "st").images("train")
    with pytest.raises(UserError, match="image 0 of .*train.jpeg is damaged"):
        images[np.arange(2)]
    offsets = tmp_path / "st" / "train.offsets.npy"
    np.save(offsets, np.load(offsets)[::-1].copy())  # same size, no longer an index
    with pytest.raises(UserError, match="train.offsets.npy is damaged"):
        open_store(tmp_path / "st").images("train")


def test_full_disk_writing_summary_json_is_one_line(tmp_path, monkeypatch, capsys):
    import ssl_lab.rundir as rundir_mod

    real = rundir_mod.write_text_atomic

    def full(path, text):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, text)

    monkeypatch.setattr(rundir_mod, "write_text_atomic", full)
    run = tmp_path / "r"
    assert main(["train", *tiny_run_overrides(run, **{"train.epochs": 1, "eval.enabled": False})]) == 2
    line = as_shown(capsys.readouterr().err).splitlines()[-1]
    assert line == f"ssl-lab: error: cannot write {run / 'summary.json'}: No space left on device; " \
        "free disk space", line
    assert ckpt_io.find_checkpoint(run) is not None  # the training itself is kept


@pytest.mark.parametrize("label", [2_000_000_000, -3])
def test_from_arrays_bounds_the_number_of_classes(label):
    from ssl_lab.data import from_arrays

    with pytest.raises(UserError, match=r"train_labels has labels outside \[0, 100,000\)"):
        from_arrays(np.zeros((12, 8, 8), np.uint8), np.where(np.arange(12) % 2 > 0, label, 0))
