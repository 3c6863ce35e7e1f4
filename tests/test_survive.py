"""Surviving crashes: kill -9 at a random step, a kill during checkpoint writing, NaN losses."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_weights, tiny_run_overrides

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.cli import main
from ssl_lab.config import load_config
from ssl_lab.errors import UserError
from ssl_lab.runtime import write_text_atomic
from ssl_lab.train_loop import train

EXTRA = {"eval.enabled": False, "train.ckpt_every_steps": 1, "train.epochs": 3,
         "train.threads": 1}


def _last_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.is_file() else 0


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    """A non-default recipe (configs/vicreg.yaml), killed, then resumed with the short form
    `ssl-lab train run.dir=X resume=true`: the saved config.yaml rebuilds the same run."""
    vicreg = str(Path(__file__).parents[1] / "configs" / "vicreg.yaml")
    vic = {"model.projector": "32-32-32", "method.sim_weight": 20.0}
    straight = train(load_config(vicreg, tiny_run_overrides(tmp_path / "a", **EXTRA, **vic)))
    args = [vicreg, *tiny_run_overrides(tmp_path / "b", **EXTRA, **vic)]
    cmd = [sys.executable, "-m", "ssl_lab", "train", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    rng = random.Random(int(time.time()))  # a different kill point every run of the suite
    target = rng.randint(1, 8)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _last_step(tmp_path / "b") < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: mid-step or mid-save
    proc.wait()
    assert main(["train", f"run.dir={tmp_path / 'b'}", "resume=true"]) == 0
    a, b = checkpoint_weights(straight), checkpoint_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"resume after kill at step ~{target} differs"


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    run = train(load_config(None, tiny_run_overrides(tmp_path / "r", **EXTRA)))
    root = run / "checkpoints"
    newest = sorted(root.glob("step-*"))[-1]
    with open(newest / ckpt_io.WEIGHTS, "r+b") as handle:  # a torn write: half the file
        handle.truncate(handle.seek(0, 2) // 2)
    (root / ".tmp-step-9999999-1").mkdir()  # a directory left by a kill during save
    with pytest.warns(UserWarning, match="damaged"):
        found = ckpt_io.find_checkpoint(run)
    assert found is not None and found != newest and ckpt_io.verify(found)


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    from ssl_lab import methods

    real = methods.METHODS["simclr"]
    calls = {"n": 0, "bad": lambda n: n >= 4}

    def poisoned(out, labels, mc, gen):
        calls["n"] += 1
        loss = real.loss(out, labels, mc, gen)
        return loss * float("nan") if calls["bad"](calls["n"]) else loss

    monkeypatch.setitem(methods.METHODS, "simclr", methods.Method(poisoned))
    cfg = load_config(None, tiny_run_overrides(tmp_path / "r", **EXTRA))
    with pytest.raises(UserError, match=r"at step 4.*step-0000003"):
        train(cfg)

    # skip mode: one poisoned step is skipped, the run finishes with finite weights
    calls.update(n=0, bad=lambda n: n == 5)
    cfg = load_config(None, tiny_run_overrides(tmp_path / "s", **EXTRA, **{"train.on_nan": "skip"}))
    run = train(cfg)
    assert all(torch.isfinite(t).all() for t in checkpoint_weights(run).values() if t.is_floating_point())
    assert _last_step(run) == 12


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    """Checkpoints copied in from a run of another width: one line naming the mismatch."""
    args = tiny_run_overrides(tmp_path / "r", **EXTRA | {"train.epochs": 1})
    other = tiny_run_overrides(tmp_path / "w", **EXTRA | {"train.epochs": 1, "model.width": 0.25})
    assert main(["train", *args]) == 0 and main(["train", *other]) == 0
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    shutil.copytree(tmp_path / "w" / "checkpoints", tmp_path / "r" / "checkpoints")
    capsys.readouterr()
    assert main(["train", f"run.dir={tmp_path / 'r'}", "resume=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err and "shape mismatch" in err, err


def test_result_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """summary.json, eval.json, checkpoints' `latest`...: a write that dies before its rename
    leaves the previous file intact and no temporary behind."""
    path = write_text_atomic(tmp_path / "summary.json", '{"old": 1}')
    assert path.read_text() == '{"old": 1}'

    def killed(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        write_text_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    monkeypatch.undo()
    write_text_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}' and len(list(tmp_path.iterdir())) == 1
