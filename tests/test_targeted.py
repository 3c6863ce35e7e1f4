"""bench/targeted.py: each run is its frozen study protocol plus train.epochs, seed and run.dir;
the workers split the runs; the tables read small hand-made raw files (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_lab.config_io import flatten, read_yaml, save_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = {"seed", "run.dir", "train.epochs"}


@pytest.fixture
def targeted(bench_script):
    return bench_script("targeted")


def _typed(flat: dict) -> dict:
    """Values with their types: 1 and True, 3 and 3.0 differ."""
    return {key: (type(value).__name__, value) for key, value in flat.items()}


def test_each_run_is_its_frozen_protocol_plus_epochs_seed_and_dir(targeted, tmp_path):
    runs = targeted.all_runs(2)
    assert len(runs) == 12 and [r.seed for r in runs] == sorted(r.seed for r in runs)
    assert {r.protocol for r in runs} == {p for e in targeted.EXPERIMENTS.values()
                                          for p in e.protocols}
    for run in runs:
        cfg = targeted.run_config(run, tmp_path)
        assert (cfg.train.epochs, cfg.seed, cfg.run.dir) == (12, run.seed, str(run.dir(tmp_path)))
        frozen = flatten(read_yaml(targeted.protocol_path(run.protocol)))
        assert frozen["train.epochs"] == 3 and frozen["optim.warmup_epochs"] == 1  # as studied
        resolved = flatten(to_dict(cfg))
        assert _typed({k: v for k, v in resolved.items() if k not in PER_RUN}) == _typed(
            {k: v for k, v in frozen.items() if k not in PER_RUN}), run


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_workers_cover_every_run_exactly_once(targeted, n):
    runs = targeted.all_runs(2)
    shares = [targeted.share(runs, f"{i}/{n}") for i in range(n)]
    together = [r for s in shares for r in s]
    assert sorted(together) == sorted(runs) and len(set(together)) == len(runs)


def test_two_workers_each_get_one_run_of_each_width(targeted):
    for i in range(2):
        names = [r.protocol for r in targeted.share(targeted.all_runs(1), f"{i}/2")]
        assert sum("2048" in p for p in names) == 1 and sum("lw32" in p for p in names) == 1


def test_a_bad_worker_stops(targeted):
    with pytest.raises(SystemExit):
        targeted.share(targeted.all_runs(2), "2/2")


def test_a_run_with_raw_files_is_neither_trained_nor_copied(targeted, tmp_path, monkeypatch):
    run = targeted.Run("simclr", 0)
    keep = run.dir(tmp_path / "raw")
    keep.mkdir(parents=True)
    for name in targeted.FILES:
        (keep / name).write_text("{}")
    monkeypatch.setattr(targeted, "run_config", lambda *a: pytest.fail("looked at the run"))
    targeted.execute(run, tmp_path / "runs", tmp_path / "raw")
    assert not (tmp_path / "runs").exists()


def test_a_finished_run_is_copied_without_training(targeted, tmp_path, monkeypatch):
    monkeypatch.setattr("ssl_lab.train_loop.train", lambda cfg: pytest.fail("trained"))
    run = targeted.Run("simclr-weak", 1)
    run_dir = run.dir(tmp_path / "runs")
    run_dir.mkdir(parents=True)
    save_config(targeted.run_config(run, tmp_path / "runs"), run_dir / "config.yaml")
    (run_dir / "summary.json").write_text('{"epochs": 12.0}')
    (run_dir / "eval.json").write_text('{"best_layer": "backbone"}')
    (run_dir / "env.json").write_text('{"git_revision": "abc"}')
    targeted.execute(run, tmp_path / "runs", tmp_path / "raw")  # run_point: done, skipped
    keep = tmp_path / "raw" / "simclr-weak-e12" / "seed1"
    assert sorted(p.name for p in keep.iterdir()) == sorted(targeted.FILES)
    assert json.loads((keep / "summary.json").read_text()) == {"epochs": 12.0}


def test_an_interrupted_run_is_resumed_then_copied(targeted, tmp_path, monkeypatch):
    run = targeted.Run("supervised-lw32", 0)
    run_dir = run.dir(tmp_path / "runs")
    run_dir.mkdir(parents=True)
    save_config(targeted.run_config(run, tmp_path / "runs"), run_dir / "config.yaml")
    seen = []

    def train(cfg):  # stands in for the rest of the run
        seen.append((cfg.resume, cfg.train.epochs, cfg.seed))
        for name in ("summary.json", "eval.json", "env.json"):
            (run_dir / name).write_text("{}")

    monkeypatch.setattr("ssl_lab.train_loop.train", train)
    targeted.execute(run, tmp_path / "runs", tmp_path / "raw")
    assert seen == [(True, 12, 0)]
    assert all((run.dir(tmp_path / "raw") / name).is_file() for name in targeted.FILES)


# ----------------------------------------------------------------------------- tables


def _report(backbone: float, z: float, zero: float = 0.1, best: str = "backbone") -> dict:
    layer = {"linear_val": 0.5, "knn_test": 0.5, "zero_frac": zero, "binarized_test": 0.5}
    return {"dataset": "fashion-mnist", "best_layer": best,
            "layers": {"stage3": layer | {"linear_test": 0.5},
                       "backbone": layer | {"linear_test": backbone},
                       "proj1": layer | {"linear_test": (backbone + z) / 2},
                       "proj3": layer | {"linear_test": z}}}  # the last layer: z


def _short(studies_raw: Path, protocol: str, reports: list[dict]) -> None:
    """The studies' layout: <protocol>-s<seed>/summary.json and evals/fashion-mnist.json."""
    for seed, report in enumerate(reports):
        run_dir = studies_raw / f"{protocol}-s{seed}"
        (run_dir / "evals").mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
        (run_dir / "evals" / "fashion-mnist.json").write_text(json.dumps(report))


def _long(raw: Path, protocol: str, reports: list[dict]) -> None:
    for seed, report in enumerate(reports):
        keep = raw / f"{protocol}-e12" / f"seed{seed}"
        keep.mkdir(parents=True)
        (keep / "eval.json").write_text(json.dumps(report))


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_guillotine_table_mean_std_and_verdicts(targeted, tmp_path):
    raw, studies = tmp_path / "raw", tmp_path / "studies"
    # 3 epochs: gaps 4, 6 vs 5, 3 -> +1.00 within the stds (1.41); 12 epochs: 8, 10 vs 4, 6
    _short(studies, "simclr", [_report(0.80, 0.76), _report(0.82, 0.76, best="proj1")])
    _short(studies, "simclr-weak", [_report(0.80, 0.75), _report(0.80, 0.77)])
    _short(studies, "simclr-shapes", [_report(0.10, 0.90)])  # "simclr-s*" must not take it
    _long(raw, "simclr", [_report(0.88, 0.80), _report(0.90, 0.80)])
    _long(raw, "simclr-weak", [_report(0.85, 0.81), _report(0.86, 0.80)])
    text = targeted.table(raw, studies, "guillotine-augmentation")
    assert _row(text, "| simclr | 3 |") == ["simclr", "3", "2", "81.00 ± 1.41", "76.00 ± 0.00",
                                            "5.00 ± 1.41", "backbone, proj1"]
    assert _row(text, "| simclr | 12 |")[2:6] == ["2", "89.00 ± 1.41", "80.00 ± 0.00",
                                                  "9.00 ± 1.41"]
    assert _row(text, "| simclr-weak | 12 |")[5] == "5.00 ± 1.41"
    assert _row(text, "| backbone − z: simclr − simclr-weak |")[1:] == [
        "+1.00 (larger std 1.41): within noise", "+4.00 (larger std 1.41): gain"]


def test_zero_fraction_table_loss_and_missing_files(targeted, tmp_path):
    raw, studies = tmp_path / "raw", tmp_path / "studies"
    _short(studies, "simclr-lw32", [_report(0.7, 0.6, zero=z) for z in (0.10, 0.12)])
    _short(studies, "simclr-lw2048", [_report(0.8, 0.7, zero=z) for z in (0.05, 0.07)])
    _long(raw, "simclr-lw32", [_report(0.7, 0.6, zero=0.09)])  # one seed: no verdict
    _long(raw, "simclr-lw2048", [_report(0.8, 0.7, zero=0.2)])
    # supervised-lw2048 seed 0 stopped before its evaluation: that seed is not counted
    (studies / "supervised-lw2048-s0").mkdir()
    (studies / "supervised-lw2048-s0" / "summary.json").write_text('{"dataset": "fashion-mnist"}')
    text = targeted.table(raw, studies, "width-zero-fraction")
    assert _row(text, "| simclr-lw2048 | 3 |")[2:4] == ["2", "6.00 ± 1.41"]
    assert _row(text, "| simclr-lw32 | 12 |")[2:4] == ["1", "9.00"]
    assert _row(text, "| backbone zero frac: simclr-lw2048 − simclr-lw32 |")[1:] == [
        "-5.00 (larger std 1.41): loss", "-"]
    for epochs in (3, 12):
        assert _row(text, f"| supervised-lw2048 | {epochs} |")[2:] == ["0", "-", "-"]
    assert _row(text, "| backbone zero frac: supervised-lw2048 − supervised-lw32 |")[1:] == [
        "-", "-"]


def test_tables_without_any_files_say_dash(targeted, tmp_path):
    text = targeted.tables(tmp_path / "none", tmp_path / "none")
    for name, exp in targeted.EXPERIMENTS.items():
        assert f"### {name}" in text
        for protocol in exp.protocols:
            assert set(_row(text, f"| {protocol} | 12 |")[3:]) == {"-"}
    supervised = targeted.table(tmp_path / "none", tmp_path / "none", "width-supervised-accuracy")
    assert "best layer linear (val-chosen): supervised-lw32 − supervised-lw2048 | - | - |" in supervised


def test_verdict_follows_the_larger_std(targeted):
    assert targeted.verdict([0.10, 0.12], [0.09, 0.11]).endswith("within noise")
    assert targeted.verdict([0.20, 0.20], [0.10, 0.12]).endswith(": gain")  # 9 > 1.41
    assert targeted.verdict([0.10, 0.12], [0.20, 0.20]).endswith(": loss")
    assert targeted.verdict([0.3], [0.1, 0.1]) == "-"  # one seed has no std
