"""Evaluation at any scale: feature files, blocked probes that agree with the in-memory ones,
eval.layers, and the augmented (papers') linear protocol."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_run_overrides

from ssl_lab.config import ModelConfig, load_config
from ssl_lab.data.sources import load_dataset
from ssl_lab.errors import UserError
from ssl_lab.eval import blocked, probes
from ssl_lab.eval import metrics as M
from ssl_lab.eval import run as eval_run
from ssl_lab.eval.augmented import augmented_linear
from ssl_lab.eval.features import FeatureDir, TensorRows
from ssl_lab.models.encoder import Encoder
from ssl_lab.train_loop import train

CPU = torch.device("cpu")


def _blobs(n: int, dim: int, classes: int, sep: float, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=1) * sep
    y = torch.randint(classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def _layer_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """ReLU'd blobs with a dead column, a constant one and duplicated train rows (kNN ties)
    that straddle the 256-row bank blocks."""
    x, y = _blobs(1500, 24, 4, sep=3.0, seed=seed)
    x = torch.relu(x)
    x[:, 5] = 0.0
    x[:, 7] = 2.5
    x[250:262], y[250:262] = x[240:252].clone(), y[240:252].clone()
    return x[:1000], y[:1000], x[1000:1200], y[1000:1200], x[1200:], y[1200:]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    return train(load_config(None, tiny_run_overrides(run, **{"eval.enabled": False})))


# ----------------------------------------------------------------------------- blocked probes
def test_tiny_budget_streams_in_blocks_and_agrees_with_the_in_memory_probes():
    """The same layer probed in RAM and, forced by a tiny budget, block by block from Rows:
    the same L-BFGS iterations and the same neighbours, so the same numbers up to rounding."""
    tr, ytr, va, yva, te, yte = _layer_data()
    args = (TensorRows(tr), ytr, TensorRows(va), yva, TensorRows(te), yte)
    kw = dict(num_classes=4, device=CPU, knn_k=200, knn_temperature=0.1)
    ram = probes.evaluate_layer_rows(*args, budget_bytes=1 << 30, **kw)
    tiny = 1 << 16
    assert probes.block_rows(tiny, tr.shape[1], 4) < len(tr)  # really several blocks
    streamed = probes.evaluate_layer_rows(*args, budget_bytes=tiny, **kw)
    assert (ram.pop("solver"), streamed.pop("solver")) == ("in-memory", "blocked")
    assert ram == M.evaluate_layer(tr, ytr, va, yva, te, yte, num_classes=4)  # RAM = today's
    assert streamed["knn_test"] == ram["knn_test"]
    assert streamed["zero_frac"] == ram["zero_frac"]
    assert streamed["rankme"] == pytest.approx(ram["rankme"], rel=1e-6)
    for key in ("linear_val", "linear_test", "binarized_test"):
        assert streamed[key] == pytest.approx(ram[key], abs=1.5 / len(va)), key
    assert ram["linear_test"] > 0.8  # chance: 0.25


def test_blocked_linear_probe_follows_the_in_memory_weight_decay_path():
    tr, ytr, va, yva, te, yte = _layer_data(seed=1)
    ref = M.linear_probe(tr, ytr, va, yva, te, yte, num_classes=4)
    out = blocked.linear_probe_rows(TensorRows(tr), ytr, TensorRows(va), yva, TensorRows(te), yte,
                                    num_classes=4, block_rows=300, device=CPU)
    assert out["weight_decay"] == ref["weight_decay"]
    assert out["val_by_wd"] == pytest.approx(ref["val_by_wd"], abs=1.5 / len(va))


@pytest.mark.parametrize("rows", [256, 300, 1000])
def test_streamed_pass_equals_the_in_memory_pass(rows):
    """One loss-and-gradient pass over file-sized blocks (row counts that do and do not divide
    into the GEMM chunks) equals the in-memory pass on the same standardised live columns."""
    from ssl_lab.eval.linear import _Dense

    tr, ytr, *_ = _layer_data(seed=2)
    scale = blocked.Standardizer(TensorRows(tr), 256, CPU)
    streamed = blocked._Streamed(TensorRows(tr), ytr, 4, scale, rows)
    dense = _Dense(scale(tr).T.contiguous(), ytr, 4)
    g = torch.Generator().manual_seed(5)
    theta = torch.randn(len(scale.live) + 1, 4, generator=g) * 0.3
    (f_s, g_s), (f_d, g_d) = streamed.loss_grad(theta, 1e-3), dense.loss_grad(theta, 1e-3)
    assert len(scale.live) == tr.shape[1] - 2  # the dead and the constant column are out
    assert f_s == pytest.approx(f_d, rel=1e-6)
    assert torch.allclose(g_s, g_d, rtol=1e-4, atol=1e-6)


def test_cpu_passes_use_cache_sized_blocks_within_the_budget():
    big = 1 << 20
    assert blocked.pass_rows(big, 1024, CPU) * 1024 * 4 == blocked._CPU_PASS_BYTES
    assert blocked.pass_rows(300, 1024, CPU) == 300  # never above the budget's rows
    assert blocked.pass_rows(100, 1 << 20, CPU) == 100
    assert blocked.pass_rows(big, 1 << 20, CPU) == 256  # a very wide layer: the floor
    assert blocked.pass_rows(big, 1024, torch.device("meta")) == big  # accelerators: no cap


@pytest.mark.parametrize("bank_rows", [100, 128, 1000])
def test_blocked_knn_keeps_the_tie_rule_across_bank_blocks(bank_rows):
    """Identical train points tied for the last neighbour slots sit in different bank blocks:
    the lower train index must still win, as in memory and in a brute-force reference. (Bank
    blocks of a few rows would not do: BLAS rounds their similarities differently; the probes
    never use fewer than 256 and Rows.blocks leaves no tiny last block.)"""
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 3, (300, 2), generator=g).float() + 0.5  # 9 distinct points
    train_y = torch.randint(3, (300,), generator=g)
    test = torch.rand(40, 2, generator=g) * 3
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    order = sorted(range(300), key=lambda i: (-float(sims[0, i]), i))  # stable: lower index first
    assert float(sims[0, order[4]]) == float(sims[0, order[5]])  # a tie at k=5 for query 0
    for k in (1, 5, 37):
        preds = []
        for q in range(40):  # brute force from the definition
            top = sorted(range(300), key=lambda i: (-float(sims[q, i]), i))[:k]
            scores = [0.0] * 3
            for i in top:
                scores[int(train_y[i])] += math.exp(float(sims[q, i]) / 0.1)
            preds.append(max(range(3), key=lambda c: (scores[c], -c)))
        truth = torch.tensor(preds)
        out = blocked.knn_rows(TensorRows(train), train_y, TensorRows(test), truth, num_classes=3,
                               k=k, bank_rows=bank_rows, query_rows=16, device=CPU, chunk=5)
        assert out == 1.0
        assert M.knn_classify(train, train_y, test, truth, num_classes=3, k=k) == 1.0


def test_mlp_probe_needs_the_layer_in_ram():
    tr, ytr, va, yva, te, yte = _layer_data()
    args = (TensorRows(tr), ytr, TensorRows(va), yva, TensorRows(te), yte)
    with pytest.raises(UserError, match="eval.ram_budget_mb"):
        probes.evaluate_layer_rows(*args, num_classes=4, budget_bytes=1 << 16, device=CPU,
                                   mlp=True)


# ----------------------------------------------------------------------------- runs
def test_eval_layers_selects_layers_and_rejects_unknown_names(tiny_run):
    report = eval_run.evaluate_run(tiny_run, ["eval.layers=proj1,backbone"])
    assert list(report["layers"]) == ["backbone", "proj1"]  # the encoder's order
    assert list(report["random_init"]) == ["backbone", "proj1"]
    assert report["best_layer"] in ("backbone", "proj1")
    assert report["protocol"]["layers"] == "frozen"
    assert {row["solver"] for row in report["layers"].values()} == {"in-memory"}
    with pytest.raises(UserError, match="unknown layer.*backbon2.*valid layers: stage1, stage2"):
        eval_run.evaluate_run(tiny_run, ["eval.layers=backbone,backbon2"])


def test_a_tiny_ram_budget_gives_the_in_memory_numbers(tiny_run):
    """End to end: the whole evaluation forced through the blocked path agrees with RAM."""
    ram = eval_run.evaluate_run(tiny_run, ["eval.baselines=false", "eval.layers=backbone"])
    tiny = eval_run.evaluate_run(tiny_run, ["eval.baselines=false", "eval.layers=backbone",
                                            "eval.ram_budget_mb=1"])
    a, b = ram["layers"]["backbone"], tiny["layers"]["backbone"]
    assert (a["solver"], b["solver"]) == ("in-memory", "blocked")
    assert b["knn_test"] == a["knn_test"]
    assert b["linear_test"] == pytest.approx(a["linear_test"], abs=0.02)


def _feature_dirs(run) -> list:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".eval-features-"))


def test_feature_files_are_removed_after_a_run_and_after_an_error(tiny_run, monkeypatch):
    seen = []
    real = eval_run.write_features

    def spy(*args, **kwargs):
        rows = real(*args, **kwargs)
        seen.append(rows["train"]["backbone"].path)
        assert seen[-1].is_file()  # the files exist while the probes run
        return rows

    monkeypatch.setattr(eval_run, "write_features", spy)
    eval_run.evaluate_run(tiny_run, ["eval.layers=backbone"])
    assert len(seen) == 2 and not any(p.exists() for p in seen)  # trained + random-init
    assert _feature_dirs(tiny_run) == []

    def boom(*args, **kwargs):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(eval_run.probes, "evaluate_layer_rows", boom)
    with pytest.raises(RuntimeError, match="probe failed"):
        eval_run.evaluate_run(tiny_run, ["eval.layers=backbone", "eval.baselines=false"])
    assert not seen[-1].exists() and _feature_dirs(tiny_run) == []


def test_kept_feature_files_hold_the_features_and_stale_folders_go(tiny_run):
    stale = tiny_run / ".eval-features-999999999-left-by-a-killed-run"
    stale.mkdir()
    eval_run.evaluate_run(tiny_run, ["eval.layers=backbone", "eval.baselines=false",
                                     "eval.keep_features=true", "eval.feature_dtype=float16"])
    assert not stale.exists()
    kept = tiny_run / "features" / "digits" / "trained"
    saved = np.load(kept / "test" / "backbone.npy", mmap_mode="r")
    cfg = load_config(tiny_run / "config.yaml")
    data = eval_run.probe_data(cfg)
    encoder = eval_run.load_encoder(tiny_run)
    ref = eval_run.features_by_split(encoder, data, ["backbone"], 512, CPU, None)
    assert saved.dtype == np.float16 and saved.shape == tuple(ref["test"]["backbone"].shape)
    assert np.array_equal(saved, ref["test"]["backbone"].numpy().astype(np.float16))


def test_feature_dir_context_removes_its_folder(tmp_path):
    with pytest.raises(ValueError), FeatureDir(tmp_path) as fdir:
        writer = fdir.writer("train", "x", 2, 3, "float32")
        writer.write(torch.ones(2, 3))
        rows = writer.finish()
        assert torch.equal(rows.materialize(), torch.ones(2, 3))
        raise ValueError
    assert not rows.path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_file_blocks_are_the_file_rows_and_scratch(tmp_path, dtype):
    """File blocks share one buffer (valid until the next block) and are the rows block() reads;
    a probe may change them in place without touching the file or a caller's tensor."""
    x = torch.randn(1000, 7).relu()
    with FeatureDir(tmp_path) as fdir:
        writer = fdir.writer("train", "x", 1000, 7, dtype)
        writer.write(x[:600])
        writer.write(x[600:])
        rows = writer.finish()
        want = x.half().float() if dtype == "float16" else x
        seen = []
        for start, block in rows.blocks(300):  # 4 near-equal blocks of 250
            assert torch.equal(block, want[start:start + len(block)])
            assert torch.equal(block, rows.block(start, start + len(block)))
            seen.append(block.data_ptr())
            block.fill_(-1.0)  # scratch
        assert len(seen) == 4 and len(set(seen)) == 1  # one buffer for every block
        assert torch.equal(rows.materialize(), want)  # the file is untouched
        binary = [b.clone() for _, b in rows.binarized().blocks(300)]
        assert torch.equal(torch.cat(binary), (want > 0).float())
    tensor = TensorRows(x)
    for _, block in tensor.blocks(300):
        block.fill_(-1.0)
    assert float(x.min()) >= 0  # a tensor's blocks are copies


# ----------------------------------------------------------------------------- augmented
@pytest.fixture
def bright_dark_npz(tmp_path):
    """An easy task: dark vs bright noise images (crops and flips keep the brightness)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    means = np.where(labels, 170, 80)[:, None, None, None]
    images = np.clip(rng.normal(0, 25, (400, 16, 16, 3)) + means, 0, 255).astype(np.uint8)
    path = tmp_path / "bright.npz"
    np.savez(path, images=images, labels=labels.astype(np.int64))
    return path


def test_augmented_protocol_learns_an_easy_task_well_above_chance(bright_dark_npz):
    data = load_dataset(f"npz:{bright_dark_npz}", val_fraction=0.1, seed=0).select_target(None)
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(backbone="resnet18", width=0.125, last_width=None,
                                  stem="cifar", projector="32-16"), 3, 16, [0.5] * 3, [0.25] * 3)
    cfg = load_config(None, ["eval.aug_epochs=3", "eval.aug_batch_size=32", "eval.aug_lr=1.0"])
    out = augmented_linear(encoder, data, cfg, CPU, None)
    assert out["test"] >= 0.9 and out["val"] >= 0.9  # chance: 0.5
    assert out["protocol"] == "augmented" and out["layer"] == "backbone"
    assert out["lr"] == pytest.approx(1.0 * 32 / 256) and out["crop_scale"] == [0.08, 1.0]
    assert augmented_linear(encoder, data, cfg, CPU, None)["test"] == out["test"]  # seeded


def test_augmented_protocol_reaches_eval_json(tiny_run):
    report = eval_run.evaluate_run(tiny_run, ["eval.linear=augmented", "eval.aug_epochs=1",
                                              "eval.aug_layer=proj1", "eval.layers=proj1",
                                              "eval.baselines=false"])
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["augmented"]["layer"] == "proj1" and 0 <= saved["augmented"]["test"] <= 1
    assert saved["protocol"]["augmented"] == "augmented" and saved["protocol"]["layers"] == "frozen"
    assert report["augmented"]["epochs"] == 1
    with pytest.raises(UserError, match="eval.aug_layer='nope'.*valid layers"):
        eval_run.evaluate_run(tiny_run, ["eval.linear=augmented", "eval.aug_layer=nope",
                                         "eval.baselines=false", "eval.layers=proj1"])


def test_summary_carries_the_augmented_result_only_when_it_ran():
    from ssl_lab.train_loop import summary_from_eval

    layer = {"linear_test": 0.8, "linear_val": 0.81, "knn_test": 0.7}
    report = {"layers": {"backbone": layer}, "best_layer": "backbone", "eval_s": 1.0}
    assert "augmented" not in summary_from_eval(report)
    report["augmented"] = {"layer": "backbone", "val": 0.85, "test": 0.84, "epochs": 100,
                           "lr": 0.1, "seconds": 9.0}
    assert summary_from_eval(report)["augmented"] == {"layer": "backbone", "val": 0.85,
                                                      "test": 0.84, "epochs": 100}


@pytest.mark.parametrize("override, message", [("eval.linear=papers", "eval.linear"),
                                               ("eval.feature_dtype=float64", "feature_dtype"),
                                               ("eval.ram_budget_mb=0", "ram_budget_mb")])
def test_bad_eval_settings_fail_with_a_clear_message(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


# ----------------------------------------------------------------------------- benchmark
def test_eval_scale_bench_records_rss_and_time_for_every_size_and_layer_set(tmp_path,
                                                                             monkeypatch):
    """bench/eval_scale.py end to end at toy sizes (the real sizes are run by hand)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    spec = importlib.util.spec_from_file_location("eval_scale", root / "bench" / "eval_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    bench.main(["--sizes", "240,120", "--val", "40", "--test", "60", "--image-size", "8",
                "--work", str(tmp_path / "work"), "--out", str(out), "--train",
                "model.width=0.125", "model.projector=32-16", "model.last_width=null",
                "model.stem=cifar", "optim.batch_size=32", "train.epochs=1", "views.n=2"])
    result = json.loads(out.read_text())
    assert [(r["n_train"], r["eval_layers"]) for r in result["rows"]] == [
        (120, "backbone,proj1"), (120, "all"), (240, "backbone,proj1"), (240, "all")]
    for row in result["rows"]:
        assert row["wall_s"] > 0 and row["peak_rss_mb"] > 100  # torch alone is more
        assert row["peak_rss_mb"] >= row["peak_rss_anon_mb_sampled"] > 0
        expected = ["backbone", "proj1"] if row["eval_layers"] != "all" else \
            ["stage1", "stage2", "stage3", "backbone", "proj1", "proj2"]
        assert list(row["layers"]) == expected
        assert {v["solver"] for v in row["layers"].values()} == {"in-memory"}
    assert result["ratios_largest_over_smallest"]["all"]["size"] == 2.0
    assert not list((tmp_path / "work").glob("*.npz"))  # packed, then removed


def test_eval_profile_cold_prints_the_shares_of_a_cold_eval(tiny_run, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    spec = importlib.util.spec_from_file_location("eval_profile", root / "bench" / "eval_profile.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = sorted(p.name for p in tiny_run.rglob("*"))
    monkeypatch.setattr(sys, "argv", ["eval_profile.py", str(tiny_run), "--cold", "--threads",
                                      "1", "eval.layers=backbone"])
    bench.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): float(line.split("|")[3].strip(" %"))
            for line in out.splitlines() if line.startswith("| ") and "share" not in line}
    assert {"feature extraction", "linear probes (+ binarised, pixels)", "kNN",
            "raw-pixel baseline"} <= set(rows)
    assert all(0 < share <= 100 for share in rows.values())
    assert sorted(p.name for p in tiny_run.rglob("*")) == before  # a copy was evaluated
