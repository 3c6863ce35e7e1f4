"""bench/studies.py: every run and extra evaluation it defines is a valid config at both scales,
and its tables read finished runs (a hand-made run directory stands in for a trained one)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ssl_lab.config import load_config

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def studies():
    spec = importlib.util.spec_from_file_location("studies", ROOT / "bench" / "studies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["studies"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scale", ["cpu", "gpu"])
def test_every_study_run_is_a_valid_config(studies, scale):
    runs = studies.all_runs(seeds=2)
    assert len({r.name for r in runs}) == len(runs)
    # seed by seed: all seed-0 runs come before any seed-1 run
    seeds = [r.name.rsplit("-s", 1)[1] for r in runs]
    assert seeds == sorted(seeds)
    for run in runs:
        path = ROOT / "configs" / f"{run.config}.yaml"
        cfg = load_config(path, [*studies.SCALES[scale], *run.overrides])
        for extra in run.evals:
            load_config(path, [*studies.SCALES[scale], *run.overrides, *extra])
        assert cfg.seed == int(run.name.rsplit("-s", 1)[1])


def _fake_run(run_dir: Path, seed: int, backbone: float, z: float) -> None:
    layers = {"backbone": backbone, "proj1": z}
    report = {"dataset": "fashion-mnist", "best_layer": "backbone",
              "layers": {k: {"linear_test": v, "knn_test": v - 0.1} for k, v in layers.items()}}
    (run_dir / "evals").mkdir(parents=True)
    (run_dir / "evals" / "fashion-mnist.json").write_text(json.dumps(report))
    (run_dir / "summary.json").write_text(json.dumps({"dataset": "fashion-mnist", "seed": seed}))


def test_per_layer_table_is_mean_and_std_over_seeds(studies, tmp_path):
    _fake_run(tmp_path / "simclr-s0", 0, backbone=0.80, z=0.70)
    _fake_run(tmp_path / "simclr-s1", 1, backbone=0.84, z=0.70)
    fam = studies.load(tmp_path, "simclr", seeds=3)  # seed 2 has not run: 2 seeds
    table = studies.per_layer_table([fam], random_init=False)
    row = table.splitlines()[-1]
    # backbone mean 82.0, sample std 2.8; backbone - z gap 12.0 ± 2.8
    assert row.startswith("| simclr | 2 | 82.0 ± 2.8 | 70.0 ± 0.0 |") and row.endswith("| 12.0 ± 2.8 |")


def test_studies_pin_the_defaults_they_were_run_with(studies):
    """The default lr, eval precision and last_width moved after the studies ran; a config's
    own lr and a run's own last_width win."""
    simclr, mv_barlow = ROOT / "configs" / "simclr.yaml", ROOT / "configs" / "multiview_barlow.yaml"
    cfg = load_config(simclr, studies.pinned_defaults(simclr))
    assert (cfg.optim.lr, cfg.eval.precision, cfg.model.last_width) == (0.002, "train", 512)
    assert studies.pinned_defaults(mv_barlow) == ["eval.precision=train", "model.last_width=512"]
    assert load_config(mv_barlow, studies.pinned_defaults(mv_barlow)).optim.lr == 0.001
    width_run = next(r for r in studies.STUDIES["width"] if r.name == "simclr-lw2048")
    cfg = load_config(simclr, [*studies.pinned_defaults(simclr), *width_run.overrides])
    assert cfg.model.last_width == 2048
    # views at the image size, as the studies ran: 28 px on Fashion-MNIST (whose default view
    # size is now 20), the dataset's own size (views.size=0) elsewhere
    cfg = studies.study_config(width_run, ROOT / "runs" / "unused", ())
    assert (cfg.data.name, cfg.views.size, cfg.model.last_width) == ("fashion-mnist", 28, 2048)
    shapes_runs = [r for runs in studies.STUDIES.values() for r in runs
                   if any(o.startswith("data.name=shapes") for o in r.overrides)]
    assert shapes_runs and all(studies.study_config(r, ROOT / "runs" / "unused", ()).views.size == 0
                               for r in shapes_runs)
