"""bench/report.py: every generated table in docs equals what its committed raw files give."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_generated_table_in_docs_matches_its_raw_files(report, capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().err
    assert report.TABLES  # and each of them sits in a document (else check reports it)


def _copy_docs(tmp_path: Path) -> tuple[Path, Path]:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs" / "results", docs / "results")
    shutil.copytree(ROOT / "docs" / "bench", docs / "bench")
    page = docs / "RESULTS.md"
    shutil.copy(ROOT / "docs" / "RESULTS.md", page)
    return docs, page


def test_check_names_a_table_that_no_longer_matches_and_write_restores_it(report, tmp_path):
    docs, page = _copy_docs(tmp_path)
    kw = dict(documents=(page,), docs=docs)
    good = page.read_text()
    # a number in the table moved by hand: the check must see it
    page.write_text(good.replace("| after-avx2 | 295 s |", "| after-avx2 | 290 s |"))
    problems = report.report(check=True, **kw)
    line = next(p for p in problems if "RESULTS.md" in p)
    assert "main-job-avx2" in line and "main-job-native" not in line
    report.report(**kw)  # regenerate
    assert page.read_text() == good


def test_a_changed_raw_file_changes_the_table(report, tmp_path):
    docs, page = _copy_docs(tmp_path)
    raw = docs / "results" / "main_job" / "native_after.json"
    record = json.loads(raw.read_text())
    record["wall_s"] = 299.4
    raw.write_text(json.dumps(record))
    problems = report.report(documents=(page,), docs=docs, check=True)
    assert any("main-job-native" in p for p in problems), problems
    report.report(documents=(page,), docs=docs)
    assert "| after | 299 s |" in page.read_text()


def test_unknown_table_names_and_tables_in_no_document_are_errors(report, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- report: no-such-table -->\n| a |\n<!-- /report -->\n")
    with pytest.raises(SystemExit, match="no-such-table"):
        report.report(documents=(page,), check=True)
    page.write_text("no tables here\n")
    problems = report.report(documents=(page,), check=True)
    assert {p.split("'")[1] for p in problems} == set(report.TABLES)
