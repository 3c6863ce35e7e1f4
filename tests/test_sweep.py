"""`ssl-lab sweep`: grid expansion, validation before running, skip/resume, table and plots."""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from ssl_lab import sweep
from ssl_lab.config_io import save_config
from ssl_lab.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-lab")
    sweep.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_grid_expansion_names_and_bad_grids():
    fixed, grid = sweep.parse_grid([
        "seed=[0,1]", "model.projector=[512-128, 64n-64]", "x=[[1,2],[3]]",
        'run.name="a,b"', "optim.lr=0.1", "data.name=[npz:/tmp/a b.npz,digits]"])
    assert fixed == {"run.name": "a,b", "optim.lr": 0.1}
    assert grid["model.projector"] == ["512-128", "64n-64"] and grid["x"] == [[1, 2], [3]]
    points = sweep.Sweep({}, None, fixed, grid).points()
    assert len(points) == 2 * 2 * 2 * 2
    assert points[0] == {"seed": 0, "model.projector": "512-128", "x": [1, 2],
                         "data.name": "npz:/tmp/a b.npz"}
    assert points[1]["data.name"] == "digits" and points[-1]["seed"] == 1  # first axis slowest
    names = [sweep.point_name(p) for p in points]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._,=+-]+", n) and not n.startswith(".") for n in names)
    assert sweep.point_name({"seed": 1, "model.last_width": 64}) == "seed=1,model.last_width=64"
    assert sweep.point_name({}) == "default"
    for bad in (["seed=[0,0]"], ["seed=[]"], ["run.dir=[a,b]"], ["seed=1", "seed=[2]"]):
        with pytest.raises(UserError):
            sweep.parse_grid(bad)


@pytest.mark.parametrize("bad", ["model.width=[0.5,-1]", "method.name=[simclr,nope]",
                                 "model.projector=[16,16x]", "data.name=[digits,npz:/no/such.npz]",
                                 "model.backbone=[resnet18,resnet9]", "nope.key=[1,2]"])
def test_every_point_is_validated_before_any_runs(tmp_path, bad):
    calls = []
    with pytest.raises(UserError, match="sweep point|nope|no/such"):
        base = [] if bad.startswith("data.name") else ["data.name=digits"]
        sweep.run_sweep(tmp_path / "s", None, [*base, bad],
                        train_fn=lambda cfg: calls.append(cfg))
    assert calls == [] and not (tmp_path / "s").exists()


def _fake_train(calls: list, fail: tuple = ()):
    """Stands for `train`: writes the run files the table reads, with known numbers."""
    def train_fn(cfg):
        run = Path(cfg.run.dir)
        calls.append((run.name, cfg.resume))
        if run.name in fail:
            raise UserError("loss became NaN")
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.yaml")
        acc = 0.5 + cfg.model.last_width / 1000 + cfg.seed / 100
        summary = {"dataset": cfg.data.name, "best_layer": "backbone", "knn_top1": 0.4,
                   "probes": {"stage3": 0.3, "backbone": acc, "proj1": 0.2},
                   "random_init_probes": {"stage3": 0.25, "backbone": 0.1, "proj1": 0.1},
                   "pixel_probe": 0.6, "views_per_s": 100.0, "train_s": 1.0, "wall_s": 2.0}
        (run / "summary.json").write_text(json.dumps(summary))
        return run
    return train_fn


def test_skip_finished_resume_partial_continue_and_assemble(tmp_path):
    out = tmp_path / "s"
    grid = ["model.last_width=[32,64]", "seed=[0,1]", "data.name=digits", "model.width=0.125"]
    calls: list = []
    sweep.run_sweep(out, None, ["model.last_width=[32]", "seed=[0]", *grid[2:]],
                    train_fn=_fake_train(calls))
    assert (out / "model.last_width=32,seed=0" / "summary.json").is_file()
    with pytest.raises(UserError, match="different sweep"):  # another grid in the same place
        sweep.run_sweep(out, None, grid, train_fn=_fake_train(calls))
    (out / "sweep.json").unlink()

    partial = out / "model.last_width=32,seed=1"  # killed mid-training: config + checkpoint
    (partial / "checkpoints" / "step-0000004").mkdir(parents=True)
    (partial / "config.yaml").write_text("{}")
    stale = out / "model.last_width=64,seed=0"  # killed before its config was written
    stale.mkdir()
    (stale / "encoder.json").write_text("{}")
    calls.clear()
    with pytest.raises(UserError, match="1 of 4 sweep points failed"):
        sweep.run_sweep(out, None, grid, train_fn=_fake_train(calls, fail=("model.last_width=64,"
                                                                           "seed=1",)))
    assert calls == [("model.last_width=32,seed=1", True), ("model.last_width=64,seed=0", False),
                     ("model.last_width=64,seed=1", False)]

    calls.clear()  # `out=DIR` alone continues the recorded grid: only the failed point runs
    sweep.run_sweep(out, train_fn=_fake_train(calls))
    assert calls == [("model.last_width=64,seed=1", False)]

    rows = _csv(out / "sweep.csv")
    assert [r["point"] for r in rows] == [f"model.last_width={w},seed={s}" for w in (32, 64)
                                          for s in (0, 1)]
    assert {r["status"] for r in rows} == {"done"}
    assert float(rows[3]["best_linear"]) == pytest.approx(0.5 + 0.064 + 0.01)
    assert rows[3]["random_init_best"] == "0.25" and rows[0]["probe/proj1"] == "0.2"
    for column in ("model.last_width", "seed", "best_layer", "knn_top1", "pixel_probe",
                   "views_per_s", "wall_s", "probe/stage3", "probe/backbone"):
        assert column in rows[0], column
    md = (out / "sweep.md").read_text()
    assert "4 of 4 points finished" in md and "| 56.40 |" in md  # 0.5 + 0.064 at seed 0
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"best_linear_vs_model.last_width.png", "knn_top1_vs_model.last_width.png",
            "probes_vs_model.last_width.png", "wall_s_vs_model.last_width.png"} <= plots
    assert not any("_vs_seed" in p for p in plots)  # seeds are averaged over, not plotted


def test_real_tiny_sweep_from_the_command_line(tmp_path, stripes_npz):
    out = tmp_path / "s"
    small = {"data.name": f"npz:{stripes_npz}", "data.fraction": 1.0, "train.epochs": 1}
    base = [o for o in tiny_run_overrides(tmp_path / "unused", **small)
            if not o.startswith("run.dir")]
    ns = _parser().parse_args(["sweep", "optim.lr=[0.001,0.002]", *base, f"out={out}"])
    ns.func(ns)
    rows = _csv(out / "sweep.csv")
    assert [r["optim.lr"] for r in rows] == ["0.001", "0.002"]
    for row in rows:
        assert row["status"] == "done" and row["best_layer"] in {"stage1", "stage2", "stage3",
                                                                 "backbone", "proj1", "proj2"}
        assert 0 < float(row["best_linear"]) <= 1 and 0 < float(row["pixel_probe"]) <= 1
        assert float(row["random_init_best"]) > 0 and float(row["views_per_s"]) > 0
    assert (out / "optim.lr=0.001" / "checkpoints" / "latest").is_file()
    assert (out / "plots" / "probes_vs_optim.lr.png").stat().st_size > 1000

    # a plain directory of runs (no sweep.json): the axis is the key whose values differ
    (out / "sweep.json").unlink()
    (out / "sweep.csv").unlink()
    ns = _parser().parse_args(["sweep", f"out={out}", "run=false"])
    ns.func(ns)
    assert [r["optim.lr"] for r in _csv(out / "sweep.csv")] == ["0.001", "0.002"]
