"""bench/study_infusion.py and bench/infusion_tables.py: the docs tables are the right statistics
of the raw files, and the study resumes without redoing a run (no training here: stubs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tables(bench_script):
    return bench_script("infusion_tables")


@pytest.fixture
def study(bench_script):
    return bench_script("study_infusion")


def fake_record(data, variant, seed, *, parzen=0.0, sigma=0.2, bound=0.0, chain=0.0,
                infusion=0.0, std=0.02, pick="chain", prior=(-10.0, 0.25, 38.0), train_s=10.0,
                epochs=30, tight=None, trace=None, k_sweep=None) -> dict:
    """A raw file as the study writes it, with made-up numbers."""
    record = {
        "dataset": data, "variant": variant, "seed": seed, "scale": 0.1, "epochs": epochs,
        "train_s": train_s, "trace": trace or [],
        "score": {"chain": {"parzen": {"test_ll": parzen, "sigma": sigma},
                            "bound": {"test_bound": bound, "picked_on_val": pick,
                                      "chain": {"test": chain},
                                      "infusion": {"test": infusion, "std": std}}},
                  "prior": {"parzen": {"test_ll": prior[0], "sigma": prior[1]},
                            "exact_ll": prior[2]}}}
    if tight is not None:  # (own chain, infusion proposal, prior exact on the same images)
        record["tight"] = {"chain": {"test": tight[0]}, "infusion": {"test": tight[1]},
                           "prior_exact_same_images": tight[2]}
    if k_sweep is not None:
        record["k_sweep"] = k_sweep
    return record


def write(raw: Path, *records: dict) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    for r in records:
        (raw / f"{r['dataset']}-{r['variant']}-s{r['seed']}.json").write_text(json.dumps(r))
    return raw


def row(table: str, first: str) -> list[str]:
    """The cells of the row whose first cell is `first`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first:
            return cells[1:]
    raise AssertionError(f"no row {first!r} in\n{table}")


# ----------------------------------------------------------------------------- tables


def test_main_table_is_mean_and_sample_std_over_the_seeds_found(tables, tmp_path):
    raw = write(tmp_path / "raw",
                *[fake_record("digits", "infusion", s, parzen=p, bound=b, chain=b, infusion=i,
                              prior=(pp, 0.25, 38.4), train_s=t)
                  for s, p, b, i, pp, t in ((0, 1, 10, 5, -10, 10), (1, 2, 20, 5, -12, 20),
                                            (2, 3, 30, 8, -14, 30))],
                # seed 1 missing; α = 0: the infusion proposal is the chain, bounds equal
                *[fake_record("digits", "alpha0", s, parzen=p, sigma=sg, bound=7, chain=7,
                              infusion=7) for s, p, sg in ((0, -1, 0.25), (2, -3, 0.32))],
                fake_record("digits", "T20", 0, parzen=7.5, bound=4, chain=4, infusion=-90,
                            pick="chain"),
                fake_record("fashion-mnist", "infusion", 0, parzen=99))
    table = tables.main_table(raw, "digits")
    assert row(table, "prior alone") == ["3", "−12.0 ± 2.0", "0.25", "38.4 ± 0.0 (exact)",
                                         "–", "–", "–"]
    assert row(table, tables.LABELS["infusion"]) == [
        "3", "2.0 ± 1.0", "0.20", "20.0 ± 10.0", "chain", "6.0 ± 1.7 (0.02)", "20"]
    assert row(table, "alpha0 (ablation)") == ["2", "−2.0 ± 1.4", "0.25, 0.32", "7.0 ± 0.0",
                                              "same (α=0)", "7.0 ± 0.0", "10"]
    assert row(table, "T20")[:6] == ["1", "7.5", "0.20", "4.0", "chain", "−90.0 (0.02)"]
    assert "T5" not in table and "99" not in table  # no runs; another dataset's run
    assert tables.main_table(raw, "fashion-mnist").count("\n") == 3  # head, rule, prior, 1 row


def test_tight_table_and_a_variant_without_runs(tables, tmp_path):
    raw = write(tmp_path / "raw", *[
        fake_record("digits", "infusion", s, tight=t)
        for s, t in ((0, (50, 30, 38.4)), (1, (52, 31, 38.4)), (2, (54, 35, 38.4)))])
    table = tables.tight_table(raw, "digits")
    assert row(table, "infusion") == ["52.0 ± 2.0", "32.0 ± 2.6", "38.4 ± 0.0"]
    assert "alpha0" not in table
    assert tables.tight_table(tmp_path / "nothing", "digits").count("\n") == 1  # the head only


def test_k_table_mean_median_and_a_missing_sweep(tables, tmp_path):
    bounds = [{"proposal": p, "K": k, "mean": m, "median": md}
              for p, k, m, md in (("chain", 1, 21.04, 36.9), ("chain", 10, 48.7, 53.2),
                                  ("infusion", 1, -1.1, 15.1))]  # infusion K=10 missing
    sweep = {"n": 100, "std": 0.02, "bounds": bounds, "prior_exact": 38.3}
    raw = write(tmp_path / "raw", fake_record("digits", "infusion", 0, k_sweep=sweep))
    table = tables.k_table(raw, "digits")
    assert row(table, "proposal") == ["K = 1", "K = 10"]
    assert row(table, "own chain") == ["21.0 (36.9)", "48.7 (53.2)"]
    assert row(table, "infusion") == ["−1.1 (15.1)", "–"]
    assert row(table, "prior exact, same images") == ["38.3", "38.3"]
    assert "prior exact" not in tables.k_table(raw, "fashion-mnist")


def test_long_table_takes_the_gap_per_seed(tables, tmp_path):
    trace = [[1, -50.0, -60.0], [120, 55.0, 35.0]]
    raw = write(tmp_path / "raw",
                fake_record("digits", "infusion-4x", 0, epochs=120, parzen=10, train_s=90,
                            tight=(50, 40, 38), trace=trace),
                fake_record("digits", "infusion-4x", 1, epochs=120, parzen=12, train_s=110,
                            tight=(60, 40, 38), trace=[[120, 57.0, 37.0]]),
                fake_record("digits", "infusion", 0, tight=(50, 35, 38)),
                fake_record("digits", "T5", 0, tight=(1, 1, 1)))
    table = tables.long_table(raw)
    # gaps 10 and 20: 15 ± 7.1 (not the difference of the two columns' spreads)
    assert row(table, "infusion-4x") == ["120", "2", "11.0 ± 1.4", "55.0 ± 7.1", "40.0 ± 0.0",
                                         "15.0 ± 7.1", "38.0 ± 0.0", "56.0 ± 1.4 / 36.0 ± 1.4",
                                         "100"]
    assert row(table, "infusion")[:7] == ["30", "1", "0.0", "50.0", "35.0", "15.0", "38.0"]
    assert "alpha0" not in table and "T5" not in table


def test_trace_table_rows_where_an_epoch_was_logged(tables, tmp_path):
    raw = write(tmp_path / "raw", *[
        fake_record("digits", "infusion-4x", s, trace=[[1, -56.0 + s, -70.0], [30, 44.0 + 2 * s,
                                                                                   20.0]])
        for s in (0, 1)], fake_record("digits", "alpha0-4x", 0, trace=[[1, 30.0, 30.0]]))
    table = tables.trace_table(raw)
    assert row(table, "epoch") == ["infusion-4x: own chain", "infusion-4x: infusion proposal",
                                   "alpha0-4x: own chain", "alpha0-4x: infusion proposal"]
    assert row(table, "1") == ["−55.5 ± 0.7", "−70.0 ± 0.0", "30.0", "30.0"]
    assert row(table, "30") == ["45.0 ± 1.4", "20.0 ± 0.0", "–", "–"]
    assert "| 5 |" not in table and "| 120 |" not in table


def test_every_table_has_one_marker_in_the_infusion_page(tables):
    names = re.findall(r"<!-- report: (infusion[\w.-]*) -->", (ROOT / "docs" / "infusion.md")
                       .read_text())
    assert sorted(names) == sorted(tables.TABLES)


# ----------------------------------------------------------------------------- the study


def test_the_targeted_runs_are_the_main_runs_trained_four_times_longer(study):
    long = study.plan("long", ["digits"])
    assert {(p.data, p.variant) for p in long} == {("digits", "infusion-4x"),
                                                    ("digits", "alpha0-4x")}
    assert sorted(p.seed for p in long) == [0, 0, 1, 1, 2, 2]
    assert len(study.plan("main", ["digits"])) == 18
    short = study.run_overrides(study.Point("digits", "alpha0", 1), 0.1)
    four = study.run_overrides(study.Point("digits", "alpha0-4x", 1), 0.1)
    assert four.pop("train.epochs") == 4 * short.pop("train.epochs") == 120
    assert four == short and four["infusion.alpha0"] == 0.0 and four["seed"] == 1


@pytest.fixture
def stubs(study, monkeypatch):
    """Training, scoring, the K sweep and the sample grids replaced by recorders that write what
    the real ones would (summary.json, metrics.jsonl, score files)."""
    calls: list[tuple[str, str]] = []

    def train_infusion(cfg):
        run = Path(cfg.run.dir)
        calls.append(("train", run.name))
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps({
            "epochs": cfg.train.epochs, "steps": 10 * cfg.train.epochs, "train_time_s": 1.5,
            "stopped_by_budget": False}))
        records = [{"epoch": 1.0, "val_bound": -9.0, "val_bound_infusion": -9.5},
                   {"epoch": 1.5, "loss": 1.0},
                   {"epoch": 1.0, "val_bound": -8.0, "val_bound_infusion": -8.5}]  # resumed
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    def score_run(run_dir, overrides, out_name):
        calls.append((out_name, run_dir.name))
        report = fake_record("digits", "x", 0)["score"] | {"score_s": 0.1}
        report["chain"]["bound"]["K"] = len(overrides)
        (run_dir / out_name).write_text(json.dumps(report))
        return report

    monkeypatch.setattr(study, "train_infusion", train_infusion)
    monkeypatch.setattr(study, "score_run", score_run)
    monkeypatch.setattr(study, "k_sweep", lambda run_dir, ks: calls.append(("sweep", run_dir.name))
                        or {"bounds": [], "ks": list(ks)})
    monkeypatch.setattr(study, "save_grids", lambda run_dir, *a: calls.append(("grids", run_dir.name)))
    return calls


def test_a_second_invocation_redoes_nothing_and_a_lost_raw_file_is_rebuilt_from_the_run(
        study, stubs, tmp_path):
    points = [study.Point("digits", "infusion", 0), study.Point("digits", "T5", 1),
              study.Point("digits", "alpha0-4x", 2)]
    out, raw, img = tmp_path / "runs", tmp_path / "raw", tmp_path / "img"
    study.study(points, out, raw, 0.1, img)
    assert sorted(stubs) == sorted([
        ("train", "digits-infusion-s0"), ("score.json", "digits-infusion-s0"),
        ("score_tight.json", "digits-infusion-s0"), ("sweep", "digits-infusion-s0"),
        ("grids", "digits-infusion-s0"),
        ("train", "digits-T5-s1"), ("score.json", "digits-T5-s1"),
        ("train", "digits-alpha0-4x-s2"), ("score.json", "digits-alpha0-4x-s2"),
        ("score_tight.json", "digits-alpha0-4x-s2")])
    long = json.loads((raw / "digits-alpha0-4x-s2.json").read_text())
    assert (long["variant"], long["seed"], long["epochs"], long["scale"]) == ("alpha0-4x", 2, 120,
                                                                              0.1)
    assert long["overrides"]["infusion.alpha0"] == 0.0 and "run.dir" not in long["overrides"]
    assert long["trace"] == [[1, -8.0, -8.5]]  # the later record of a logged-twice epoch
    assert long["tight"]["K"] == 3  # K=100, 359 images, s=0.02
    assert "k_sweep" not in long and "tight" not in json.loads((raw / "digits-T5-s1.json")
                                                               .read_text())
    stubs.clear()
    study.study(points, out, raw, 0.1, img)
    assert stubs == []
    (raw / "digits-infusion-s0.json").unlink()
    study.study(points, out, raw, 0.1, img)
    # trained and scored already: only the uncached parts run again
    assert sorted(stubs) == [("grids", "digits-infusion-s0"), ("sweep", "digits-infusion-s0")]
    assert (raw / "digits-infusion-s0.json").is_file()


def test_an_existing_raw_file_skips_the_run_unless_its_scale_differs(study, stubs, tmp_path):
    raw = write(tmp_path / "raw", fake_record("digits", "T20", 0))
    point = study.Point("digits", "T20", 0)
    assert study.run_point(point, tmp_path / "runs", raw, 0.1, tmp_path)["variant"] == "T20"
    assert stubs == [] and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match="--raw"):
        study.run_point(point, tmp_path / "runs", raw, 1.0, tmp_path)
