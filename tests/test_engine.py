"""The shared run engine under `ssl-lab train`: resume restores the saved run, conflicting
overrides are refused without touching a file, damaged checkpoints stop the run, one writer per
run directory, fp16 with a GradScaler, the recipes inside the wheel."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from ssl_lab import checkpoint as ckpt_io
from ssl_lab import losses, methods
from ssl_lab.cli import main
from ssl_lab.config import load_config
from ssl_lab.config_io import to_dict
from ssl_lab.errors import UserError
from ssl_lab.rundir import RunDir
from ssl_lab.train_loop import save, start, train, train_step
from ssl_lab.train_setup import build

ROOT = Path(__file__).parents[1]
FAST = {"eval.enabled": False, "train.ckpt_every_steps": 1, "train.epochs": 2}


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run: relative path -> sha256 (and the directory listing with it)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def vicreg_run(tmp_path) -> Path:
    """A configs/vicreg.yaml run interrupted at step 3 (checkpoints of steps 1 and 2 kept)."""
    cfg = load_config("configs/vicreg.yaml", tiny_run_overrides(
        tmp_path / "v", **FAST, **{"model.projector": "32-32-32"}))
    return train(cfg, stop_at_step=3)


def test_short_resume_restores_the_saved_config(vicreg_run):
    saved = load_config(vicreg_run / "config.yaml")
    resumed = load_config(None, [f"run.dir={vicreg_run}", "resume=true"])
    assert resumed.method.name == "vicreg" and resumed.views.recipe == "vicreg"
    assert to_dict(resumed) | {"resume": False} == to_dict(saved)
    assert main(["train", f"run.dir={vicreg_run}", "resume=true"]) == 0
    assert load_config(vicreg_run / "config.yaml").method.name == "vicreg"


def test_a_conflicting_override_is_refused_and_nothing_changes(vicreg_run, capsys):
    before = snapshot(vicreg_run)
    assert main(["train", f"run.dir={vicreg_run}", "resume=true", "method.sim_weight=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method.sim_weight" in err[0] and "25.0" in err[0] and "5" in err[0]
    assert snapshot(vicreg_run) == before
    # a YAML file that differs from the saved run is refused the same way
    assert main(["train", "configs/simclr.yaml", f"run.dir={vicreg_run}", "resume=true"]) == 2
    assert "method.name" in capsys.readouterr().err and snapshot(vicreg_run) == before


def test_a_resumed_runs_config_still_evaluates_on_another_dataset(vicreg_run):
    assert main(["train", f"run.dir={vicreg_run}", "resume=true"]) == 0
    saved = load_config(vicreg_run / "config.yaml", ["data.name=shapes"])  # as `ssl-lab eval` does
    assert saved.data.name == "shapes" and saved.resume is False


def test_safe_keys_and_a_longer_run_may_change_on_resume(vicreg_run, capsys):
    cfg = load_config(None, [f"run.dir={vicreg_run}", "resume=true", "train.threads=1",
                             "train.budget_s=100", "eval.knn_k=5", "train.epochs=3"])
    assert cfg.train.threads == 1 and cfg.train.epochs == 3 and cfg.method.name == "vicreg"
    assert "lr schedule" in capsys.readouterr().err
    with pytest.raises(UserError, match="train.epochs"):
        load_config(None, [f"run.dir={vicreg_run}", "resume=true", "train.epochs=1"])


def test_a_config_built_in_python_must_agree_with_the_run_it_resumes(vicreg_run):
    cfg = load_config(None, tiny_run_overrides(vicreg_run, **FAST))  # simclr
    cfg.resume = True  # set in Python: load_config never saw the run
    before = snapshot(vicreg_run)
    with pytest.raises(UserError, match="resume: .* is 'vicreg' in"):
        train(cfg)
    assert snapshot(vicreg_run) == before


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it(vicreg_run):
    """config.yaml is written first: a run killed before any checkpoint resumes from step 0
    with its saved config (nothing else needed)."""
    for p in vicreg_run.iterdir():
        if p.name != "config.yaml":
            ckpt_io.shutil.rmtree(p) if p.is_dir() else p.unlink()
    run = train(load_config(None, [f"run.dir={vicreg_run}", "resume=true"]))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (run / "encoder.json").is_file() and first["step"] == 1  # from step 0, every step saved
    assert ckpt_io.find_checkpoint(run).name == "step-0000008"  # 2 epochs of 4 steps


def test_every_checkpoint_damaged_stops_and_keeps_them(vicreg_run, capsys):
    for ckpt in (vicreg_run / "checkpoints").glob("step-*"):
        with open(ckpt / ckpt_io.WEIGHTS, "r+b") as f:
            f.seek(200)
            f.write(b"\x00" * 16)
    before = snapshot(vicreg_run)
    assert main(["train", f"run.dir={vicreg_run}", "resume=true"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "step-0000002" in err and snapshot(vicreg_run) == before


def test_checkpoints_outside_the_run_are_never_followed(tmp_path):
    # stop_at_step=k crashes before step k's checkpoint: a has step 2, b step 1
    a = train(load_config(None, tiny_run_overrides(tmp_path / "a", **FAST)), stop_at_step=3)
    b = train(load_config(None, tiny_run_overrides(tmp_path / "b", **FAST)), stop_at_step=2)
    (b / "checkpoints" / "latest").write_text("../../a/checkpoints/step-0000002")
    os.symlink(a / "checkpoints" / "step-0000002", b / "checkpoints" / "step-0000009")
    assert ckpt_io.find_checkpoint(b) == b / "checkpoints" / "step-0000001"


HOLD_LOCK = """
import sys, time
from ssl_lab.rundir import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_one_writer_per_run_directory_and_stale_locks_are_taken_over(vicreg_run, capsys):
    lock = vicreg_run / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(vicreg_run)
        assert main(["train", f"run.dir={vicreg_run}", "resume=true"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use" in err and snapshot(vicreg_run) == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the lock file stays behind, naming a dead pid
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid
    assert main(["train", f"run.dir={vicreg_run}", "resume=true"]) == 0
    assert "stale lock" in capsys.readouterr().err and not lock.exists()


def test_a_second_fresh_start_on_the_same_directory_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    with run.lock(), pytest.raises(UserError, match="in use"), run.lock():
        pass


def _fp16_setup(tmp_path, resume: bool = False):
    over = tiny_run_overrides(tmp_path / "h", **FAST, **{"train.precision": "fp16",
                                                           "resume": str(resume).lower()})
    s = build(load_config(None, over))
    s.run.create()
    start(s)
    x = torch.from_numpy(s.data.train.images[:s.per_rank])
    y = torch.from_numpy(s.data.train.labels[:s.per_rank]).long()
    return s, (x, y)


def _trainable(s) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}


def test_fp16_uses_a_grad_scaler_that_skips_overflowing_steps(tmp_path, monkeypatch):
    s, batch = _fp16_setup(tmp_path)
    assert s.amp_dtype == torch.float16 and s.scaler.is_enabled()
    env = json.loads((s.run_dir / "env.json").read_text())
    assert env["precision"] == "float16" and env["grad_scaler"] is True
    for step in range(4):  # the scaler calibrates (its first steps overflow at 2^16)
        train_step(s, step, batch)
    scale, before = s.scaler.get_scale(), _trainable(s)
    # a finite loss whose scaled gradients overflow: the scaler skips the step, halves its
    # scale, and the run goes on (not a NaN stop)
    monkeypatch.setitem(methods.METHODS, "simclr", methods.Method(
        lambda out, labels, mc, gen: losses.simclr(out["z"], mc.temperature) * 1e35))
    _, loss, _ = train_step(s, 4, batch)
    assert torch.isfinite(loss) and s.scaler.get_scale() == scale / 2
    assert all(torch.equal(before[n], p) for n, p in _trainable(s).items())
    monkeypatch.undo()
    train_step(s, 5, batch)
    assert s.scaler.get_scale() == scale / 2
    assert any(not torch.equal(before[n], p) for n, p in _trainable(s).items())
    save(s, 6, 1.0)  # the scaler's state is part of the checkpoint and comes back on resume
    s2, _ = _fp16_setup(tmp_path, resume=True)
    assert s2.scaler.get_scale() == scale / 2


def test_the_wheel_carries_the_recipes(tmp_path):
    """`pip wheel .` (offline: this venv's setuptools) ships configs/*.yaml inside ssl_lab."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("ssl_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if n.startswith("ssl_lab/configs/")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")} and "simclr.yaml" in shipped


def test_packaged_recipes_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert load_config("configs/vicreg.yaml").method.name == "vicreg"
    assert load_config("byol").method.name == "byol"
    with pytest.raises(UserError, match="packaged recipe"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("args, fragment", [
    (["views", "outt=v.png"], "unknown views option 'outt'; did you mean 'out'?"),
    (["views", "rows=0"], "rows must be an integer"),
    (["sweep", "run=false"], "run=false needs out=DIR"),
    (["export", "/nonexistent", "lyr=best"], "unknown export option 'lyr'"),
])
def test_every_subcommand_takes_key_value_options(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
