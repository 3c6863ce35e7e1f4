"""The user's data: ImageFolder at any size (unlabelled folders, the decode cache, 16-bit PNGs),
STL-10's unlabelled split, and `ssl_lab.data.from_arrays` / `from_dataset`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_lab
from ssl_lab.data import formats, imagefolder
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.pack import pack
from ssl_lab.data.sources import load_dataset
from ssl_lab.data.splits import UNLABELLED
from ssl_lab.data.store import StoreImages
from ssl_lab.errors import UserError

RGB = {"cat": (255, 0, 0), "dog": (0, 255, 0)}


def solid(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def write_classes(root, sizes=((96, 96), (120, 96), (96, 100))):
    for name, rgb in RGB.items():
        for i, size in enumerate(sizes):
            solid(root / name / f"{i}.png", size, rgb)


@pytest.fixture
def decodes(monkeypatch):
    """Counts images decoded (every decode goes through imagefolder.fit_image)."""
    calls = []
    real = imagefolder.fit_image

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(imagefolder, "fit_image", counting)
    return calls


# --- imagefolder --------------------------------------------------------------------------------


def test_imagefolder_full_resolution_and_image_size(tmp_path):
    write_classes(tmp_path / "f")
    d = load_dataset(f"imagefolder:{tmp_path / 'f'}", val_fraction=0.0)
    assert d.train.images.shape[1:] == (96, 96, 3) and d.image_size == 96  # no 64-px cap
    assert len(d.train) + len(d.test) == 6 and d.unlabelled is None and d.has_labels
    small = load_dataset(f"imagefolder:{tmp_path / 'f'}", val_fraction=0.0, image_size=32)
    assert small.train.images.shape[1:] == (32, 32, 3)
    colours = np.array(list(RGB.values()))
    assert np.array_equal(small.train.images[:, 16, 16], colours[small.train.labels])
    with pytest.raises(UserError, match="data.image_size=5000"):
        load_dataset(f"imagefolder:{tmp_path / 'f'}", image_size=5000)


def test_unlabelled_folder(tmp_path):
    for i in range(5):
        solid(tmp_path / "u" / f"{i}.png", (30, 40), (10 * i, 0, 0))
    d = load_dataset(f"imagefolder:{tmp_path / 'u'}", val_fraction=0.2)
    assert len(d.train) == len(d.val) == len(d.test) == 0 and not d.has_labels
    assert d.train.images.shape == (0, 30, 30, 3) and d.train.images.dtype == np.uint8
    assert d.train.labels.dtype == np.int64 and d.num_classes == [0]
    assert d.unlabelled.images.shape == (5, 30, 30, 3) and (d.unlabelled.labels == UNLABELLED).all()
    assert d.unlabelled.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40]  # file order
    assert len(d.ssl_train) == 5 and d.in_chans == 3 and d.image_size == 30
    assert len(load_dataset(f"imagefolder:{tmp_path / 'u'}", fraction=0.4).unlabelled) == 2
    # loose images next to class folders: labelled + unlabelled, and a store packs both
    write_classes(tmp_path / "u", sizes=((30, 30),) * 5)
    d = load_dataset(f"imagefolder:{tmp_path / 'u'}", val_fraction=0.0)
    assert (len(d.train), len(d.test), len(d.unlabelled), len(d.ssl_train)) == (8, 2, 5, 13)
    dest, _ = pack(f"imagefolder:{tmp_path / 'u'}", tmp_path / "store", progress=False)
    packed = load_dataset(f"packed:{dest}", val_fraction=0.0)
    assert np.array_equal(np.asarray(packed.unlabelled.images), d.unlabelled.images)


def test_cache_hit_decodes_nothing(tmp_path, decodes):
    write_classes(tmp_path / "f")
    first = load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert len(decodes) == 6 and list((tmp_path / "cache" / "imagefolder").iterdir())
    again = load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert len(decodes) == 6  # read from the store
    assert np.array_equal(first.train.images, again.train.images)
    assert np.array_equal(first.val.labels, again.val.labels)
    solid(tmp_path / "f" / "cat" / "0.png", (96, 96), (1, 2, 3))  # a changed file: new key
    changed = load_dataset(f"imagefolder:{tmp_path / 'f'}", val_fraction=0.0)
    assert len(decodes) == 12 and (1, 2, 3) in {tuple(p) for p in changed.train.images[:, 5, 5]} \
        | {tuple(p) for p in changed.test.images[:, 5, 5]}


def test_unwritable_cache_still_loads(tmp_path, monkeypatch, capsys, decodes):
    write_classes(tmp_path / "f")
    (tmp_path / "blocked").write_text("a file, not a folder")  # unwritable even for root
    monkeypatch.setenv("SSL_LAB_CACHE", str(tmp_path / "blocked"))
    monkeypatch.setattr(imagefolder, "_warned", set())
    for _ in range(2):
        d = load_dataset(f"imagefolder:{tmp_path / 'f'}", val_fraction=0.0)
        assert d.train.images.shape[1:] == (96, 96, 3) and isinstance(d.train.images, np.ndarray)
    assert capsys.readouterr().err.count("cannot write the imagefolder cache") == 1  # once
    assert len(decodes) == 12


def test_16_bit_png_and_small_outliers(tmp_path, capsys, monkeypatch):
    ramp = (np.arange(16 * 16).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    (tmp_path / "g").mkdir()
    Image.fromarray(ramp).save(tmp_path / "g" / "wide.png")
    assert Image.open(tmp_path / "g" / "wide.png").mode == "I;16"
    d = load_dataset(f"imagefolder:{tmp_path / 'g'}")
    assert d.in_chans == 1 and np.array_equal(d.unlabelled.images[0, ..., 0], ramp // 257)
    # one 1x1 image among 16-px ones: upscaled with a warning, not a dataset of 1-px images
    monkeypatch.setattr(imagefolder, "_warned", set())
    for i in range(4):
        solid(tmp_path / "t" / f"{i}.png", (16, 20), (200, 0, 0))
    solid(tmp_path / "t" / "icon.png", (1, 1), (0, 0, 200))
    d = load_dataset(f"imagefolder:{tmp_path / 't'}")
    assert d.image_size == 16 and d.unlabelled.images[-1, 8, 8].tolist() == [0, 0, 200]
    err = capsys.readouterr().err
    assert "icon.png, 1x1" in err and "upscaled to 16x16" in err


def test_decompression_bomb_is_a_user_error(tmp_path, monkeypatch):
    solid(tmp_path / "b" / "huge.png", (20, 20), (1, 1, 1))  # 400 px over a limit of 150
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    with pytest.raises(UserError, match="huge.png"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 > 300: PIL's warning only
    with pytest.raises(UserError, match="huge.png.*too large"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")


# --- STL-10 -------------------------------------------------------------------------------------


def test_stl10_unlabelled_split(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
         for s, n in (("train", 7), ("test", 5), ("unlabeled", 11))}
    x["unlabeled"][4] = 0
    x["unlabeled"][4, 1, 10, 3] = 250  # column-major: green at row 3, column 10
    x["train"][:3] = x["unlabeled"][2:5]  # same bytes as three unlabelled images
    for split, arr in x.items():
        (folder / f"{split}_X.bin").write_bytes(arr.tobytes())
    for split in ("train", "test"):
        (folder / f"{split}_y.bin").write_bytes(bytes(range(1, len(x[split]) + 1)))
    d = load_dataset("stl10", str(tmp_path), val_fraction=0.0)
    assert d.unlabelled.images.shape == (11, 96, 96, 3) and len(d.ssl_train) == 18
    assert (d.unlabelled.labels == UNLABELLED).all() and d.has_labels
    assert isinstance(d.unlabelled.images, np.memmap)  # mapped, not read into RAM
    # oriented exactly as read_stl10 orients the labelled images
    assert np.array_equal(d.unlabelled.images[2:5], d.train.images[:3])
    assert d.unlabelled.images[4, 3, 10].tolist() == [0, 250, 0]
    assert d.unlabelled.images[4].sum() == 250
    ssl = d.ssl_train  # streamed by the loader, never concatenated in RAM
    assert not isinstance(ssl.images, np.ndarray) and ssl.labels.tolist()[7:] == [UNLABELLED] * 11
    loader = BatchLoader(ssl.images, ssl.labels, batch=6, seed=0)
    rows = loader.indices(1).numpy()
    assert torch.equal(loader.fetch(1)[0], torch.from_numpy(np.asarray(ssl.images)[rows]))
    assert np.array_equal(np.asarray(ssl.images)[7 + 4], d.unlabelled.images[4])
    assert len(load_dataset("stl10", str(tmp_path), fraction=0.5).unlabelled) == 6
    labelled = load_dataset("stl10:labelled", str(tmp_path), val_fraction=0.0)
    assert labelled.unlabelled is None and np.array_equal(labelled.train.images, d.train.images)
    (folder / "unlabeled_X.bin").write_bytes(x["unlabeled"].tobytes()[:-1])
    with pytest.raises(UserError, match="unlabeled_X.bin has .* bytes"):
        load_dataset("stl10", str(tmp_path))
    (folder / "unlabeled_X.bin").unlink()
    with pytest.raises(UserError, match="stl10:labelled"):
        load_dataset("stl10", str(tmp_path))
    with pytest.raises(UserError, match="stl10:labelled"):
        load_dataset("stl10:all", str(tmp_path))


def test_stl10_reader_rejects_empty_file(tmp_path):
    (tmp_path / "u.bin").write_bytes(b"")
    with pytest.raises(UserError, match="0 bytes"):
        formats.read_stl10_unlabelled(tmp_path / "u.bin", "fix it")


# --- from_arrays --------------------------------------------------------------------------------


def arrays(n=40, hw=(8, 6), c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *hw, c), dtype=np.uint8), rng.integers(0, 4, n)


def test_from_arrays_labelled_and_unlabelled():
    x, y = arrays()
    d = ssl_lab.data.from_arrays(x, y, x[:10], y[:10], class_names=list("abcd"))
    assert (len(d.train), len(d.val), len(d.test)) == (36, 4, 10) and d.has_labels
    assert d.num_classes == [4] and d.class_names == [list("abcd")] and d.unlabelled is None
    assert d.name.startswith("arrays@") and len(d.name) == len("arrays@") + 12
    assert sorted(np.concatenate([d.train.labels, d.val.labels]).tolist()) == sorted(y.tolist())
    u = ssl_lab.data.from_arrays(x[..., 0])  # (N, H, W) grey, no labels
    assert len(u.train) == 0 and len(u.unlabelled) == 40 and not u.has_labels
    assert u.unlabelled.images.shape == (40, 8, 6, 1) and u.in_chans == 1
    assert len(u.ssl_train) == 40 and u.num_classes == [0]
    f = ssl_lab.data.from_arrays(x / 255.0, y)  # floats in [0, 1]
    assert np.array_equal(np.concatenate([f.train.images, f.val.images]).sum(), x.sum())
    v = ssl_lab.data.from_arrays(x, y, val_images=x[:3], val_labels=y[:3], val_fraction=0.5)
    assert (len(v.train), len(v.val), len(v.test)) == (40, 3, 0) and not v.has_labels


def test_from_arrays_names_are_fingerprints():
    x, y = arrays()
    a = ssl_lab.data.from_arrays(x, y).name
    assert ssl_lab.data.from_arrays(x.copy(), y.copy()).name == a
    x2 = x.copy()
    x2[17, 3, 2, 1] ^= 1
    assert ssl_lab.data.from_arrays(x2, y).name != a
    assert ssl_lab.data.from_arrays(x, (y + 1) % 4).name != a
    assert ssl_lab.data.from_arrays(x).name != a


@pytest.mark.parametrize("kwargs, match", [
    ({"train_images": np.zeros((4, 8, 8, 3), np.int32)}, r"train_images is int32 \(4, 8, 8, 3\)"),
    ({"train_images": np.full((4, 8, 8), 2.0)}, "outside \\[0, 1\\]"),
    ({"train_images": np.zeros((4, 8, 8, 5), np.uint8)}, r"\(4, 8, 8, 5\).*C 1 or 3"),
    ({"train_images": np.zeros((8, 8), np.uint8)}, r"train_images is uint8 \(8, 8\)"),
    ({"train_images": np.zeros((2, 5000, 8), np.uint8)}, "at most 4096"),
    ({"test_images": np.zeros((2, 8, 9, 3), np.uint8), "test_labels": [0, 1]}, "test_images are"),
    ({"test_images": np.zeros((2, 8, 8, 3), np.uint8)}, "test_labels together"),
    ({"train_labels": [0, 1, 2]}, "3 labels for 4 images"),
    ({"train_labels": [0, -1, 2, 3]}, "outside \\[0, 100,000\\)"),
    ({"train_labels": [0.0, 1.0, 2.0, 3.0]}, "integer class indices"),
])
def test_from_arrays_errors(kwargs, match):
    args = {"train_images": np.zeros((4, 8, 8, 3), np.uint8)} | kwargs
    with pytest.raises(UserError, match=match):
        ssl_lab.data.from_arrays(**args)


# --- from_dataset -------------------------------------------------------------------------------


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def pil_items(n=9, labelled=True):
    sizes = [(20, 24), (30, 30), (17, 40)]  # (w, h)
    return [(Image.new("RGB", sizes[i % 3], COLOURS[i % 3]), i % 3 if labelled else None)
            for i in range(n)]


def test_from_dataset_pil_mixed_sizes():
    d = ssl_lab.data.from_dataset(Items(pil_items()), Items(pil_items(3)), image_size=12,
                                  val_fraction=0.0)
    assert d.train.images.shape == (9, 12, 12, 3) and d.test.images.shape == (3, 12, 12, 3)
    assert d.train.labels.tolist() == [0, 1, 2] * 3 and d.num_classes == [3] and d.has_labels
    assert np.array_equal(d.train.images[:, 6, 6], np.array(COLOURS)[d.train.labels])
    auto = ssl_lab.data.from_dataset(Items(pil_items()))  # smallest shorter side: 17
    assert auto.image_size == 17 and (len(auto.train), len(auto.val)) == (8, 1)
    assert auto.name.startswith("dataset@") and auto.name != d.name


def test_from_dataset_tensors_and_unlabelled_items():
    x, y = arrays(n=6, hw=(10, 10))
    chw = [(torch.from_numpy(img).permute(2, 0, 1).float() / 255, torch.tensor(int(lab)))
           for img, lab in zip(x, y, strict=True)]
    d = ssl_lab.data.from_dataset(Items(chw), val_fraction=0.0)
    assert np.array_equal(d.train.images, x) and d.train.labels.tolist() == y.tolist()
    mixed = [(img, None if i % 2 else int(lab)) for i, (img, lab) in enumerate(zip(x, y, strict=True))]
    m = ssl_lab.data.from_dataset(Items(mixed), val_fraction=0.0)
    assert np.array_equal(m.train.images, x[::2]) and np.array_equal(m.unlabelled.images, x[1::2])
    assert (m.unlabelled.labels == UNLABELLED).all() and len(m.ssl_train) == 6
    only = ssl_lab.data.from_dataset(Items([img[..., 0] for img in x]))  # bare grey (H, W)
    assert len(only.train) == 0 and only.unlabelled.images.shape == (6, 10, 10, 1)


def test_from_dataset_store_equals_ram(tmp_path):
    items = Items(pil_items(12) + pil_items(4, labelled=False))
    ram = ssl_lab.data.from_dataset(items, Items(pil_items(3)), image_size=10, seed=3)
    store = ssl_lab.data.from_dataset(items, Items(pil_items(3)), image_size=10, seed=3,
                                      max_ram_mb=0, cache_dir=tmp_path / "c", workers=2)
    assert isinstance(store.train.images, StoreImages) and store.name == ram.name
    for split in ("train", "val", "test", "unlabelled"):
        a, b = getattr(ram, split), getattr(store, split)
        assert np.array_equal(a.images, np.asarray(b.images)) and np.array_equal(a.labels, b.labels)
    assert len(list((tmp_path / "c").iterdir())) == 1
    again = ssl_lab.data.from_dataset(items, Items(pil_items(3)), image_size=10, seed=3,
                                      max_ram_mb=0, cache_dir=tmp_path / "c")
    assert np.array_equal(np.asarray(again.ssl_train.images), np.asarray(store.ssl_train.images))


@pytest.mark.parametrize("item, match", [
    ("not an image", r"train_ds\[1\]: the image is a str"),
    ((np.zeros((2, 4, 4, 3), np.uint8), 0), r"train_ds\[1\]: the image has shape \(2, 4, 4, 3\)"),
    ((np.zeros((4, 4, 3), np.uint8), 1.5), r"train_ds\[1\]: the label is 1.5"),
    ((np.zeros((4, 4, 3), np.uint8), -2), r"train_ds\[1\]: label -2"),
    ((np.zeros((4, 4, 3), np.uint8), 0, "extra"), r"train_ds\[1\] is a tuple of 3"),
    (np.zeros((4, 4, 3), np.int16), r"train_ds\[1\]: the image is int16"),
])
def test_from_dataset_errors(item, match):
    good = (np.zeros((4, 4, 3), np.uint8), 0)
    with pytest.raises(UserError, match=match):
        ssl_lab.data.from_dataset(Items([good, item]))
    with pytest.raises(UserError, match=r"test_ds\[0\] has no label"):
        ssl_lab.data.from_dataset(Items([good]), Items([np.zeros((4, 4, 3), np.uint8)]))
