"""Packed stores: exact round trip for every source kind, atomic writes, no-op re-packs, JPEG
stores, damage detection, the `ssl-lab data` commands and training from a store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_run_overrides
from PIL import Image
from safetensors.torch import load_file
from test_data_sources import cifar_record, write_cifar10, write_fashion, write_folder

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.cli import main
from ssl_lab.config import load_config
from ssl_lab.data import pack as pack_mod
from ssl_lab.data.pack import PackOptions, pack
from ssl_lab.data.sources import load_dataset
from ssl_lab.data.store import StoreImages, open_store, verify
from ssl_lab.errors import UserError
from ssl_lab.train_loop import train


def write_cifar100(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", 12), ("test", 4)):
        (folder / f"{split}.bin").write_bytes(b"".join(
            cifar_record([k % 20, k], rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            for k in range(n)))


def write_stl10(folder):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, n in (("train", 5), ("test", 3), ("unlabeled", 4)):
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8)
                                                .tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(bytes(rng.integers(1, 11, n).tolist()))


def write_npz_splits(path):
    rng = np.random.default_rng(4)
    arrays = {f"x_{s}": rng.integers(0, 256, (n, 7, 9), dtype=np.uint8)
              for s, n in (("train", 30), ("val", 6), ("test", 8))}
    arrays |= {f"y_{s}": rng.integers(0, 4, (len(arrays[f"x_{s}"]), 2)) for s in ("train", "val", "test")}
    np.savez(path, **arrays, factor_names=np.array(["a", "b"]))


@pytest.fixture
def sources_on_disk(tmp_path, stripes_npz):
    """(data.name, data.root) of a tiny fake file set for every source kind."""
    write_fashion(tmp_path / "fm")
    write_cifar10(tmp_path / "c10" / "cifar-10-batches-bin")
    write_cifar100(tmp_path / "c100" / "cifar-100-binary")
    write_stl10(tmp_path / "stl" / "stl10_binary")
    write_folder(tmp_path / "folder")
    write_npz_splits(tmp_path / "splits.npz")
    return [("fashion-mnist", str(tmp_path / "fm")), ("cifar10", str(tmp_path / "c10")),
            ("cifar100", str(tmp_path / "c100")), ("stl10", str(tmp_path / "stl")),
            (f"imagefolder:{tmp_path / 'folder'}", None), (f"npz:{stripes_npz}", None),
            (f"npz:{tmp_path / 'splits.npz'}", None), ("digits", None),
            ("shapes:n=60,size=12", None)]


def assert_same_splits(a, b):
    for split in ("train", "val", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert np.array_equal(np.asarray(x.images), np.asarray(y.images)), split
        assert np.array_equal(x.labels, y.labels) and x.labels.dtype == y.labels.dtype, split
    if a.unlabelled is not None or b.unlabelled is not None:  # STL-10's unlabelled images
        assert np.array_equal(np.asarray(a.unlabelled.images), np.asarray(b.unlabelled.images))
        assert np.array_equal(a.unlabelled.labels, b.unlabelled.labels)
    assert (a.factor_names, a.num_classes, a.class_names, a.default_target) == \
        (b.factor_names, b.num_classes, b.class_names, b.default_target)


def test_round_trip_is_exact_for_every_source_kind(tmp_path, sources_on_disk):
    for k, (name, root) in enumerate(sources_on_disk):
        dest = tmp_path / f"store{k}"
        assert pack(name, dest, PackOptions(root=root), progress=False) == (dest, True)
        for kw in ({"val_fraction": 0.2, "seed": 3, "fraction": 0.7}, {"val_fraction": 0.0}):
            direct = load_dataset(name, root, **kw)
            packed = load_dataset(f"packed:{dest}", **kw)
            assert_same_splits(direct, packed)  # val carve and subset included: same run
            assert isinstance(packed.train.images, StoreImages)  # lazy rows, not a RAM copy


def test_store_reads_batches_from_the_memory_map(tmp_path, stripes_npz):
    dest, _ = pack(f"npz:{stripes_npz}", tmp_path / "s", progress=False)
    images = open_store(dest).images("train")
    assert isinstance(images._reader.array, np.memmap)
    full = np.asarray(images)
    rows = np.array([17, 3, 150, 3, 0])
    assert np.array_equal(images[rows], full[rows]) and np.array_equal(images[5:9], full[5:9])
    assert np.array_equal(images[-1], full[-1]) and images[::7].shape == full[::7].shape
    sub = images.select(np.array([4, 2, 9])).select(np.array([2, 0]))
    assert np.array_equal(np.asarray(sub), full[[9, 4]])
    assert torch.equal(sub.fetch(np.array([1]), torch.device("cpu")), torch.from_numpy(full[[4]]))


def test_resolution_crop_and_pad(tmp_path):
    write_folder(tmp_path / "f")  # 24x20 and 40x30 solid-colour PNGs
    for fit in ("crop", "pad"):
        dest, _ = pack(f"imagefolder:{tmp_path / 'f'}", tmp_path / fit,
                       PackOptions(resolution=16, fit=fit), progress=False)
        store = open_store(dest)
        x, y = np.asarray(store.images("train")), store.labels("train")
        assert x.shape[1:] == (16, 16, 3) and store.header["image_shape"] == [16, 16, 3]
        colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]])
        assert np.array_equal(x[:, 8, 8], colours[y])
        border = x[:, 0, 0]  # the pad rows above a landscape image are black
        assert (border == 0).all() if fit == "pad" else np.array_equal(border, colours[y])
    dest, _ = pack("shapes:n=20,size=12", tmp_path / "m", PackOptions(max_side=8), progress=False)
    assert open_store(dest).header["image_shape"] == [8, 8, 3]


def test_jpeg_store(tmp_path, stripes_npz):
    folder = tmp_path / "jpgs" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        smooth = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        Image.fromarray(smooth).save(folder / f"{i}.jpg", quality=95)
    dest, _ = pack(f"imagefolder:{tmp_path / 'jpgs'}", tmp_path / "sj",
                   PackOptions(encoding="jpeg", resolution=16), progress=False)
    store = open_store(dest)
    files = sorted(folder.iterdir())
    blob = np.fromfile(dest / "train.jpeg", np.uint8)
    offsets = np.load(dest / "train.offsets.npy")
    originals = {f.read_bytes() for f in files}
    kept = {blob[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:], strict=True)}
    assert kept <= originals  # right-sized JPEGs are stored as they are, not re-encoded
    decoded = np.asarray(store.images("train"))
    assert decoded.shape == (len(kept), 16, 16, 3)
    # a raw-pixel source re-encoded at quality 90: lossy but close
    dest, _ = pack(f"npz:{stripes_npz}", tmp_path / "sj2", PackOptions(encoding="jpeg"),
                   progress=False)
    raw = load_dataset(f"npz:{stripes_npz}", val_fraction=0.0).train.images.astype(int)
    jpeg = np.asarray(load_dataset(f"packed:{dest}", val_fraction=0.0).train.images).astype(int)
    assert jpeg.shape == raw.shape and np.abs(jpeg - raw).mean() < 12
    assert verify(dest) == []


def test_interrupted_pack_leaves_no_store(tmp_path, stripes_npz, monkeypatch):
    dest = tmp_path / "s"
    real = pack_mod._write_split

    def dies_on_test(tmp, name, *args):
        if name == "test":
            raise KeyboardInterrupt  # Ctrl-C after the train split was written
        return real(tmp, name, *args)

    monkeypatch.setattr(pack_mod, "_write_split", dies_on_test)
    with pytest.raises(KeyboardInterrupt):
        pack(f"npz:{stripes_npz}", dest, progress=False)
    assert not dest.exists() and not list(tmp_path.glob(".s.partial-*"))
    # kill -9 leaves a hidden partial folder: it never opens as a store, the next pack removes it
    stale = tmp_path / ".s.partial-999999999"
    stale.mkdir()
    (stale / "train.images.npy").write_bytes(b"half")
    with pytest.raises(UserError, match="unfinished pack"):
        load_dataset(f"packed:{dest}")
    monkeypatch.setattr(pack_mod, "_write_split", real)
    assert pack(f"npz:{stripes_npz}", dest, progress=False)[1]
    assert not stale.exists() and open_store(dest).header["splits"]["train"]["count"] == 192


def test_repack_is_a_no_op_and_conflicts_are_errors(tmp_path, stripes_npz):
    dest, done = pack(f"npz:{stripes_npz}", tmp_path / "s", progress=False)
    stamp = os.stat(dest / "header.json").st_mtime_ns
    assert pack(f"npz:{stripes_npz}", dest, progress=False) == (dest, False)
    assert os.stat(dest / "header.json").st_mtime_ns == stamp
    with pytest.raises(UserError, match="resolution=the source size"):
        pack(f"npz:{stripes_npz}", dest, PackOptions(resolution=8), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(UserError, match="not a packed store"):
        pack(f"npz:{stripes_npz}", tmp_path / "busy", progress=False)
    with pytest.raises(UserError, match="already a packed store"):
        pack(f"packed:{dest}", tmp_path / "again", progress=False)
    for bad in ({"fit": "stretch"}, {"resolution": 0}, {"resolution": 8, "max_side": 8},
                {"quality": 101}):
        with pytest.raises(UserError):
            PackOptions(**bad)


def test_damaged_store_is_a_clear_error(tmp_path, stripes_npz):
    dest, _ = pack(f"npz:{stripes_npz}", tmp_path / "s", progress=False)
    images = dest / "train.images.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped: only the checksum sees it
    images.write_bytes(bytes(data))
    assert verify(dest) == ["train.images.npy"]
    images.write_bytes(bytes(data[:-5]))
    with pytest.raises(UserError, match="damaged.*train.images.npy"):
        load_dataset(f"packed:{dest}")
    header = json.loads((dest / "header.json").read_text())
    (dest / "header.json").write_text(json.dumps(header | {"version": 99}))
    with pytest.raises(UserError, match="version 99"):
        open_store(dest)


def test_cli_pack_and_info(tmp_path, stripes_npz, capsys):
    dest = tmp_path / "s"
    assert main(["data", "pack", f"npz:{stripes_npz}", str(dest), "resolution=8", "workers=1"]) == 0
    assert "8x8x1 uint8, raw" in capsys.readouterr().out
    assert main(["data", "pack", f"npz:{stripes_npz}", str(dest), "resolution=8"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["data", "info", str(dest), "verify=true"]) == 0
    out = capsys.readouterr().out
    assert "train     192 images" in out and "checksums  ok" in out
    assert main(["data", "pack", f"npz:{stripes_npz}", str(tmp_path / "t"), "size=3"]) == 2
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "unknown pack option 'size'" in err and "is not a packed store" in err


def test_training_from_a_store_equals_training_from_its_source(tmp_path, stripes_npz):
    """Same seed, same batches (streamed from the memory map, prefetched), same views: the final
    weights are bit-identical to the in-memory run's, also with progressive resolution and a
    crash + resume mid-epoch on the store side."""
    dest, _ = pack(f"npz:{stripes_npz}", tmp_path / "s", progress=False)
    extra = {"data.fraction": 1.0, "optim.batch_size": 48, "train.epochs": 3,
             "train.ckpt_every_steps": 2, "views.min_size": 8, "eval.enabled": False}
    train(load_config(None, tiny_run_overrides(tmp_path / "a", **extra,
                                               **{"data.name": f"npz:{stripes_npz}"})))
    crashed = tiny_run_overrides(tmp_path / "b", **extra, **{"data.name": f"packed:{dest}"})
    train(load_config(None, crashed), stop_at_step=5)  # 3 steps per epoch; sizes 8, 16, 16
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    train(load_config(None, [*crashed, "resume=true"]))
    a, b = (load_file(str(ckpt_io.find_checkpoint(tmp_path / r) / ckpt_io.WEIGHTS)) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
