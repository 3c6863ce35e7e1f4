"""bench/gpu_check.py: the CPU dry run writes every part (ran or skipped with a reason), and
one part's crash, hang or a spent budget is recorded without losing the others."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ("views", "prefetch", "ddp", "amp", "throughput")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert out.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def _ran_or_skipped(result: dict, where: str) -> None:
    assert result["status"] in ("ok", "skipped"), f"{where}: {json.dumps(result)[:3000]}"
    if result["status"] == "skipped":
        assert result.get("reason"), f"{where} skipped without a reason"


def test_dry_run_runs_or_skips_every_part(dry_run):
    proc, report = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["dry_run"] is True and report["ok"] is True
    assert {"torch", "device_name"} <= report["env"].keys()
    assert tuple(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        _ran_or_skipped(part, name)
        assert part["device"] == "cpu" and part["seconds"] > 0
        for key, sub in {**part.get("cases", {}), **part.get("runs", {}),
                         **part.get("rows", {})}.items():
            _ran_or_skipped(sub, f"{name}/{key}")
    assert "part" in proc.stdout and "views/s" in proc.stdout  # the closing tables


def test_dry_run_parts_measure_what_they_claim(dry_run):
    parts = dry_run[1]["parts"]
    for case in parts["views"]["cases"].values():  # CPU vs CPU replay: equal within tolerance
        assert 0 <= case["max_abs_diff"] <= case["tolerance_max"]
    assert {c["fast"] for c in parts["views"]["cases"].values()} == {False, True}
    fast = [c for c in parts["views"]["cases"].values() if c["fast"]]
    assert all(0 < c["cpu_bf16_vs_fp32_max_abs_diff"] <= c["tolerance_max"] for c in fast)
    amp = parts["amp"]["runs"]
    assert set(amp) == {"bf16", "fp16"} and amp["bf16"]["status"] == "ok"
    for run in amp.values():
        if run["status"] == "ok":
            assert run["steps"] == run["target_steps"] and run["losses_finite"]
    if amp["fp16"]["status"] == "ok":  # fp16 must be loss-scaled
        assert amp["fp16"]["checkpoint_scaler"]["scale"] > 0
    rows = parts["throughput"]["rows"]
    for backbone in ("resnet18", "resnet50"):
        row = rows[f"{backbone}-16px-eager"]
        assert row["model_only"]["views_per_s"] > 0 and row["full_loop"]["views_per_s"] > 0
    assert rows["resnet18-16px-compiled"]["compile_backend"] == "eager"
    prefetch = parts["prefetch"]
    assert prefetch["streamed"] and prefetch["batches_match"] and prefetch["prefetch_threads"]
    assert parts["ddp"]["backend"] == "gloo" and parts["ddp"]["all_reduce_ok"]
    assert parts["ddp"]["max_rel_grad_diff_vs_plain"] <= 1e-3


def test_a_crashing_part_is_recorded(gpu_check, tmp_path):
    result = tmp_path / "result.json"
    gpu_check.child("no-such-part", result, deadline=1e12, dry=True)
    out = json.loads(result.read_text())
    assert out["status"] == "error" and "no-such-part" in out["error"]


def test_a_part_past_its_cap_is_killed_and_recorded(gpu_check):
    out = gpu_check.run_part("throughput", 0.5, dry=True)  # cannot even import torch in time
    assert out["status"] == "timeout" and "cap" in out["error"]
    assert out["seconds"] < 30 and "log_tail" in out


def test_a_killed_part_keeps_its_saved_rows(gpu_check):
    saved = {"status": "running", "rows": {"a": {"status": "ok", "views_per_s": 1.0},
                                           "b": {"status": "pending"}}}
    out = gpu_check.settle(saved, True, -9, 60.0, "log", gpu_check.time.perf_counter())
    assert out["status"] == "timeout" and out["rows"]["a"]["views_per_s"] == 1.0
    assert out["rows"]["b"]["status"] == "skipped" and out["rows"]["b"]["reason"]
    crashed = gpu_check.settle({}, False, -11, 60.0, "Segmentation fault", 0.0)
    assert crashed["status"] == "error" and "-11" in crashed["error"]
    assert crashed["log_tail"] == "Segmentation fault"


def test_parts_beyond_the_budget_are_skipped(gpu_check):
    results = gpu_check.run_all(["views", "amp"], budget=3.0, dry=True)
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert all("budget" in r["reason"] for r in results.values())


def test_unknown_part_and_missing_gpu_are_usage_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    for args in (["--dry-run", "--parts", "views,nope"], []):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json"),
                               *args], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "error:" in proc.stderr
        assert not (tmp_path / "x.json").exists()
