"""`torchrun -m ssl_lab train` end to end: 2 CPU processes (gloo), rank-0-only files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_run_overrides
from safetensors.torch import load_file

from ssl_lab import checkpoint as ckpt_io


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ssl_lab",
                           "train", *args], capture_output=True, text=True, timeout=240, env=env)


def test_torchrun_two_processes_then_resume(tmp_path):
    """Two DDP ranks train, then the short form resumes the run for one more epoch."""
    run = tmp_path / "run"
    args = tiny_run_overrides(run, **{"eval.enabled": False, "train.threads": 1,
                                      "train.epochs": 1})
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["resumed_at_step"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["step"] for r in rows}), "only rank 0 may log"
    first_end = rows[-1]["step"]
    proc = _torchrun([f"run.dir={run}", "resume=true", "train.epochs=2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "env.json").read_text())["resumed_at_step"] == first_end
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 * first_end and len(rows) == len({r["step"] for r in rows})
    weights = load_file(str(ckpt_io.find_checkpoint(run) / ckpt_io.WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
