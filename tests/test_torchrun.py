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


def test_torchrun_two_processes(tmp_path):
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = tiny_run_overrides(run, **{"eval.enabled": False, "train.threads": 1})
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ssl_lab",
                           "train", *args], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["step"] for r in rows}), "only rank 0 may log"
    weights = load_file(str(ckpt_io.find_checkpoint(run) / ckpt_io.WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
