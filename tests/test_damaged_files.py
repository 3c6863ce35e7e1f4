"""Files a user or a crash can damage, and OS errors: each ends with one line naming the file (or
path) and the cause, exit 2, nothing new written; caches are recomputed, never fatal.

One tiny run and one tiny store are made per module; each case damages its own copy. Writes that
fail half-way and caches that are rebuilt: tests/test_damaged_writes.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_shown, tiny_run_overrides
from PIL import Image

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.cli import main
from ssl_lab.data import pack as pack_mod
from ssl_lab.data import store as store_mod
from ssl_lab.errors import UserError
from ssl_lab.export import load_exported

RUN, STORE = "run", "store"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny trained run (evaluated: summary.json, eval.json, baseline cache) and a packed store."""
    root = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_LAB_CACHE", str(root / "cache"))
        assert main(["train", *tiny_run_overrides(root / RUN, **{"train.epochs": 1})]) == 0
        rng = np.random.default_rng(0)
        np.savez(root / "small.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
                 labels=rng.integers(0, 3, 40))
        assert main(["data", "pack", f"npz:{root / 'small.npz'}", str(root / STORE)]) == 0
    return root


def _json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _copy(made: Path, d: Path, name: str) -> Path:
    shutil.copytree(made / name, d / name)
    return d / name


def _bomb_png(path: Path, side: int = 30000) -> None:
    """An 8x8 PNG whose header (CRC fixed) claims side x side pixels."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _pickled_state(made: Path, d: Path) -> None:
    """A checkpoint whose state.pt (checksums updated) holds an arbitrary pickled object."""
    ckpt = ckpt_io.find_checkpoint(_copy(made, d, RUN))
    torch.save({"step": 1, "x": _namespace()}, ckpt / ckpt_io.STATE)
    _json(ckpt / ckpt_io.META, lambda m: m["files"].update({ckpt_io.STATE: {
        "bytes": (ckpt / ckpt_io.STATE).stat().st_size,
        "sha256": ckpt_io.sha256_file(ckpt / ckpt_io.STATE)}}))


def _namespace():
    import argparse

    return argparse.Namespace(a=1)


def _folder_with_bomb(d: Path) -> None:
    for c in ("a", "b"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (12, 12), 40 * i).save(d / "imgs" / c / f"{i}.png")
    _bomb_png(d / "imgs" / "a" / "bomb.png")


def _npz(d: Path, name: str, **arrays) -> None:
    np.savez(d / name, **arrays)


_X = np.zeros((12, 8, 8), np.uint8)
_Y = np.arange(12) % 2


def _read_only(made: Path, d: Path, mp: pytest.MonkeyPatch, folder: Path | None = None) -> None:
    """A folder the process may not write to (root ignores chmod: os.access is what is read)."""
    folder = folder or d / "ro"
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o555)
    real = os.access
    mp.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder and mode & os.W_OK
               else real(p, mode, **kw))


def _rcdm_run(made: Path, d: Path, spec: str = "{}") -> None:
    """An RCDM run as far as `rcdm sample` reads one before its model: config.yaml naming a
    real encoder run, and rcdm.json."""
    (d / "rc").mkdir()
    (d / "rc" / "config.yaml").write_text(f"encoder: {_copy(made, d, RUN)}\n")
    (d / "rc" / "rcdm.json").write_text(spec)


def _raises(exc: OSError):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _tiny_folder(d: Path) -> None:
    """Two classes of two images: the 20% test carve holds none out."""
    for c in ("a", "b"):
        (d / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 90 * i).save(d / "imgs" / c / f"{i}.png")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# under 4096 characters (the config's own bound) but over PATH_MAX less room for the run's files
_LONG = "/".join(["y" * 200] * 19 + ["z" * 150])
_DEEP = "/".join(["w" * 200] * 25)  # 5,000 characters: over PATH_MAX itself


# name -> (class, setup(made, d, monkeypatch), arguments ({d}: the case folder), fragment)
CASES = {
    # 1. run.dir
    "run.dir is a file": ("rundir", lambda m, d, mp: (d / "f").write_text("x"),
                          ["train", "data.name=digits", "run.dir={d}/f"], "is a file"),
    "run.dir under a file": ("rundir", lambda m, d, mp: (d / "f").write_text("x"),
                             ["train", "data.name=digits", "run.dir={d}/f/sub/run"], "lies under"),
    "run.dir name too long": ("rundir", lambda m, d, mp: None,
                              ["train", "data.name=digits", "run.dir={d}/" + "x" * 300],
                              "longer than the file system allows"),
    "run.dir path too long": ("rundir", lambda m, d, mp: None,
                              ["train", "data.name=digits", "run.dir={d}/" + _LONG],
                              "too long a path"),
    "run.dir read-only": ("rundir", _read_only, ["train", "data.name=digits", "run.dir={d}/ro/run"],
                          "not writable"),
    # 2. damaged run files and store headers
    "empty encoder.json": ("run files", lambda m, d, mp: (_copy(m, d, RUN) / "encoder.json")
                           .write_text(""), ["eval", "{d}/run"], "encoder.json is empty"),
    "encoder.json not JSON": ("run files", lambda m, d, mp: (_copy(m, d, RUN) / "encoder.json")
                              .write_text('{"model": {'), ["export", "{d}/run"], "encoder.json"),
    "encoder.json missing a key": ("run files", lambda m, d, mp: _json(
        _copy(m, d, RUN) / "encoder.json", lambda s: s.pop("in_chans")), ["eval", "{d}/run"],
        "'in_chans'"),
    "encoder.json wrong type": ("run files", lambda m, d, mp: _json(
        _copy(m, d, RUN) / "encoder.json", lambda s: s.update(image_size="big")),
        ["export", "{d}/run"], "'image_size'"),
    "encoder.json bad model key": ("run files", lambda m, d, mp: _json(
        _copy(m, d, RUN) / "encoder.json", lambda s: s["model"].update(widht=1)),
        ["eval", "{d}/run"], "model.widht"),
    "truncated summary.json": ("run files", lambda m, d, mp: (_copy(m, d, RUN) / "summary.json")
                               .write_text('{"best_layer": "ba'), ["export", "{d}/run"],
                               "summary.json"),
    "invalid eval.json": ("run files", lambda m, d, mp: [
        (_copy(m, d, RUN) / "summary.json").unlink(), (d / RUN / "eval.json").write_text("[1,")],
        ["export", "{d}/run", "layer=best"], "eval.json"),
    "store header missing keys": ("run files", lambda m, d, mp: _json(
        _copy(m, d, STORE) / "header.json", lambda h: h.pop("splits")),
        ["train", "data.name=packed:{d}/store"], "header.json"),
    "store header wrong types": ("run files", lambda m, d, mp: _json(
        _copy(m, d, STORE) / "header.json", lambda h: h.update(num_classes="3")),
        ["data", "info", "{d}/store"], "header.json"),
    "rcdm.json not JSON": ("run files", lambda m, d, mp: _rcdm_run(m, d, '{"layer": "ba'),
                           ["rcdm", "sample", "{d}/rc"], "rcdm.json is not valid JSON"),
    "sweep.json not JSON": ("run files", lambda m, d, mp: [(d / "sw").mkdir(), (
        d / "sw" / "sweep.json").write_text("[1,")], ["sweep", "out={d}/sw"], "sweep.json is not"),
    "sweep.json missing keys": ("run files", lambda m, d, mp: [(d / "sw").mkdir(), (
        d / "sw" / "sweep.json").write_text('{"base": {}}')], ["sweep", "out={d}/sw"],
        "sweep.json lacks the keys"),
    "truncated summary.json of a sweep point": ("run files", lambda m, d, mp: [
        shutil.copytree(m / RUN, d / "sw" / "p1"), (d / "sw" / "p1" / "summary.json").write_text(
            '{"best')], ["sweep", "out={d}/sw", "run=false"], "p1/summary.json is not valid JSON"),
    "store file name with a folder": ("run files", lambda m, d, mp: _json(
        _copy(m, d, STORE) / "header.json",
        lambda h: h["splits"]["train"]["files"]["labels"].update(name="../../x.npy")),
        ["data", "info", "{d}/store"], "header.json"),
    # 3. allocations sized from input
    "npz label of 2e9": ("sizes", lambda m, d, mp: _npz(d, "big.npz", images=_X, labels=np.where(
        _Y > 0, 2_000_000_000, 0)), ["train", "data.name=npz:{d}/big.npz"], "big.npz"),
    "npz negative label": ("sizes", lambda m, d, mp: _npz(d, "neg.npz", images=_X, labels=-_Y),
                           ["train", "data.name=npz:{d}/neg.npz"], "neg.npz"),
    "npz empty test split": ("sizes", lambda m, d, mp: _npz(
        d, "notest.npz", x_train=_X, y_train=_Y, x_test=_X[:0], y_test=_Y[:0]),
        ["train", "data.name=npz:{d}/notest.npz"], "notest.npz"),
    "PNG claiming 30000x30000": ("sizes", lambda m, d, mp: _folder_with_bomb(d),
                                 ["train", "data.name=imagefolder:{d}/imgs"], "bomb.png"),
    "PNG bomb while packing": ("sizes", lambda m, d, mp: _folder_with_bomb(d),
                               ["data", "pack", "imagefolder:{d}/imgs", "{d}/st"], "bomb.png"),
    "store labels beyond its classes": ("sizes", lambda m, d, mp: _json(
        _copy(m, d, STORE) / "header.json", lambda h: h.update(num_classes=[1])),
        ["train", "data.name=packed:{d}/store"], "num_classes [1]"),
    "image folder too small for a test split": ("sizes", lambda m, d, mp: _tiny_folder(d),
                                                ["train", "data.name=imagefolder:{d}/imgs"],
                                                "it has an empty test split"),
    "PNG bomb as rcdm images=": ("sizes", lambda m, d, mp: [_folder_with_bomb(d), _rcdm_run(m, d)],
                                 ["rcdm", "sample", "{d}/rc", "images={d}/imgs/a/bomb.png"],
                                 "bomb.png is too large to decode safely"),
    "rcdm.json of a huge model": ("sizes", lambda m, d, mp: _rcdm_run(m, d, json.dumps({
        "layer": "backbone", "dataset": "digits", "attention": False, "feature_dim": 8,
        "in_channels": 1, "size": 10**9, "content": 8, "layers_per_block": 1, "norm_groups": 8,
        "channels": [16]})), ["rcdm", "sample", "{d}/rc"], "'size' is 1000000000"),
    "shape.json of a huge model": ("sizes", lambda m, d, mp: [
        (d / "inf").mkdir(), (d / "inf" / "config.yaml").write_text("seed: 0\n"),
        (d / "inf" / "shape.json").write_text("[1, 8, 100000000]")],
        ["infusion", "sample", "{d}/inf"], "shape.json holds [1, 8, 100000000]"),
    # 4. OS errors
    "eval of a read-only run": ("os", lambda m, d, mp: _read_only(m, d, mp, _copy(m, d, RUN)),
                                ["eval", "{d}/run"], "is not writable"),
    "eval.feature_dir read-only": ("os", lambda m, d, mp: [_copy(m, d, RUN), _read_only(m, d, mp)],
                                   ["eval", "{d}/run", "eval.feature_dir={d}/ro/f"],
                                   "eval.feature_dir"),
    "full disk writing features": ("os", lambda m, d, mp: [_copy(m, d, RUN), mp.setattr(
        np.lib.format, "write_array_header_1_0", _no_space)], ["eval", "{d}/run"],
        "cannot write the feature file"),
    "an OS error no command names": ("os", lambda m, d, mp: [_copy(m, d, STORE), mp.setattr(
        store_mod, "describe", _raises(PermissionError(errno.EACCES, "Permission denied",
                                                       "/x/header.json")))],
        ["data", "info", "{d}/store"], "cannot use /x/header.json: Permission denied"),
    "full disk reserving a store": ("os", lambda m, d, mp: [
        _npz(d, "s.npz", images=_X, labels=_Y), mp.setattr(os, "posix_fallocate", _no_space)],
        ["data", "pack", "npz:{d}/s.npz", "{d}/st"], "No space left on device"),
    "full disk writing a store": ("os", lambda m, d, mp: [
        _npz(d, "s.npz", images=_X, labels=_Y), mp.setattr(pack_mod, "_write_raw", _no_space)],
        ["data", "pack", "npz:{d}/s.npz", "{d}/st"], "cannot write the store"),
    "DEST under a file": ("os", lambda m, d, mp: [(d / "f").write_text("x"),
                                                  _npz(d, "s.npz", images=_X, labels=_Y)],
                          ["data", "pack", "npz:{d}/s.npz", "{d}/f/st"], "lies under"),
    **{f"{what} name too long": ("os", lambda m, d, mp: _copy(m, d, RUN), args, fragment)
       for what, args, fragment in (
        ("npz", ["train", "data.name=npz:{d}/" + "n" * 300], "File name too long"),
        ("imagefolder", ["train", "data.name=imagefolder:{d}/" + "i" * 300], "File name too long"),
        ("packed", ["train", "data.name=packed:{d}/" + "p" * 300], "File name too long"),
        ("eval run", ["eval", "{d}/" + "e" * 300], "File name too long"),
        ("export out", ["export", "{d}/run", "layer=backbone", "out={d}/" + "o" * 300],
         "longer than the file system allows"),
        ("rcdm encoder", ["rcdm", "train", "{d}/" + "r" * 300], "File name too long"),
        ("rcdm sample run", ["rcdm", "sample", "{d}/" + _DEEP], "File name too long"),
        ("infusion sample run", ["infusion", "sample", "{d}/" + _DEEP], "File name too long"))},
    # 5. no unpickling, and no advice to unpickle
    "pickled state.pt": ("pickle", lambda m, d, mp: _pickled_state(m, d),
                         ["train", "run.dir={d}/run", "resume=true"], "state.pt"),
    "pickled .pt to import": ("pickle", lambda m, d, mp: torch.save({"x": _namespace()}, d / "w.pt"),
                              ["import", "{d}/w.pt", "{d}/dest"],
                              "w.pt holds objects other than tensors"),
    "junk .pt to import": ("pickle", lambda m, d, mp: (d / "w.pt").write_bytes(b"junk" * 40),
                           ["import", "{d}/w.pt", "{d}/dest"], "it is damaged or not a torch file"),
}
CLASSES = {"rundir", "run files", "sizes", "os", "pickle"}


def _tree(d: Path) -> list:
    return sorted((str(p.relative_to(d)), p.stat().st_size if p.is_file() else -1)
                  for p in d.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_damaged_file_or_os_error_is_one_line_exit_2(case, made, tmp_path, monkeypatch, capsys):
    kind, setup, args, fragment = CASES[case]
    assert kind in CLASSES
    d = tmp_path / "case"
    d.mkdir()
    setup(made, d, monkeypatch)
    before = _tree(d)
    assert main([a.replace("{d}", str(d)) for a in args]) == 2
    err = as_shown(capsys.readouterr().err)
    assert len(err.splitlines()) == 1, err
    line = err
    assert line.startswith("ssl-lab: error: ") and len(line) < 400, err
    assert fragment in line, line
    assert "weights_only" not in err
    assert _tree(d) == before  # nothing new: no run directory, no partial store, no temp file
    assert not (tmp_path / "runs").exists()


def test_damaged_baseline_cache_entry_is_recomputed_with_a_warning(made, tmp_path, monkeypatch,
                                                                   capsys):
    cache = tmp_path / "cache"
    shutil.copytree(made / "cache", cache)
    monkeypatch.setenv("SSL_LAB_CACHE", str(cache))
    entries = sorted((cache / "baselines").glob("*.json"))
    assert len(entries) == 2
    entries[0].write_text(entries[0].read_text()[:40])  # truncated
    entries[1].write_text('{"key": {}, "result": [1]}')  # parses, but no result mapping
    run = _copy(made, tmp_path, RUN)
    (run / "eval.json").unlink()
    assert main(["eval", str(run)]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warnings) == 2 and all("baseline cache entry" in w for w in warnings), warnings
    assert all(any(entry.name in w for w in warnings) for entry in entries), warnings
    report = json.loads((run / "eval.json").read_text())
    assert report["random_init"] and report["pixels"]
    for entry in entries:  # recomputed and written back whole
        assert isinstance(json.loads(entry.read_text())["result"], dict)


def test_damaged_export_json_is_one_line(made, tmp_path):
    run = _copy(made, tmp_path, RUN)
    assert main(["export", str(run), "layer=backbone", f"out={tmp_path / 'ex'}"]) == 0
    meta = tmp_path / "ex" / "export.json"
    good = meta.read_text()
    for damage, fragment in ((lambda m: m["encoder"].pop("mean"), "'mean'"),
                             (lambda m: m.update(layer=["x"]), "layer"),
                             (lambda m: m.update(encoder=[]), "not an encoder spec")):
        meta.write_text(good)
        _json(meta, damage)
        with pytest.raises(UserError, match=fragment) as info:
            load_exported(tmp_path / "ex")
        assert "export.json" in str(info.value) and "\n" not in str(info.value)
    meta.write_text("")
    with pytest.raises(UserError, match="export.json is empty"):
        load_exported(tmp_path / "ex")
