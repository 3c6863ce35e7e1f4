"""The training loop, run directory contract, resume and the CLI, on tiny real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides
from safetensors.torch import load_file

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.cli import main
from ssl_lab.config import load_config
from ssl_lab.train_loop import train
from ssl_lab.train_setup import load_training_data

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
SUMMARY_KEYS = {"method", "dataset", "epochs", "wall_s", "views_per_s", "probes", "probes_val",
                "best_layer", "knn_top1", "online_probes", "random_init_probes", "pixel_probe"}


def test_cli_train_then_eval_on_another_dataset(tmp_path, stripes_npz, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_run_overrides(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    layers = ["stage1", "stage2", "stage3", "backbone", "proj1", "proj2"]
    assert list(summary["probes"]) == layers == list(summary["random_init_probes"])
    assert summary["best_layer"] == max(summary["probes_val"], key=summary["probes_val"].get)
    assert summary["epochs"] == 2 and 0 < summary["pixel_probe"] <= 1
    for name in ("config.yaml", "env.json", "metrics.jsonl", "encoder.json", "plots/probes.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert ckpt_io.verify(run / "checkpoints" / latest)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "views_per_s", "z_std", "rankme", "online/backbone"} <= set(rows[-1])
    assert "<- best" in capsys.readouterr().out

    assert main(["eval", str(run), f"data.name=npz:{stripes_npz}"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["dataset"].startswith("npz:") and set(report["layers"]) == set(layers)
    assert {"linear_val", "linear_test", "knn_test", "zero_frac", "binarized_test", "rankme"} <= \
        set(report["layers"]["backbone"])
    assert {"linear_val", "linear_test", "knn_test"} <= set(report["pixels"])
    assert any(p.name.startswith("probes-npz_") for p in (run / "plots").iterdir())

    # eval.train_fraction: probes train on a seeded share of the train split
    assert main(["eval", str(run), f"data.name=npz:{stripes_npz}", "eval.train_fraction=0.5"]) == 0
    half = json.loads((run / "eval.json").read_text())
    assert half["probe_train_size"] == math.ceil(report["probe_train_size"] / 2)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_two_steps(path, tmp_path):
    over = tiny_run_overrides(tmp_path / "r", **{"train.epochs": 1, "eval.enabled": False})
    cfg = load_config(path, [o for o in over if not o.startswith("model.projector")])
    run = train(cfg, stop_at_step=2)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    found = ckpt_io.find_checkpoint(run)
    return load_file(str(found / ckpt_io.WEIGHTS))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resume_mid_epoch_is_bit_exact(tmp_path, method):
    extra = {"method.name": method, "eval.enabled": False, "train.ckpt_every_steps": 3,
             "views.recipe": "byol"}
    straight = train(load_config(None, tiny_run_overrides(tmp_path / "a", **extra)))
    crashed = tiny_run_overrides(tmp_path / "b", **extra)
    train(load_config(None, crashed), stop_at_step=7)  # "killed" after step 7; last ckpt: step 6
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    train(load_config(None, [*crashed, "resume=true"]))
    a, b = _final_weights(straight), _final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"


def test_fractional_epochs_end_mid_epoch_and_resume_exactly(tmp_path):
    """train.epochs=1.5 trains round(1.5 x steps per epoch) steps (the schedules follow), ends
    with a checkpoint there, and a run killed before that resumes to the same weights."""
    extra = {"eval.enabled": False, "train.epochs": 1.5, "train.ckpt_every_steps": 2}
    straight = train(load_config(None, tiny_run_overrides(tmp_path / "a", **extra)))
    steps_per_epoch = len(load_training_data(load_config(
        None, tiny_run_overrides(tmp_path / "a", **extra))).train.images) // 64
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == round(1.5 * steps_per_epoch) and summary["steps"] % steps_per_epoch
    assert summary["epochs"] == summary["steps"] / steps_per_epoch
    assert ckpt_io.find_checkpoint(straight).name == f"step-{summary['steps']:07d}"
    crashed = tiny_run_overrides(tmp_path / "b", **extra)
    train(load_config(None, crashed), stop_at_step=summary["steps"] - 1)
    train(load_config(None, [*crashed, "resume=true"]))
    a, b = _final_weights(straight), _final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from uninterrupted"


def test_online_probes_learn_an_easy_task(tmp_path, stripes_npz):
    over = tiny_run_overrides(tmp_path / "r", **{
        "data.name": f"npz:{stripes_npz}", "data.fraction": 1.0, "optim.batch_size": 36,
        "train.epochs": 6, "train.log_every_steps": 12, "eval.enabled": False,
        "probe.lr": 0.05, "views.recipe": "weak"})
    run = train(load_config(None, over))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # Horizontal vs vertical stripes: chance is 0.5; a working probe is far above it.
    assert last["online/stage1"] > 0.8 and last["online/backbone"] > 0.8, last


@pytest.mark.parametrize("args, fragment", [
    (["train", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "optim.lr=abc"], "expects float"),
    (["train", "data.name=npz:/nonexistent/x.npz"], "/nonexistent/x.npz"),
    (["train", "method.name=no_such_method"], "unknown method.name"),
    (["eval", "/nonexistent/run"], "does not exist"),
])
def test_cli_user_errors_exit_2_with_one_line(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_existing_run_dir_needs_resume(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "something").write_text("x")
    assert main(["train", *tiny_run_overrides(run)]) == 2
    assert "resume=true" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["something"]  # nothing half-written


@pytest.mark.parametrize("method", ["simclr", "byol", "multiview_barlow"])
def test_multi_crop_adds_small_views_to_the_loss(tmp_path, method):
    from ssl_lab.seeding import step_generator
    from ssl_lab.train_setup import build

    over = tiny_run_overrides(tmp_path / "r", **{"method.name": method, "views.n": 2,
                                                 "views.small_n": 2, "views.small_size": 8,
                                                 "eval.enabled": False})
    cfg = load_config(None, over)
    s = build(cfg)
    x = torch.from_numpy(s.data.train.images[:16])
    gen = step_generator(s.device, 0, 0)
    views, small = s.views(x, gen), s.small_views(x, gen)
    assert views.shape[0] == 2 and small.shape[:2] == (2, 16) and small.shape[-1] == 8
    out = s.model(views, ["backbone"], small)
    assert out["z"].shape[:2] == (4, 16) and out["features"]["backbone"].shape[0] == 2 * 16
    if method == "byol":
        assert out["p"].shape == out["z_target"].shape == out["z"].shape
    run = train(load_config(None, [*over, f"run.dir={tmp_path / 'r2'}"]), stop_at_step=2)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_train_compile_compiles_the_model_in_place(tmp_path, monkeypatch):
    """train.compile=true compiles SSLModel in place (Module.compile keeps parameter names, so
    checkpoints are unchanged). Compiling for real takes minutes on CPU: the call is recorded."""
    from ssl_lab import train_setup as train_module

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append(type(self).__name__))
    cfg = load_config(None, tiny_run_overrides(tmp_path / "run", **{"train.compile": "true"}))
    train_module.build(cfg)
    assert compiled == ["SSLModel"]


def test_eval_knn_settings_reach_every_layer(tmp_path):
    """`ssl-lab eval RUN eval.knn_k=...` changes the per-layer kNN, not only the pixels'."""
    from ssl_lab.data.sources import load_dataset
    from ssl_lab.eval.metrics import knn_classify
    from ssl_lab.eval.run import evaluate_run, features_by_split
    from ssl_lab.models.encoder import load_encoder

    run = train(load_config(None, tiny_run_overrides(tmp_path / "r", **{"eval.enabled": False})))
    report = evaluate_run(run, ["eval.knn_k=3", "eval.knn_temperature=0.5", "eval.baselines=false"])
    cfg = load_config(run / "config.yaml")
    data = load_dataset(cfg.data.name, val_fraction=cfg.data.val_fraction, seed=cfg.seed)
    cpu = torch.device("cpu")
    feats = features_by_split(load_encoder(run), data, ["backbone"], 512, cpu, None)  # fp32
    expected = knn_classify(feats["train"]["backbone"], torch.from_numpy(data.train.labels),
                            feats["test"]["backbone"], torch.from_numpy(data.test.labels),
                            num_classes=10, k=3, temperature=0.5)
    assert report["layers"]["backbone"]["knn_test"] == expected


@pytest.mark.parametrize("precision, expected", [("fp32", None), ("train", torch.bfloat16)])
def test_eval_precision_sets_the_feature_dtype(tmp_path, monkeypatch, precision, expected):
    """Offline features are fp32 by default even after bf16 training; eval.precision=train
    extracts them under the training autocast instead (the behaviour before it existed)."""
    from ssl_lab.eval import run as eval_run

    run = train(load_config(None, tiny_run_overrides(
        tmp_path / "r", **{"eval.enabled": False, "train.precision": "bf16", "train.epochs": 1})))
    seen, extract = [], eval_run.extract_features
    monkeypatch.setattr(eval_run, "extract_features",
                        lambda *a, **k: seen.append(a[5]) or extract(*a, **k))
    eval_run.evaluate_run(run, [f"eval.precision={precision}", "eval.baselines=false"])
    assert seen == [expected] * 3  # train, val, test


def test_eval_uses_the_configs_thread_count(tmp_path, monkeypatch):
    """`ssl-lab eval` sets train.threads as training did: the thread count orders float sums,
    so a standalone evaluation reproduces the one at the end of training."""
    from ssl_lab.eval import run as eval_run

    run = train(load_config(None, tiny_run_overrides(
        tmp_path / "r", **{"eval.enabled": False, "train.epochs": 1})))
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    eval_run.evaluate_run(run, ["train.threads=3", "eval.baselines=false"])
    assert calls == [3]
