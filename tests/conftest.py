"""Shared fixtures: tiny, fast, offline runs (digits / hand-made npz), baselines cached in tmp."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own baseline cache and working directory (default runs/ lands there)."""
    monkeypatch.setenv("SSL_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def tiny_run_overrides(run_dir, **extra) -> list[str]:
    """A 2-epoch run on a fifth of sklearn's digits with a 1/8-width ResNet-18: seconds on CPU."""
    base = {"run.dir": str(run_dir), "data.name": "digits", "data.fraction": 0.2,
            "model.width": 0.125, "model.projector": "32-16", "model.stem": "cifar",
            "model.last_width": "null", "optim.batch_size": 64,
            "train.epochs": 2, "train.log_every_steps": 2, "eval.batch_size": 512}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def stripes_npz(tmp_path):
    """Two visually obvious classes (horizontal vs vertical stripes + noise) in the npz format."""
    rng = np.random.default_rng(0)
    n, size = 240, 16
    labels = rng.integers(0, 2, n)
    grid = (np.arange(size) // 2 % 2).astype(np.float32)
    horizontal = np.repeat(grid[:, None], size, 1)
    images = np.where(labels[:, None, None] == 0, horizontal, horizontal.T)
    images = np.clip(images * 200 + rng.normal(0, 20, images.shape) + 25, 0, 255).astype(np.uint8)
    path = tmp_path / "stripes.npz"
    np.savez(path, images=images[..., None], labels=labels.astype(np.int64))
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test models gain nothing from a second thread, and on a loaded 2-core machine
    OpenMP threads that wait on each other make them ~10x slower."""
    import torch

    torch.set_num_threads(1)


def interrupt_trainer_at(monkeypatch, trainer_cls, at_step: int):
    """Make `trainer_cls.train_step` raise KeyboardInterrupt (Ctrl-C) when it reaches `at_step`;
    returns the real step (to put back before resuming)."""
    real_step = trainer_cls.train_step

    def interrupted(self, step, indices):
        if step == at_step:
            raise KeyboardInterrupt
        return real_step(self, step, indices)

    monkeypatch.setattr(trainer_cls, "train_step", interrupted)
    return real_step


def as_shown(err: str) -> str:
    """stderr as a terminal shows it: a progress bar cleared with carriage returns is gone."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in err.split("\n")).strip()


def checkpoint_weights(run):
    """The tensors of a run's newest complete checkpoint."""
    from safetensors.torch import load_file

    from ssl_lab import checkpoint as ckpt_io

    return load_file(str(ckpt_io.find_checkpoint(run) / ckpt_io.WEIGHTS))


def same_weights(a, b) -> bool:
    """Two runs' newest checkpoints hold bit-identical tensors under the same names."""
    import torch

    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def snapshot(run) -> dict:
    """Every file of a run directory with its bytes and modification time."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    """The single `ssl-lab: error: ...` line a user mistake prints."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl-lab: error: "), err
    return err[0]


@pytest.fixture
def bench_script(monkeypatch):
    """Load bench/<name>.py as a fresh module: the bench scripts are scripts, not a package, and
    import their siblings, so bench/ goes on sys.path and the module into sys.modules (where
    dataclasses look their module up) for the test's duration."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def report(bench_script):
    """bench/report.py (the docs' generated tables)."""
    return bench_script("report")
