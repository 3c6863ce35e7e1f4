"""Regenerate the tables in docs from the committed raw result files, or check that they match.

    python bench/report.py            # rewrite every generated table in place
    python bench/report.py --check    # exit 1 (and name them) if a table differs from its raw files

A generated table sits between two markers in a markdown file:

    <!-- report: NAME -->
    | ... the table ... |
    <!-- /report -->

and NAME is one entry of `TABLES`: the function that builds that table from files under docs/
(each run's summary.json / eval.json / config, or a benchmark's JSON). Nothing is trained or
timed here: a table is a pure function of committed files, so anyone can check a number in docs
against the file it came from. A marker whose NAME is not in `TABLES`, or an entry whose marker
is in no document, is an error: a table cannot silently stop being generated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ab_src  # noqa: E402  (sibling scripts: their table functions)
import bench_loader  # noqa: E402
import bench_train  # noqa: E402
import bench_views  # noqa: E402
import eval_scale  # noqa: E402
import infusion_tables  # noqa: E402
import main_job  # noqa: E402
import method_trials  # noqa: E402
import methods_seeds  # noqa: E402
import rcdm_tables  # noqa: E402
import recipe_select  # noqa: E402
import small_conv  # noqa: E402
import study_report  # noqa: E402
import targeted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# the documents that may hold generated tables
DOCUMENTS = (ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted(DOCS.glob("studies/*.md")))

_BLOCK = re.compile(r"(<!-- report: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /report -->)",
                    re.DOTALL)


def _main_job_pair(tag: str) -> Callable[[Path], str]:
    def build(root: Path) -> str:
        where = root / "results" / "main_job"
        return main_job.table([where / f"{tag}_before.json", where / f"{tag}_after.json"])
    return build


def _bench(root: Path, name: str) -> dict:
    return json.loads((root / "bench" / name).read_text())


def _eval_scale(name: str) -> Callable[[Path], str]:
    return lambda root: eval_scale.table(_bench(root, name))


TABLES: dict[str, Callable[[Path], str]] = {
    "main-job-avx2": _main_job_pair("avx2"),
    "main-job-native": _main_job_pair("native"),
    "main-job-protocols": lambda root: main_job.protocols_table(
        root / "results" / "main_job" / "augmented.json",
        root / "results" / "main_job" / "augmented_eval.json"),
    "methods-new-seeds": lambda root: methods_seeds.table(root / "results" / "methods"),
    "methods-new-5min": lambda root: methods_seeds.table(root / "results" / "methods_5min"),
    "method-trials": lambda root: method_trials.table(root / "results" / "method_trials"),
    "recipe-val": lambda root: recipe_select.val_table(root / "results" / "recipe"),
    "recipe-test": lambda root: recipe_select.test_table(root / "results" / "recipe"),
    "main-job-layers": lambda root: recipe_select.layers_table(root / "results" / "recipe"),
    "eval-scale": _eval_scale("eval_scale.json"),
    "loader": lambda root: bench_loader.table({
        name: _bench(root, f"{name}.json")
        for name in ("loader", "loader_s11_run1", "loader_s11_run3")}),
    "eval-scale-blocked-50k": _eval_scale("eval_scale_blocked_50k.json"),
    "train-throughput": lambda root: bench_train.table(_bench(root, "train_throughput_s11.json")),
    "small-conv": lambda root: small_conv.table(_bench(root, "small_conv.json")),
    "dense-build-ab": lambda root: ab_src.table(_bench(root, "dense_build_ab.json"),
                                                a="before (83eb7fb)", b="after"),
    "view-generation": lambda root: bench_views.table(_bench(root, "views.json")),
    # the studies at the cpu scale: docs/studies/*.md and docs/RESULTS.md
    **{name: (lambda root, fn=fn: fn(root / "results" / "studies" / "cpu"))
       for name, fn in study_report.TABLES.items()},
    # 4x the studies' epochs for the claims the studies did not reproduce (docs/RESULTS.md)
    **{f"targeted-{name}": (lambda root, name=name: targeted.table(
        root / "results" / "targeted", root / "results" / "studies" / "cpu", name))
       for name in targeted.EXPERIMENTS},
    **{name: (lambda root, fn=fn: fn(root / "results" / "infusion"))
       for name, fn in infusion_tables.TABLES.items()},
    "rcdm-study": lambda root: rcdm_tables.study_table(root / "results" / "rcdm"),
    "rcdm-cost": lambda root: rcdm_tables.cost_table(root / "results" / "rcdm"),
}


def render(text: str, docs: Path = DOCS) -> str:
    """`text` with every marked table rebuilt from the raw files under `docs`."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in TABLES:
            raise SystemExit(f"unknown generated table {name!r}; known: {', '.join(TABLES)}")
        return f"{match[1]}{TABLES[name](docs).rstrip()}\n{match[4]}"
    return _BLOCK.sub(fill, text)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(documents: tuple[Path, ...] = DOCUMENTS, docs: Path = DOCS, check: bool = False
           ) -> list[str]:
    """Rebuild (or with `check`, compare) the tables of `documents`; returns the problems: the
    documents whose tables differ from their raw files, and tables no document holds."""
    problems, seen = [], set()
    for path in documents:
        text = path.read_text()
        seen.update(m["name"] for m in _BLOCK.finditer(text))
        new = render(text, docs)
        if new != text:
            if check:
                changed = [m["name"] for m, n in zip(_BLOCK.finditer(text), _BLOCK.finditer(new),
                                                     strict=True) if m["body"] != n["body"]]
                problems.append(f"{_shown(path)}: {', '.join(changed)} "
                                "differ from the raw files (run python bench/report.py)")
            else:
                path.write_text(new)
    problems += [f"table {name!r} is in no document" for name in TABLES if name not in seen]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a table differs from its raw files")
    args = parser.parse_args(argv)
    problems = report(check=args.check)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("every generated table matches its raw files" if args.check
              else f"{len(TABLES)} tables written")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
