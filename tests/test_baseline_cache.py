"""The baseline cache key: the random-init and raw-pixel probes are reused exactly when nothing
they depend on changed, and recomputed when something did (a stale hit would be a silently
wrong baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from ssl_lab.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSL_LAB_CACHE", str(root / "cache"))
        assert main(["train", *tiny_run_overrides(root / "run", **{
            "train.epochs": 1, "eval.enabled": False})]) == 0
    return root


def _entries(root: Path) -> dict[str, list[str]]:
    files = sorted((root / "cache" / "baselines").glob("*.json"))
    return {kind: [f.name for f in files if f.name.startswith(kind)]
            for kind in ("random-init", "pixels")}


def _eval(root: Path, monkeypatch, *overrides: str) -> dict:
    monkeypatch.setenv("SSL_LAB_CACHE", str(root / "cache"))
    assert main(["eval", str(root / "run"), "eval.train_fraction=0.3", *overrides]) == 0
    return json.loads((root / "run" / "eval.json").read_text())


def test_same_inputs_hit_and_changed_inputs_miss(run, monkeypatch):
    first = _eval(run, monkeypatch)
    assert {k: len(v) for k, v in _entries(run).items()} == {"random-init": 1, "pixels": 1}
    # settings that cannot change a baseline's number: hits, and the numbers are identical
    again = _eval(run, monkeypatch, "eval.keep_features=true")
    assert {k: len(v) for k, v in _entries(run).items()} == {"random-init": 1, "pixels": 1}
    assert again["pixels"] == first["pixels"] and again["random_init"] == first["random_init"]
    # the probed layers change the random-init entry only (pixels have no layers)
    _eval(run, monkeypatch, "eval.layers=backbone")
    assert {k: len(v) for k, v in _entries(run).items()} == {"random-init": 2, "pixels": 1}
    # the kNN's k changes both baselines' numbers: both are recomputed
    _eval(run, monkeypatch, "eval.knn_k=7")
    assert {k: len(v) for k, v in _entries(run).items()} == {"random-init": 3, "pixels": 2}
    # another labelled split of the data (the val carve's seed) changes both too
    _eval(run, monkeypatch, "seed=1")
    assert {k: len(v) for k, v in _entries(run).items()} == {"random-init": 4, "pixels": 3}
