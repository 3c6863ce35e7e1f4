"""bench/study_rcdm.py and bench/rcdm_tables.py: the docs tables from made-up raw files, and the
study writing (and skipping) its raw files, with every expensive stage stubbed out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tables(bench_script):
    return bench_script("rcdm_tables")


@pytest.fixture
def study(bench_script):
    return bench_script("study_rcdm")


def _record(layer: str, mean: float, median: float, top1: float, top5: float, pix: tuple,
            div: float, loss: float | None, steps: int = 1260) -> dict:
    return {"layer": layer, "train": {"final_loss": loss, "steps": steps},
            "score": {"steps": 25, "diversity": {"mean": div},
                      "retrieval": {"mean_rank": mean, "median_rank": median, "top1": top1,
                                    "top5": top5, "n": 200, "queries": 800,
                                    "chance_mean_rank": 100.5, "chance_top1": 0.005,
                                    "chance_top5": 0.025},
                      "retrieval_pixels": {"mean_rank": pix[0], "top1": pix[1]}}}


RECORDS = {
    "backbone": _record("backbone", 4.21, 2.5, 0.382, 0.764, (7.4, 0.304), 0.0612, 0.01971),
    "projector": _record("proj3", 10.5, 6.0, 0.151, 0.475, (11.2, 0.189), 0.077, 0.0207),
    "random_init": _record("backbone", 21.2, 9.0, 0.129, 0.364, (16.9, 0.13), 0.079, None),
}


def _write(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(record))


def test_study_table_cells(tables, tmp_path):
    keep = tables.raw_dir(tmp_path, 1, 0)
    for name, rec in RECORDS.items():
        _write(keep, f"{name}.json", rec)
    lines = tables.study_table(tmp_path).splitlines()
    assert len(lines) == 5 and lines[0].count("|") == lines[1].count("|") == 12
    assert lines[2] == ("| trained backbone | backbone | **4.2** | **2.5** | **38.2%** | **76.4%** "
                        "| 200 | 100.5 / 0.5% / 2.5% | **7.4** / **30.4%** | 0.061 | 0.0197 |")
    assert lines[3] == ("| trained projector | proj3 (z) | 10.5 | 6.0 | 15.1% | 47.5% | 200 | "
                        "100.5 / 0.5% / 2.5% | 11.2 / 18.9% | 0.077 | 0.0207 |")
    assert lines[4].startswith("| random-init encoder | backbone | 21.2 | 9.0 | 12.9% |")
    assert lines[4].endswith("| 16.9 / 13.0% | 0.079 | - |")  # no final loss recorded


def test_a_missing_conditioning_is_a_row_of_dashes(tables, tmp_path):
    keep = tables.raw_dir(tmp_path, 2, 1)
    _write(keep, "backbone.json", RECORDS["backbone"])
    text = tables.study_table(tmp_path, scale=2, seed=1)
    lines = text.splitlines()
    assert lines[2].startswith("| trained backbone | backbone | 4.2 |")  # alone: nothing bold
    assert "**" not in text
    assert lines[3] == "| trained projector |" + " - |" * 10
    assert lines[4] == "| random-init encoder |" + " - |" * 10
    assert tables.study_table(tmp_path / "nothing").count(" - |") == 30  # no folder at all


def _timings(cpu_min: dict[str, float], wall_min: dict[str, float]) -> dict:
    return {k: {"cpu_s": 60 * cpu_min[k], "wall_s": 60 * wall_min[k]} for k in cpu_min}


def test_cost_table_cells(tables, tmp_path):
    keep = tables.raw_dir(tmp_path)
    for name, rec in RECORDS.items():
        _write(keep, f"{name}.json", rec)
    _write(keep, "encoder.json", {"summary": {"steps": 156}})
    cpu = {"encoder": 2.3, "train_backbone": 8.2, "train_projector": 7.3, "train_random_init": 8.4,
           "score_backbone": 0.5, "score_projector": 0.6, "score_random_init": 0.55,
           "grids_backbone": 0.1, "grids_projector": 0.1, "grids_random_init": 0.1}
    wall = {**cpu, "encoder": 10.2, "score_projector": 8.5}
    _write(keep, "study.json", {"grids": {"n": 8, "k": 4, "steps": 50, "interp": 8},
                                "timings": _timings(cpu, wall),
                                "total_cpu_s": 60 * 28.1, "total_wall_s": 60 * 75.7})
    assert tables.cost_table(tmp_path).splitlines() == [
        "| stage | CPU min | wall min |", "|---|---|---|",
        "| SimCLR encoder (156 steps) | 2.3 | 10.2 |",
        "| RCDM backbone / projector / random-init (1,260 steps each) | 8.2 / 7.3 / 8.4 | "
        "8.2 / 7.3 / 8.4 |",
        "| score (800 samples × 25 DDIM steps + re-encoding), each | 0.5–0.6 | 0.5–8.5 |",
        "| grids (8×4 + 4×8 samples × 50 steps), each | 0.1 | 0.1 |",
        "| **total** | **28.1** | **75.7** |"]


def test_cost_table_with_missing_files(tables, tmp_path):
    keep = tables.raw_dir(tmp_path)
    _write(keep, "backbone.json", RECORDS["backbone"])
    _write(keep, "projector.json", {**RECORDS["projector"], "train": {"steps": 1000}})
    lines = tables.cost_table(tmp_path).splitlines()
    assert lines[2] == "| SimCLR encoder (- steps) | - | - |"
    assert lines[3] == "| RCDM backbone / projector / random-init (- steps) | - / - / - | - / - / - |"
    assert lines[4] == "| score (800 samples × 25 DDIM steps + re-encoding), each | - | - |"
    assert lines[5] == "| grids (-), each | - | - |"
    assert lines[6] == "| **total** | - | - |"


@pytest.fixture
def stubbed(study, monkeypatch):
    """The study's stages replaced by writers of tiny fake outputs; returns the calls made."""
    calls: list[tuple] = []

    def files(run: Path, **named: dict) -> None:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text("seed: 0\n")
        for name, record in named.items():
            (run / f"{name}.json").write_text(json.dumps(record))

    def encoder_stage(run, scale, seed, threads):
        calls.append(("encoder",))
        files(run, summary={"steps": 156, "online_probes": {"backbone": 0.4}})

    def rcdm_stage(run, encoder, layer, random_init, scale, seed, threads):
        calls.append(("train", run.name))
        files(run, summary=RECORDS[run.name.removeprefix("rcdm-")]["train"])

    def score_stage(run):
        calls.append(("score", run.name))
        (run / "score.json").write_text(json.dumps(RECORDS[run.name.removeprefix("rcdm-")]["score"]))

    def grid_stage(run):
        calls.append(("grids", run.name))
        (run / "study_samples").mkdir()
        (run / "study_samples" / "samples.npz").write_bytes(b"")

    for name, fn in [("encoder_stage", encoder_stage), ("rcdm_stage", rcdm_stage),
                     ("score_stage", score_stage), ("grid_stage", grid_stage),
                     ("docs_images", lambda run, name, docs: calls.append(("image", name))),
                     ("z_layer", lambda encoder: "proj3"), ("environment", lambda: {})]:
        monkeypatch.setattr(study, name, fn)
    return calls


def test_raw_files_are_written_and_existing_ones_skipped(study, tables, stubbed, tmp_path):
    out, raw, docs = tmp_path / "runs", tmp_path / "raw", tmp_path / "img"
    keep = study.run_study(1, 0, 1, out, raw, docs)
    assert keep == raw / "scale1" / "seed0"
    assert sorted(p.name for p in keep.iterdir()) == [
        "backbone.json", "encoder.json", "projector.json", "random_init.json", "study.json"]
    assert len(stubbed) == 1 + 4 * 3 and ("image", "projector") in stubbed
    rec = json.loads((keep / "projector.json").read_text())
    assert rec["layer"] == "proj3" and "seed=0" in rec["overrides"]
    assert set(json.loads((keep / "study.json").read_text())["timings"]) == {
        "encoder", *(f"{s}_{c}" for s in ("train", "score", "grids") for c in tables.CONDITIONS)}
    # what was written is what the docs table shows
    assert tables.study_table(raw).splitlines()[3].startswith("| trained projector | proj3 (z) |")

    # every raw file there: nothing runs and nothing is rewritten, even with the runs gone
    before = {p.name: p.read_text() for p in keep.iterdir()}
    (keep / "backbone.json").write_text('{"edited": true}')
    before["backbone.json"] = '{"edited": true}'
    shutil.rmtree(out)
    stubbed.clear()
    study.run_study(1, 0, 1, out, raw, docs)
    assert stubbed == [] and {p.name: p.read_text() for p in keep.iterdir()} == before

    # one conditioning's raw file deleted: only it (and the encoder it needs) is redone
    (keep / "random_init.json").unlink()
    study.run_study(1, 0, 1, out, raw, docs)
    assert stubbed == [("encoder",), ("train", "rcdm-random_init"), ("score", "rcdm-random_init"),
                       ("grids", "rcdm-random_init"), ("image", "random_init")]
    after = {p.name: p.read_text() for p in keep.iterdir()}
    assert all(after[n] == before[n] for n in ("backbone.json", "projector.json", "encoder.json"))
    assert (keep / "random_init.json").is_file()


def test_seed_option_reaches_runs_raw_folder_and_image_names(study, stubbed, tmp_path):
    args = ["--out", str(tmp_path / "runs"), "--raw", str(tmp_path / "raw"),
            "--docs", str(tmp_path / "img")]
    assert study.main(["--seed", "2", *args]) == 0
    keep = tmp_path / "raw" / "scale1" / "seed2"
    assert json.loads((keep / "study.json").read_text())["seed"] == 2
    overrides = json.loads((keep / "backbone.json").read_text())["overrides"]
    assert "seed=2" in overrides and "sample.seed=2" in overrides
    assert "seed=2" in json.loads((keep / "encoder.json").read_text())["overrides"]
    assert (tmp_path / "runs" / "scale1-seed2" / "rcdm-backbone").is_dir()
    assert ("image", "backbone_seed2") in stubbed
    stubbed.clear()
    assert study.main(args) == 0  # the default seed is 0, with the documented image names
    assert (tmp_path / "raw" / "scale1" / "seed0" / "study.json").is_file()
    assert ("image", "backbone") in stubbed
