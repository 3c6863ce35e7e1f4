"""bench/methods_table.py's equal-budget epochs, bench/eval_profile.py and
bench/probe_convergence.py, on tiny runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from ssl_lab.config import load_config
from ssl_lab.eval.run import evaluate_run
from ssl_lab.runtime import pick_device, resolve_precision
from ssl_lab.train_loop import train
from ssl_lab.train_setup import load_training_data

ROOT = Path(__file__).parents[1]


def _bench(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # bench scripts import each other
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_methods_table_fits_the_epochs_of_the_budget(tmp_path, monkeypatch):
    table = _bench("methods_table", monkeypatch)
    config = ROOT / "configs" / "simclr.yaml"
    overrides = tiny_run_overrides(tmp_path / "unused")[1:]  # all but run.dir
    cfg = load_config(config, overrides)
    views_per_epoch = len(load_training_data(cfg).train.images) // 64 * 64 * cfg.views.n
    speed = views_per_epoch * 3.757 / 60  # 3.757 epochs per minute
    monkeypatch.setattr(table, "full_loop_steps", lambda cfg, steps: speed)
    out = tmp_path / "table"
    assert table.budget_overrides(config, overrides, 1.0, out) == [
        "train.epochs=3.75", "train.budget_s=60.0"]  # rounded down: never over the budget
    record = json.loads((out / "epochs.json").read_text())["simclr"]
    assert record["views_per_epoch"] == views_per_epoch
    assert record["epochs"] == 3.75
    # the record is reused (a resumed table trains the same schedule), even if speed changed
    monkeypatch.setattr(table, "full_loop_steps", lambda cfg, steps: speed / 100)
    assert table.budget_overrides(config, overrides, 1.0, out)[0] == "train.epochs=3.75"
    # a config too slow for a hundredth of an epoch still trains one
    (out / "epochs.json").unlink()
    monkeypatch.setattr(table, "full_loop_steps", lambda cfg, steps: speed / 1000)
    assert table.budget_overrides(config, overrides, 1.0, out)[0] == "train.epochs=0.01"


def test_methods_table_keeps_raw_files_per_config_and_seed_for_the_seeds_table(
        tmp_path, monkeypatch):
    from ssl_lab.config_io import to_dict

    table = _bench("methods_table", monkeypatch)
    seeds = _bench("methods_seeds", monkeypatch)
    layers = {"backbone": 0.80, "proj1": 0.70}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        out = tmp_path / f"out{seed}"
        run = out / "simclr"
        run.mkdir(parents=True)
        cfg = load_config(ROOT / "configs" / "simclr.yaml", [f"seed={seed}"])
        (run / "config.yaml").write_text(json.dumps(to_dict(cfg)))  # JSON is YAML
        (run / "summary.json").write_text(json.dumps(
            {"epochs": 4.4, "stopped_by_budget": seed == 1}))
        (run / "eval.json").write_text(json.dumps({"best_layer": "backbone", "layers": {
            k: {"linear_test": v + shift, "knn_test": v} for k, v in layers.items()}}))
        (out / "epochs.json").write_text("{}")
        table.keep_raw(out, tmp_path / "raw", ["simclr"])
    assert sorted(p.name for p in (tmp_path / "raw" / "simclr").iterdir()) == ["seed0", "seed1"]
    assert (tmp_path / "raw" / "epochs.json").is_file()
    row = seeds.table(tmp_path / "raw").splitlines()[-1]
    # backbone 80 and 82 -> 81.00 ± 1.41; seed 1 was stopped by its budget
    assert row == "| simclr | 2 | 81.00 ± 1.41 | 71.00 ± 1.41 | backbone | 80.00 ± 0.00 | 4.40, 4.40* |"


def test_eval_profile_times_every_layer(tmp_path, monkeypatch, capsys):
    profile = _bench("eval_profile", monkeypatch)
    run = train(load_config(None, tiny_run_overrides(tmp_path / "r", **{"eval.enabled": False})))
    seen, extract = [], profile.features_by_split
    monkeypatch.setattr(profile, "features_by_split", lambda *a: seen.append(a[-1]) or extract(*a))
    monkeypatch.setattr(sys, "argv", ["eval_profile.py", str(run), "--threads", "1",
                                      "eval.precision=train"])
    profile.main()
    assert seen == [resolve_precision("auto", pick_device())]  # the override reached it
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " s |" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["stage1", "stage2", "stage3", "backbone", "proj1", "proj2", "all"]
    assert all(float(cell) >= 0 for cell in rows[-1].replace("*", "").split("|")[3:7])


def test_probe_convergence_reports_every_budget(tmp_path, monkeypatch, capsys):
    conv = _bench("probe_convergence", monkeypatch)
    run = train(load_config(None, tiny_run_overrides(tmp_path / "r", **{"eval.enabled": False})))
    monkeypatch.setattr(sys, "argv", ["probe_convergence.py", str(run), "--threads", "1",
                                      "--layers", "backbone", "--iters", "1,15"])
    conv.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [
        ("backbone", 1), ("backbone", 15), ("pixels", 1), ("pixels", 15)]
    # 15 iterations (metrics.MAX_ITER) reproduce the protocol's own probe of that layer
    report = evaluate_run(run, ["eval.baselines=false"])
    assert float(rows[1][4]) == round(100 * report["layers"]["backbone"]["linear_test"], 2)


def test_loader_chart_replots_a_saved_result_without_benchmarking(tmp_path, monkeypatch):
    bench_loader = _bench("bench_loader", monkeypatch)
    monkeypatch.setattr(bench_loader, "make_folder", None)  # would fail if the bench ran
    rows = {"per_image_pil": {"per_s": 1000.0}, "ssl_lab_raw": {"per_s": 6000.0},
            "ssl_lab_jpeg": {"per_s": 2500.0}}
    result = {"n_images": 20, "size": 96, "views_per_s_by_view_size": {
        "32": rows, "96": rows | {"ssl_lab_raw_exact": {"per_s": 2000.0}}}}
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result))
    monkeypatch.setattr(sys, "argv", ["bench_loader.py", "--replot", str(saved),
                                      "--plot", str(tmp_path / "chart.png")])
    bench_loader.main()
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ab_src_measures_the_tree_it_names_and_refuses_another(tmp_path, monkeypatch):
    ab = _bench("ab_src", monkeypatch)
    overrides = [o for o in tiny_run_overrides(tmp_path / "unused") if not o.startswith("run.dir")]
    assert ab.measure(ROOT / "src", 2, overrides) > 0
    with pytest.raises(SystemExit, match="not from"):  # no ssl_lab there: the child imports the
        ab.measure(tmp_path, 2, overrides)  # installed one, which is not the tree asked for


def test_eval_memory_reports_every_step_and_the_run_still_evaluates(tmp_path, monkeypatch, capsys):
    mem = _bench("eval_memory", monkeypatch)
    run = train(load_config(None, tiny_run_overrides(tmp_path / "r", **{"eval.enabled": False})))
    monkeypatch.setattr(sys, "argv", ["eval_memory.py", str(run), "eval.baselines=false"])
    # main() swaps these for printing wrappers; registering them here restores them afterwards
    for module, names in ((mem.metrics, ("linear_probe", "knn_classify", "rankme", "zero_fraction")),
                          (mem.run, ("features_by_split", "evaluate_encoder", "pixel_baseline"))):
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, name))
    mem.main()
    lines = capsys.readouterr().out.splitlines()
    layers = json.loads((run / "eval.json").read_text())["layers"]
    assert sum(line.startswith("knn_classify(") for line in lines) == len(layers)
    assert sum(line.startswith("linear_probe(") for line in lines) == 2 * len(layers)  # + binarised
    assert lines[-1].startswith("end: rss ") and " MB, peak " in lines[-1]


def _recipe_raw(raw: Path, values: dict[str, tuple[list[float], float]]) -> None:
    """Fake raw files: per candidate, the val top-1 of each seed and a training time."""
    for name, (vals, train_s) in values.items():
        for seed, val in enumerate(vals):
            keep = raw / name / f"seed{seed}"
            keep.mkdir(parents=True)
            summary = {"best_layer": "backbone", "train_s": train_s,
                       "probes_val": {"backbone": val, "proj1": val - 0.02},
                       "probes": {"backbone": val - 0.004, "proj1": val - 0.03},
                       "pixel_probe": 0.84, "random_init_probes": {"stage3": 0.70},
                       "knn_top1": 0.80}
            (keep / "summary.json").write_text(json.dumps(summary))
            layer = {"linear_test": val - 0.004, "knn_test": 0.80, "zero_frac": 0.2,
                     "rankme": 150.0, "binarized_test": 0.83}
            (keep / "eval.json").write_text(json.dumps({
                "best_layer": "backbone", "layers": {"stage3": layer, "backbone": layer},
                "random_init": {"backbone": {"linear_test": 0.55}},
                "pixels": {"linear_test": 0.84, "knn_test": 0.78}}))


@pytest.mark.parametrize("lr_vals, lr_time, chosen", [
    ([0.884, 0.885, 0.886], 125.0, "lr-0.004"),  # +0.5, beyond the stds (0.1): it wins
    ([0.878, 0.885, 0.892], 125.0, "default"),  # +0.5, within its own std (0.7): no change
    ([0.884, 0.885, 0.886], 150.0, "default"),  # wins on val but trains 20 % longer
])
def test_recipe_choice_follows_the_val_rule_and_the_time_limit(tmp_path, monkeypatch, capsys,
                                                              lr_vals, lr_time, chosen):
    recipe = _bench("recipe_select", monkeypatch)
    _recipe_raw(tmp_path, {"default": ([0.879, 0.880, 0.881], 125.0),
                           "views-2x256": ([0.878, 0.879, 0.880], 124.0),
                           "lr-0.004": (lr_vals, lr_time)})
    assert recipe.choose(recipe.load(tmp_path))[0] == chosen
    val = recipe.val_table(tmp_path)
    assert f"Chosen on val: **{chosen}**" in val
    assert "88.00 ± 0.10" in val  # the default's val mean ± std, in percent
    test = recipe.test_table(tmp_path)
    assert f"Chosen recipe: **{chosen}**" in test
    assert test.count("| backbone |") == 3  # one row per seed of the chosen recipe only
    layers = recipe.layers_table(tmp_path).splitlines()
    assert len(layers) == 2 + 2 + 1  # header, rule, two layers, raw pixels
    assert layers[3].startswith("| **backbone** (val-chosen) |") and "| 55.00 |" in layers[3]
    assert layers[2].startswith("| stage3 |") and "| - |" in layers[2]  # no random-init entry
