"""The benchmark tables of docs/RESULTS.md that bench/report.py generates from docs/bench/*.json:
each registered table, built from a made-up JSON, shows the right cells."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build(report, tmp_path: Path, table: str, file: str, record: dict) -> list[str]:
    """The lines of `table` as report.py builds it from `record` written as docs/bench/`file`."""
    (tmp_path / "bench").mkdir(exist_ok=True)
    (tmp_path / "bench" / file).write_text(json.dumps(record))
    return report.TABLES[table](tmp_path).splitlines()


def test_train_throughput_lists_every_run_and_the_bracketed_ratios(report, tmp_path):
    lines = _build(report, tmp_path, "train-throughput", "train_throughput_s11.json", {
        "model_only_runs": [1000.4, 2000.6, 1500.0], "loop_runs": [900.0, 2100.0],
        "bracketed_ratios": [0.6, 1.2346], "ratio": 0.9173, "model_only_views_per_s": 1500.0})
    assert lines[0].startswith("| model-only views/s (3 runs) | full loop views/s (2 runs) |")
    assert lines[2] == "| 1,000, 2,001, 1,500 | 900, 2,100 | 60.0 %, 123.5 % (median **91.7 %**) |"
    assert len(lines) == 3


def test_small_conv_shows_each_layer_its_times_and_the_path_used(report, tmp_path):
    layer = {"input": [8, 16, 4, 4], "out": 32, "kernel": 3, "stride": 1}
    lines = _build(report, tmp_path, "small-conv", "small_conv.json", {"layers": [
        {**layer, "conv_ms": 10.04, "dense_ms": 20.06, "used": "conv"},
        {**layer, "input": [8, 16, 2, 2], "stride": 2, "conv_ms": 7.0, "dense_ms": 1.26,
         "used": "dense"}], "steps": {"dense": [1.0], "conv": [1.0]}})
    assert lines[0] == ("| input (N, C, H, W) | out | kernel | stride | nn.Conv2d ms | dense ms "
                        "| used |")
    assert lines[2:] == ["| (8, 16, 4, 4) | 32 | 3 | 1 | 10.0 | 20.1 | nn.Conv2d |",
                         "| (8, 16, 2, 2) | 32 | 3 | 2 | 7.0 | 1.3 | dense |"]


def test_dense_build_ab_shows_medians_runs_and_their_ratio(report, tmp_path):
    lines = _build(report, tmp_path, "dense-build-ab", "dense_build_ab.json", {
        "runs": {"a": [100.4, 1110.0, 90.0], "b": [2200.0, 200.0, 210.6]},
        "median": {"a": 100.4, "b": 210.6}, "b_over_a": 2.0976})
    assert lines[0] == "| before (83eb7fb) views/s | after views/s | speed-up |"
    assert lines[2] == ("| 100 (100, 1,110, 90) | 211 (2,200, 200, 211) "
                        "| **2.10×** (medians) |")


def test_view_generation_shows_each_pipeline_and_speedups_to_two_decimals(report, tmp_path):
    lines = _build(report, tmp_path, "view-generation", "views.json", {
        "kornia": "1.2.3", "results": {
            "ssl_lab": {"ms_per_call": 10.04, "views_per_call": 64, "views_per_s": 6374.6,
                        "ssl_lab_speedup": 1.0},
            "kornia": {"ms_per_call": 40.0, "views_per_call": 64, "views_per_s": 1600.0,
                       "ssl_lab_speedup": 3.9841},
            "per_image_loop": {"ms_per_call": 50.0, "views_per_call": 16, "views_per_s": 320.0,
                               "ssl_lab_speedup": 19.921}}})
    assert lines[0] == "| pipeline | ms / call (64 views) | views / s | ssl-lab speed-up |"
    assert lines[2:] == [
        "| **ssl-lab** (`ssl_lab.data.views.ViewGenerator`) | 10.0 | **6,375** | 1.00× |",
        "| kornia 1.2.3 `AugmentationSequential`, same ops and parameters | 40.0 | 1,600 "
        "| **3.98×** |",
        "| per-image torch ops in a Python loop (16 views / call) | 50.0 | 320 | 19.92× |"]
