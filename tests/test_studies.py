"""bench/studies.py: every study run's config is its frozen protocol (bench/study_protocols/)
plus seed and run.dir, each protocol sets every key of today's config schema and holds the
published protocol's values; bench/study_report.py's tables read finished runs (a hand-made run
directory stands in for a trained one)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ssl_lab.config import Config, load_config
from ssl_lab.config_io import all_keys, flatten, read_yaml, to_dict

ROOT = Path(__file__).parents[1]
SCALES = ["cpu", "gpu"]
PER_RUN = {"seed", "run.dir"}
SCHEMA = set(all_keys(Config)) - PER_RUN


@pytest.fixture(scope="module")
def studies():
    spec = importlib.util.spec_from_file_location("studies", ROOT / "bench" / "studies.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["studies"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study_report(studies):
    """bench/study_report.py, which imports its definitions from the `studies` module above."""
    spec = importlib.util.spec_from_file_location("study_report", ROOT / "bench" / "study_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_report"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _frozen(studies, run, scale: str) -> dict:
    return flatten(read_yaml(studies.protocol_path(run, scale)))


def _typed(flat: dict) -> dict:
    """Values with their types: 1 and True, 3 and 3.0 differ."""
    return {key: (type(value).__name__, value) for key, value in flat.items()}


def test_runs_are_distinct_and_ordered_seed_by_seed(studies):
    runs = studies.all_runs(seeds=2)
    assert len({r.dir_name for r in runs}) == len(runs) == 2 * len(studies.protocol_runs())
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # all of seed 0 first


@pytest.mark.parametrize("scale", SCALES)
def test_run_builds_each_config_from_its_frozen_protocol_alone(studies, scale, tmp_path):
    """Key for key, the config `run` trains is the frozen file plus seed and run.dir: a key
    missing from a file, or a default or configs/*.yaml value leaking in, fails here."""
    for run in studies.all_runs(seeds=2):
        cfg = studies.study_config(run, tmp_path, scale)
        assert (cfg.seed, cfg.run.dir) == (run.seed, str(tmp_path / run.dir_name))
        resolved = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in PER_RUN}
        assert _typed(resolved) == _typed(_frozen(studies, run, scale)), run.dir_name
        for extra in run.evals:  # applied to the run's saved config by `ssl-lab eval`
            load_config(studies.protocol_path(run, scale), [f"seed={run.seed}", *extra])


@pytest.mark.parametrize("scale", SCALES)
def test_every_protocol_sets_every_config_key(studies, scale):
    """A config key added later fails here until the protocols are re-frozen deliberately
    (its published value in published_defaults.yaml, then `bench/studies.py freeze`)."""
    names = {run.name for run in studies.protocol_runs()}
    assert {p.stem for p in (studies.PROTOCOLS / scale).glob("*.yaml")} == names
    for run in studies.protocol_runs():
        keys = set(_frozen(studies, run, scale))
        assert keys == SCHEMA, (run.name, sorted(SCHEMA - keys), sorted(keys - SCHEMA))
    assert set(flatten(read_yaml(studies.PUBLISHED_DEFAULTS))) == SCHEMA


# The published protocol, read from commit 26957dd (the studies' code): its defaults were views.n
# 2, batch 256, 1 warm-up epoch, lr 2e-3, last_width 512, features under train.precision and
# views at the image size (views.size=0); the scales and each run's overrides are unchanged since.
SCALE_VALUES = {
    "cpu": {"model.width": 0.125, "eval.train_fraction": 0.37, "train.epochs": 3.0,
            "train.threads": 1, "optim.warmup_epochs": 1.0},
    "gpu": {"model.width": 1.0, "eval.train_fraction": 1.0, "train.epochs": 100.0,
            "train.threads": None, "optim.warmup_epochs": 10.0},
}


def _published(run, scale: str) -> dict:
    own = dict(o.split("=", 1) for o in run.overrides)
    fraction = {"cpu": 0.37, "gpu": 1.0}[scale]
    return {
        **SCALE_VALUES[scale],
        "views.n": int(own.get("views.n", 2)),
        "optim.batch_size": int(own.get("optim.batch_size", 256)),
        "optim.lr": 0.001 if run.config == "multiview_barlow" else 0.002,  # the config's own lr
        "model.last_width": int(own.get("model.last_width", 512)),
        "eval.precision": "train",
        "views.size": 32 if own.get("data.name") == "shapes" else 28,
        "views.fast": False,
        "data.fraction": float(own.get("data.fraction", fraction)),
    }


@pytest.mark.parametrize("scale", SCALES)
def test_protocols_hold_the_published_values(studies, scale):
    for run in studies.protocol_runs():
        frozen = _frozen(studies, run, scale)
        expected = _published(run, scale)
        assert _typed({k: frozen[k] for k in expected}) == _typed(expected), run.name
    cpu = {run.name: _frozen(studies, run, "cpu") for run in studies.protocol_runs()}
    # spelled out for the baseline and the runs that override a protocol value
    assert [cpu["simclr"][k] for k in ("views.n", "optim.batch_size", "optim.warmup_epochs",
            "optim.lr", "model.last_width", "eval.precision", "views.size")] == [
                2, 256, 1.0, 0.002, 512, "train", 28]
    assert cpu["simclr-b32"]["optim.batch_size"] == 32
    assert cpu["simclr-lw2048"]["model.last_width"] == 2048
    assert cpu["mvbarlow-d256-scaled-v4-f0.185"]["views.n"] == 4


def test_a_protocol_without_a_key_stops_run(studies, tmp_path, monkeypatch):
    run = studies.protocol_runs()[0].seeded(0)
    tree = read_yaml(studies.protocol_path(run, "cpu"))
    del tree["views"]["n"]
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / f"{run.name}.yaml").write_text(json.dumps(tree))
    monkeypatch.setattr(studies, "PROTOCOLS", tmp_path)
    with pytest.raises(SystemExit, match=r"does not set views\.n"):
        studies.study_config(run, tmp_path / "runs", "cpu")


def test_freeze_writes_complete_protocols_and_needs_every_key(studies, tmp_path, monkeypatch):
    paths = studies.freeze("cpu", tmp_path)
    assert {p.stem for p in paths} == {run.name for run in studies.protocol_runs()}
    assert all(set(flatten(read_yaml(p))) == SCHEMA for p in paths)
    assert read_yaml(paths[0]) == read_yaml(studies.protocol_path(studies.protocol_runs()[0], "cpu"))
    tree = read_yaml(studies.PUBLISHED_DEFAULTS)
    del tree["eval"]["precision"]
    (tmp_path / "defaults.yaml").write_text(json.dumps(tree))
    monkeypatch.setattr(studies, "PUBLISHED_DEFAULTS", tmp_path / "defaults.yaml")
    with pytest.raises(SystemExit, match=r"does not set eval\.precision"):
        studies.freeze("cpu", tmp_path)


def test_a_run_directory_of_another_config_stops_run(studies, tmp_path):
    """A run trained before the protocols were frozen (today's 4 x 128 views) is neither
    skipped as finished nor resumed under the frozen protocol."""
    from ssl_lab.config_io import save_config

    run = studies.protocol_runs()[0].seeded(0)
    cfg = studies.study_config(run, tmp_path, "cpu")
    run_dir = tmp_path / run.dir_name
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    studies.check_saved(run_dir, cfg)  # the same config: fine
    save_config(load_config(studies.protocol_path(run, "cpu"), ["views.n=4"]), run_dir / "config.yaml")
    with pytest.raises(SystemExit, match=r"views\.n 4 \(frozen: 2\)"):
        studies.check_saved(run_dir, cfg)


def _fake_run(run_dir: Path, seed: int, backbone: float, z: float) -> None:
    layers = {"backbone": backbone, "proj1": z}
    report = {"dataset": "fashion-mnist", "best_layer": "backbone",
              "layers": {k: {"linear_test": v, "knn_test": v - 0.1} for k, v in layers.items()}}
    (run_dir / "evals").mkdir(parents=True)
    (run_dir / "evals" / "fashion-mnist.json").write_text(json.dumps(report))
    (run_dir / "summary.json").write_text(json.dumps({"dataset": "fashion-mnist", "seed": seed}))


def test_per_layer_table_is_mean_and_std_over_seeds(study_report, tmp_path):
    _fake_run(tmp_path / "simclr-s0", 0, backbone=0.80, z=0.70)
    _fake_run(tmp_path / "simclr-s1", 1, backbone=0.84, z=0.70)
    fam = study_report.load(tmp_path, "simclr", seeds=3)  # seed 2 has not run: 2 seeds
    table = study_report.per_layer_table([fam], random_init=False)
    row = table.splitlines()[-1]
    # backbone mean 82.0, sample std 2.8; backbone - z gap 12.0 ± 2.8; falls in both seeds
    assert row.startswith("| simclr | 2 | 82.0 ± 2.8 | 70.0 ± 0.0 |")
    assert row.endswith("| 12.0 ± 2.8 | 2 of 2 |")


def test_falls_through_projector_needs_a_drop_at_every_layer_after_the_backbone(study_report):
    def report(*accs):
        names = ["stage1", "backbone", "proj1", "proj2"]
        return {"layers": {k: {"linear_test": a} for k, a in zip(names, accs, strict=True)}}

    assert study_report.falls_through_projector(report(0.1, 0.8, 0.7, 0.6))  # stage1 is ignored
    assert not study_report.falls_through_projector(report(0.1, 0.8, 0.7, 0.75))
    assert not study_report.falls_through_projector(report(0.1, 0.8, 0.8, 0.6))  # a tie: no drop


def test_collect_copies_the_small_files_of_finished_runs_only(studies, tmp_path):
    run, unfinished = (r.seeded(0) for r in studies.protocol_runs()[:2])
    run_dir = tmp_path / "runs" / run.dir_name
    _fake_run(run_dir, 0, backbone=0.8, z=0.7)
    for name in ("config.yaml", "metrics.jsonl", "env.json", "evals/digits.json"):
        (run_dir / name).write_text(name)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.safetensors").write_bytes(b"weights")
    raw = tmp_path / "raw"
    assert studies.collect(run, tmp_path / "runs", raw)
    assert not studies.collect(unfinished, tmp_path / "runs", raw)
    kept = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file())
    assert kept == [f"{run.dir_name}/{f}" for f in ("config.yaml", "env.json", "evals/digits.json",
                                                    "evals/fashion-mnist.json", "metrics.jsonl",
                                                    "summary.json")]


def test_every_study_table_reads_the_committed_raw_folder(study_report):
    """report.py registers each study table on docs/results/studies/cpu, and the tables are
    not empty there: a renamed run or folder would leave a header-only table."""
    sys.path.insert(0, str(ROOT / "bench"))
    import report

    raw = ROOT / "docs" / "results" / "studies" / "cpu"
    for name, fn in study_report.TABLES.items():
        assert report.TABLES[name](ROOT / "docs") == fn(raw)
        assert len(fn(raw).splitlines()) > 2, name


def test_plot_all_draws_every_study_plot_from_the_raw_folder(study_report, tmp_path):
    raw = ROOT / "docs" / "results" / "studies" / "cpu"
    written = study_report.plot_all(raw, 3, tmp_path)
    names = ["study-guillotine.png", "study-guillotine-shapes.png", "study-width.png",
             "study-views-wallclock.png"]
    assert written == [tmp_path / n for n in names]
    assert all(p.stat().st_size > 1000 for p in written)
    assert study_report.plot_all(tmp_path / "empty", 3, tmp_path / "none") == []  # no runs, no plots
