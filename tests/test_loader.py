"""The batch loader: the training loop's historical batches, seeded, sharded per rank, resumable
mid-epoch, the same from RAM, a memory map or a store; and the progressive-resolution schedule."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import tiny_run_overrides

from ssl_lab import dist
from ssl_lab.config import load_config
from ssl_lab.data.loader import BatchLoader
from ssl_lab.data.pack import pack
from ssl_lab.data.progressive import ResolutionSchedule, schedule_from_config
from ssl_lab.data.sources import load_dataset
from ssl_lab.errors import UserError
from ssl_lab.seeding import epoch_permutation
from ssl_lab.train_loop import train

N, BATCH = 50, 8  # 6 steps per epoch; the last 2 samples of each epoch are dropped


@pytest.fixture
def arrays():
    images = np.zeros((N, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(N)  # pixel (0, 0) is the sample id
    return images, np.arange(N) * 10


def ids(batch) -> list[int]:
    return batch[0][:, 0, 0, 0].tolist()


def take(loader: BatchLoader, start: int, stop: int) -> list[list[int]]:
    return [ids(b) for b in loader.batches(start, stop)]


def test_batches_are_the_historical_ones(arrays):
    """What train.py did before the loader: epoch permutation, shard, index."""
    images, labels = arrays
    loader = BatchLoader(images, labels, BATCH, seed=5)
    for step, (x, y) in enumerate(loader.batches(0, 14)):
        epoch, i = divmod(step, 6)
        idx = dist.shard_indices(epoch_permutation(N, 5, epoch), 0, 1, BATCH, i)
        assert ids((x, y)) == idx.tolist() and y.tolist() == (idx * 10).tolist()
    assert loader.steps_per_epoch == 6


def test_seeded_deterministic_and_resumable_mid_epoch(arrays):
    images, labels = arrays
    full = take(BatchLoader(images, labels, BATCH, seed=1), 0, 15)
    assert full == take(BatchLoader(images, labels, BATCH, seed=1), 0, 15)
    assert full != take(BatchLoader(images, labels, BATCH, seed=2), 0, 15)
    assert full[8:] == take(BatchLoader(images, labels, BATCH, seed=1), 8, 15)  # epoch 1, step 2
    for epoch in range(2):  # an epoch never repeats a sample
        seen = sum(full[6 * epoch:6 * epoch + 6], [])
        assert len(set(seen)) == len(seen) == 6 * BATCH


def test_ranks_get_disjoint_shares_of_the_global_batch(arrays):
    images, labels = arrays
    world = take(BatchLoader(images, labels, 2 * BATCH, seed=0), 0, 5)  # one process, batch 16
    ranks = [take(BatchLoader(images, labels, BATCH, seed=0, rank=r, world_size=2), 0, 5)
             for r in range(2)]
    for step in range(5):
        assert ranks[0][step] + ranks[1][step] == world[step]
        assert not set(ranks[0][step]) & set(ranks[1][step])


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_memmap_and_store_stream_the_same_batches(arrays, tmp_path, prefetch):
    images, labels = arrays
    expected = take(BatchLoader(images, labels, BATCH, seed=3), 0, 13)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    np.savez(tmp_path / "d.npz", x_train=images, y_train=labels, x_test=images[:2],
             y_test=labels[:2])
    store, _ = pack(f"npz:{tmp_path / 'd.npz'}", tmp_path / "s", progress=False)
    stored = load_dataset(f"packed:{store}", val_fraction=0.0).train
    for source, lab in ((mapped, labels), (stored.images, stored.labels)):
        loader = BatchLoader(source, lab, BATCH, seed=3, prefetch=prefetch)
        assert loader.streamed
        got = list(loader.batches(0, 13))
        assert [ids(b) for b in got] == expected
        assert all(y.tolist() == [10 * i for i in ids((x, y))] for x, y in got)
        assert all(x.dtype == torch.uint8 and x.is_contiguous() for x, _ in got)


def test_closing_early_stops_the_prefetch_thread(arrays, tmp_path):
    images, labels = arrays
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    before = threading.active_count()
    batches = BatchLoader(mapped, labels, BATCH, seed=0, prefetch=2).batches(0, 100)
    next(batches)
    assert threading.active_count() == before + 1
    batches.close()
    assert threading.active_count() == before


# ----------------------------------------------------------------------------- progressive resolution


def test_progressive_schedule_values():
    s = ResolutionSchedule(low=16, high=32, start=1, end=5, step=8)
    # epoch 2: 16 + 16/4 = 20 -> 24 (half up); 3: 24; 4: 28 -> 32
    assert s.sizes(7) == [16, 16, 24, 24, 32, 32, 32]
    assert ResolutionSchedule(160, 192, 10, 13, 32).sizes(15)[9:] == [160, 160, 160, 192, 192, 192]
    assert ResolutionSchedule(8, 28, 0, 4, 8).sizes(5) == [8, 16, 16, 24, 28]  # capped at high
    assert ResolutionSchedule(16, 32, 2, 2).sizes(4) == [16, 16, 32, 32]  # a step, no ramp
    assert schedule_from_config(0, 32, 0, None, 8, 10) is None
    assert schedule_from_config(32, 32, 0, None, 8, 10) is None
    assert schedule_from_config(16, 32, 0, None, 8, 3).sizes(3) == [16, 24, 32]  # ends last epoch
    for bad in ((40, 32, 0, 1), (0, 32, 0, 1), (8, 32, 3, 1)):
        with pytest.raises(UserError):
            ResolutionSchedule(*bad)


def test_training_ramps_the_view_size(tmp_path, stripes_npz):
    run = tmp_path / "r"
    over = tiny_run_overrides(run, **{
        "data.name": f"npz:{stripes_npz}", "data.fraction": 1.0, "optim.batch_size": 64,
        "train.epochs": 3, "train.log_every_steps": 1, "eval.enabled": False,
        "views.min_size": 8, "views.size_step": 4, "views.small_n": 1})
    train(load_config(None, over))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {int(np.ceil(r["epoch"])) - 1: r["view_size"] for r in rows}
    assert by_epoch == {0: 8, 1: 12, 2: 16}  # 16 px images; the online probes kept training
    assert all(np.isfinite(r["loss"]) and "online/backbone" in r for r in rows)
    assert json.loads((run / "encoder.json").read_text())["image_size"] == 16
    with pytest.raises(UserError, match="needs a ResNet"):
        train(load_config(None, tiny_run_overrides(tmp_path / "v", **{
            "model.backbone": "vit", "views.min_size": 4})))
    with pytest.raises(UserError, match="ramp_end"):
        load_config(None, ["views.ramp_start=3", "views.ramp_end=1"])


@pytest.mark.parametrize("fast", [None, True, False])
def test_views_fast_reaches_the_large_small_and_ramped_views(tmp_path, stripes_npz, fast):
    from ssl_lab.train_setup import build

    s = build(load_config(None, tiny_run_overrides(tmp_path / "r", **{
        "data.name": f"npz:{stripes_npz}", "data.fraction": 1.0, "views.size": 72,
        "views.small_n": 2, "views.min_size": 64, "views.size_step": 8,
        "views.fast": "null" if fast is None else str(fast).lower(),
        "train.epochs": 3})))
    want = fast is not False  # null: fast above 64 px, and 72 px is the run's view size
    kinds = {v.recipe.fast for e in range(3) for v in s.views_at(e)}
    assert kinds == {want} and s.views_at(0)[0].size == 64  # the ramped 64 px keeps the kind


@pytest.mark.parametrize("epochs, touched", [(1.5, 2), (2.1, 2), (2.5, 3)])
def test_fractional_epochs_reach_full_size_in_the_last_epoch_run(tmp_path, stripes_npz, epochs,
                                                                 touched):
    """The ramp ends in the last epoch the run enters: 2.1 epochs of 2 steps round to 4 steps,
    2 epochs, so a ramp planned for a third epoch would never reach the full size."""
    from ssl_lab.train_setup import build

    s = build(load_config(None, tiny_run_overrides(tmp_path / "r", **{
        "data.name": f"npz:{stripes_npz}", "data.fraction": 1.0, "optim.batch_size": 64,
        "train.epochs": epochs, "views.min_size": 8, "views.size_step": 4})))
    assert s.steps_per_epoch == 2 and s.total_steps == round(2 * epochs)
    sizes = s.resolution.sizes(touched)
    assert len(sizes) == touched and sizes[0] == 8 and sizes[-1] == 16
