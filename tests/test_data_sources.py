"""Data sources: tiny fake files in each real on-disk format, plus the real offline datasets."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest

from ssl_lab.data import sources
from ssl_lab.data.shapes import BACKGROUND, COLOURS, SCALE_RANGE, draw
from ssl_lab.data.sources import DatasetSplits, Split, available_datasets, load_dataset
from ssl_lab.errors import UserError

FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
REAL_DOWNLOAD = sources.download_fashion_mnist


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """No test may download or see the user's data: isolate every location."""

    def refuse(dest):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(sources, "download_fashion_mnist", refuse)
    monkeypatch.setattr(sources, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.delenv("SSL_LAB_DATA", raising=False)


# --- writers for the real formats -----------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">i4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(folder: Path, n_train: int = 20, n_test: int = 6, hw=(5, 4)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    data = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
        data[split] = (x, y)
    return data


def images_with_ids(n: int, hw=(6, 6), c: int = 1) -> np.ndarray:
    """Image i has pixel (0, 0, 0) = i, so a split's contents can be read back as ids."""
    x = np.zeros((n, *hw, c), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    return x


def ids(split: Split) -> set[int]:
    return set(split.images[:, 0, 0, 0].tolist())


def cifar_record(labels: list[int], rgb: np.ndarray) -> bytes:
    """labels bytes then the R, G, B planes (rgb is (32, 32, 3))."""
    return bytes(labels) + rgb.transpose(2, 0, 1).tobytes()


def write_cifar10(folder: Path, per_batch: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(
            b"".join(cifar_record([(i + j) % 10], np.zeros((32, 32, 3), np.uint8))
                     for j in range(per_batch)))
    img = np.zeros((32, 32, 3), np.uint8)
    img[2, 5, 1] = 200  # row 2, column 5, green
    (folder / "test_batch.bin").write_bytes(cifar_record([7], img) * 3)


# --- fashion-mnist ------------------------------------------------------------------------------


def test_fashion_idx_round_trip(tmp_path):
    data = write_fashion(tmp_path / "fm")
    d = load_dataset("fashion-mnist", str(tmp_path / "fm"), val_fraction=0.25)
    assert (len(d.train), len(d.val), len(d.test)) == (15, 5, 6)
    assert d.train.images.shape[1:] == (5, 4, 1) and d.train.images.dtype == np.uint8
    assert d.train.labels.dtype == np.int64 and d.test.images.flags.writeable
    x, y = data["test"]
    np.testing.assert_array_equal(d.test.images[..., 0], x)
    np.testing.assert_array_equal(d.test.labels, y)
    assert d.class_names[0][9] == "Ankle boot" and d.num_classes == [10]
    # train + val is exactly the file's training set, nothing lost or duplicated
    both = np.concatenate([d.train.images, d.val.images])[..., 0]
    assert sorted(map(bytes, both)) == sorted(map(bytes, data["train"][0]))


def test_fashion_root_may_be_parent_and_env(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", str(tmp_path)).test) == 6
    monkeypatch.setenv("SSL_LAB_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist").test) == 6


@pytest.mark.parametrize("damage", ["truncate_gz", "bad_magic", "short_payload", "count"])
def test_fashion_corrupt_files_name_the_file(tmp_path, damage):
    write_fashion(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncate_gz":
        target.write_bytes(target.read_bytes()[:-30])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + raw[4:]))
    elif damage == "short_payload":
        target.write_bytes(gzip.compress(raw[:-7]))
    else:  # 19 images against 20 labels
        target = tmp_path / "train-labels-idx1-ubyte.gz"
        labels = np.zeros(19, np.uint8)
        target.write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(UserError, match=target.name):
        load_dataset("fashion-mnist", str(tmp_path))


def test_fashion_missing_everywhere_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(UserError, match="not found in"):  # explicit root: no fallback
        load_dataset("fashion-mnist", str(tmp_path / "empty"))


def test_fashion_downloads_only_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    calls = []

    def fake_download(dest):
        calls.append(dest)
        write_fashion(dest)

    monkeypatch.setattr(sources, "download_fashion_mnist", fake_download)
    assert len(load_dataset("fashion-mnist").test) == 6
    assert len(load_dataset("fashion-mnist").test) == 6  # second time: from the cache
    assert calls == [tmp_path / "cache" / "fashion-mnist"]


def test_fashion_download_writes_complete_files(tmp_path, monkeypatch):
    # A file:// URL exercises the real download code without a network.
    write_fashion(tmp_path / "mirror")
    monkeypatch.setattr(sources, "FASHION_URL", (tmp_path / "mirror").as_uri() + "/")
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setattr(sources, "download_fashion_mnist", REAL_DOWNLOAD)
    assert len(load_dataset("fashion-mnist").test) == 6
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(
        p.name for p in (tmp_path / "mirror").iterdir())  # no .part leftovers


@pytest.mark.skipif(not FASHION_SYSTEM.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    t0 = time.perf_counter()
    d = load_dataset("fashion-mnist", val_fraction=0.1)
    elapsed = time.perf_counter() - t0
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert d.train.images.shape[1:] == (28, 28, 1) and (d.in_chans, d.image_size) == (1, 28)
    assert np.bincount(d.test.labels).tolist() == [1000] * 10
    assert elapsed < 5  # ~0.6 s alone; generous for a shared 2-core machine


# --- digits ------------------------------------------------------------------------------------


def test_digits_real_data_and_fixed_test():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=3)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.train.images.shape[1:] == (8, 8, 1) and a.train.images.max() == 255
    np.testing.assert_array_equal(a.test.images, b.test.images)  # test ignores the run seed
    assert not np.array_equal(a.val.labels, b.val.labels)
    assert np.bincount(a.test.labels).min() >= 30  # stratified: every digit well represented


# --- splits, fractions, targets --------------------------------------------------------------


@pytest.fixture
def npz_100(tmp_path) -> str:
    path = tmp_path / "d.npz"
    np.savez(path, images=images_with_ids(100), labels=np.arange(100) % 4)
    return f"npz:{path}"


def test_val_carve_is_seeded_and_disjoint(npz_100):
    a = load_dataset(npz_100, val_fraction=0.25, seed=0)
    b = load_dataset(npz_100, val_fraction=0.25, seed=0)
    c = load_dataset(npz_100, val_fraction=0.25, seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (60, 20, 20)
    assert ids(a.val) == ids(b.val) and ids(a.val) != ids(c.val)
    assert not ids(a.val) & ids(a.train) and not ids(a.test) & (ids(a.train) | ids(a.val))
    assert ids(a.test) == ids(c.test)
    assert len(load_dataset(npz_100, val_fraction=0.0).val) == 0


def test_fraction_subset_is_stable_and_nested(npz_100):
    full = load_dataset(npz_100, seed=5)
    half = load_dataset(npz_100, seed=5, fraction=0.5)
    quarter = load_dataset(npz_100, seed=5, fraction=0.25)
    assert len(half.train) == 36 and len(quarter.train) == 18
    assert ids(quarter.train) < ids(half.train) < ids(full.train)
    assert ids(half.train) == ids(load_dataset(npz_100, seed=5, fraction=0.5).train)
    assert ids(half.val) == ids(full.val) and ids(half.test) == ids(full.test)


@pytest.mark.parametrize("kw", [{"val_fraction": 1.0}, {"val_fraction": -0.1},
                                {"fraction": 0.0}, {"fraction": 1.5}])
def test_bad_fractions(npz_100, kw):
    with pytest.raises(UserError, match="out of range"):
        load_dataset(npz_100, **kw)


def test_select_target_single_label(npz_100):
    d = load_dataset(npz_100)
    assert d.select_target(None) is d and d.select_target("label") is d
    with pytest.raises(UserError, match="label"):
        d.select_target("colour")


def test_names():
    assert {"fashion-mnist", "digits", "cifar10", "cifar100", "stl10[:labelled]"} <= \
        set(available_datasets())
    assert any(n.startswith("npz:") for n in available_datasets())
    with pytest.raises(UserError, match="fashion-mnist"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="takes no"):
        load_dataset("digits:x")
    with pytest.raises(UserError, match="needs a path"):
        load_dataset("npz")


# --- cifar / stl10 --------------------------------------------------------------------------


def test_cifar10_binary_round_trip(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "cifar-10-batches-bin")
    for root in (tmp_path, tmp_path / "cifar-10-batches-bin"):
        d = load_dataset("cifar10", str(root), val_fraction=0.0)
        assert d.train.images.shape == (10, 32, 32, 3) and d.test.images.shape[0] == 3
        assert d.test.images[0, 2, 5].tolist() == [0, 200, 0]
        assert d.test.images.sum() == 3 * 200 and d.test.labels.tolist() == [7, 7, 7]
        assert sorted(d.train.labels.tolist()) == sorted((i + j) % 10 for i in range(1, 6)
                                                          for j in range(2))
    monkeypatch.setenv("SSL_LAB_DATA", str(tmp_path))
    assert load_dataset("cifar10").class_names[0][7] == "horse"


def test_cifar10_bad_files(tmp_path):
    with pytest.raises(UserError, match="cifar-10-binary.tar.gz"):
        load_dataset("cifar10", str(tmp_path))
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    bad = folder / "data_batch_3.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(UserError, match="data_batch_3.bin"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_two_factors(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    img = np.zeros((32, 32, 3), np.uint8)
    img[31, 0, 2] = 99  # bottom-left, blue
    (folder / "train.bin").write_bytes(b"".join(cifar_record([k % 20, k], img)
                                                for k in range(10)))
    (folder / "test.bin").write_bytes(cifar_record([19, 99], img))
    d = load_dataset("cifar100", str(folder), val_fraction=0.2)
    assert d.factor_names == ["coarse", "fine"] and d.num_classes == [20, 100]
    assert d.test.labels.tolist() == [[19, 99]] and d.test.images[0, 31, 0].tolist() == [0, 0, 99]
    fine = d.select_target(None)
    assert fine.factor_names == ["fine"] and fine.test.labels.tolist() == [99]
    assert fine.num_classes == [100] and fine.train.labels.ndim == 1
    assert d.select_target("coarse").test.labels.tolist() == [19]
    with pytest.raises(UserError, match="coarse, fine"):
        d.select_target("label")
    (folder / "test.bin").write_bytes(cifar_record([19, 100], img))  # fine label out of range
    with pytest.raises(UserError, match=">= 100"):
        load_dataset("cifar100", str(folder))


def test_stl10_column_major(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    n, side = 2, 96
    x = np.zeros((n, 3, side, side), np.uint8)
    # Column-major per channel: byte (c, w, h) is pixel row h, column w.
    x[1, 0, 10, 3] = 250  # red at row 3, column 10
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(x.tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes([1, 10]))
    d = load_dataset("stl10:labelled", str(tmp_path), val_fraction=0.0)
    assert d.test.images.shape == (2, 96, 96, 3) and d.test.labels.tolist() == [0, 9]
    assert d.test.images[1, 3, 10].tolist() == [250, 0, 0] and d.test.images.sum() == 250
    (folder / "test_y.bin").write_bytes(bytes([1]))
    with pytest.raises(UserError, match="test_y.bin"):
        load_dataset("stl10:labelled", str(tmp_path))


# --- imagefolder ----------------------------------------------------------------------------


COLOURS_RGB = {"cat": (255, 0, 0), "dog": (0, 255, 0), "fox": (0, 0, 255)}


def write_folder(root: Path, per_class: int = 5, mode: str = "RGB") -> None:
    from PIL import Image

    for name, rgb in COLOURS_RGB.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (40, 30) if i % 2 else (24, 20)  # (w, h): smallest shorter side is 20
            colour = rgb if mode == "RGB" else rgb.index(255) * 100
            Image.new(mode, size, colour).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("ignored")


def test_imagefolder_carves_test(tmp_path):
    write_folder(tmp_path / "imgs")
    d = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.0)
    assert d.train.images.shape == (12, 20, 20, 3) and len(d.test) == 3
    assert d.class_names == [["cat", "dog", "fox"]] and d.num_classes == [3]
    for split in (d.train, d.test):
        for img, label in zip(split.images, split.labels, strict=True):
            assert tuple(img[10, 10]) == list(COLOURS_RGB.values())[label]
    assert sorted(d.test.labels.tolist()) == [0, 1, 2]  # stratified


def test_imagefolder_split_folders_and_gray(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        write_folder(tmp_path / split, per_class=n, mode="L")
    d = load_dataset(f"imagefolder:{tmp_path}", val_fraction=0.5)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 6, 6)  # own val: no carve
    assert d.in_chans == 1 and d.image_size == 20
    assert d.val.images[d.val.labels == 2][:, 5, 5, 0].tolist() == [200, 200]


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(UserError, match="not a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    write_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(f"imagefolder:{tmp_path / 'imgs'}")


# --- npz ------------------------------------------------------------------------------------


def test_npz_explicit_splits(tmp_path):
    path = tmp_path / "d.npz"
    x = images_with_ids(30, hw=(4, 7), c=3)
    y = np.stack([np.arange(30) % 3, np.arange(30) % 2], axis=1).astype(np.uint8)
    np.savez(path, x_train=x[:20], y_train=y[:20], x_val=x[20:25], y_val=y[20:25],
             x_test=x[25:], y_test=y[25:], factor_names=np.array(["a", "b"]))
    d = load_dataset(f"npz:{path}", val_fraction=0.5)
    assert (len(d.train), len(d.val), len(d.test)) == (20, 5, 5)
    assert ids(d.val) == set(range(20, 25)) and d.train.images.shape[1:] == (4, 7, 3)
    assert d.factor_names == ["a", "b"] and d.num_classes == [3, 2]
    assert d.select_target("b").test.labels.tolist() == [1, 0, 1, 0, 1]
    assert d.train.labels.dtype == np.int64


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.array([object()] * 3), "labels": np.zeros(3)}, "object"),
    ({"images": np.zeros((3, 4, 4, 2), np.uint8), "labels": np.zeros(3, int)}, "shape"),
    ({"images": np.zeros((3, 4, 4), np.float32), "labels": np.zeros(3, int)}, "uint8"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2, int)}, "labels"),
    ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(3)}, "integer"),
    ({"x": np.zeros((3, 4, 4), np.uint8)}, "need keys"),
])
def test_npz_rejects_bad_archives(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=match) as info:
        load_dataset(f"npz:{path}")
    assert "bad.npz" in str(info.value)


def test_npz_missing_or_not_npz(tmp_path):
    with pytest.raises(UserError, match="nope.npz"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(UserError, match="text.npz"):
        load_dataset(f"npz:{tmp_path / 'text.npz'}")


# --- shapes ---------------------------------------------------------------------------------


def test_shapes_deterministic_and_sized():
    a = load_dataset("shapes:n=200,size=24,seed=3", val_fraction=0.1)
    b = load_dataset("shapes:n=200,size=24,seed=3", val_fraction=0.1)
    c = load_dataset("shapes:n=200,size=24,seed=4", val_fraction=0.1)
    assert isinstance(a, DatasetSplits)
    assert (len(a.train), len(a.val), len(a.test)) == (180, 20, 40)
    assert a.train.images.shape[1:] == (24, 24, 3) and a.train.labels.shape == (180, 5)
    assert a.factor_names == ["shape", "colour", "x", "y", "scale"]
    assert a.num_classes == [4, 6, 4, 4, 4] and len(a.class_names) == 5
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.test.images, c.test.images)
    assert a.select_target(None).factor_names == ["shape"]
    with pytest.raises(UserError, match="shapes option"):
        load_dataset("shapes:n=ten")


def test_shapes_labels_match_pixels():
    size = 32
    s = draw(2000, size, np.random.default_rng(0))
    shape, colour, xbin, ybin, sbin = s.labels.T
    fg = (s.images != BACKGROUND).any(axis=-1)
    assert fg.any(axis=(1, 2)).all()  # every image shows its object
    assert (fg[:, [0, -1], :].sum() + fg[:, :, [0, -1]].sum()) == 0  # never touches the border
    # colour: the foreground pixels have exactly the labelled colour
    palette = np.array(list(COLOURS.values()))
    fg_mean = (s.images * fg[..., None]).sum(axis=(1, 2)) / fg.sum(axis=(1, 2))[:, None]
    np.testing.assert_allclose(fg_mean, palette[colour], atol=1e-6)
    # x: every shape is left-right symmetric, so the mask centroid tracks the centre closely
    cols = np.arange(size) + 0.5
    cx = (fg.sum(axis=1) * cols).sum(axis=1) / fg.sum(axis=(1, 2))
    lo, hi = SCALE_RANGE[1] * size + 0.5, size - SCALE_RANGE[1] * size - 0.5
    centroid_bin = np.clip(((cx - lo) / (hi - lo) * 4).astype(int), 0, 3)
    assert (centroid_bin == xbin).mean() > 0.9
    # y and scale: the object moves down / grows as its bin increases
    cy = (fg.sum(axis=2) * cols).sum(axis=1) / fg.sum(axis=(1, 2))
    assert np.all(np.diff([cy[ybin == k].mean() for k in range(4)]) > 3)
    area = fg.sum(axis=(1, 2))
    for k in range(4):
        assert np.all(np.diff([area[(shape == k) & (sbin == b)].mean() for b in range(4)]) > 0)
    assert set(np.unique(shape)) == {0, 1, 2, 3}


def test_shapes_default_size_is_fast():
    t0 = time.perf_counter()
    d = load_dataset("shapes")
    assert len(d.train) + len(d.val) == 20000 and len(d.test) == 4000
    assert time.perf_counter() - t0 < 10  # ~0.4 s alone
