"""`ssl-lab sweep`: a grid of ordinary runs, one table, a few plots.

    ssl-lab sweep [CONFIG.yaml] model.last_width=[32,128,512] seed=[0,1] train.epochs=5 [out=DIR]

Every list-valued override (`key=[a,b,c]`, read as YAML) is a grid axis; the grid is the
cartesian product of the axes (first axis slowest); plain `key=value` applies to every point.
Each point is an ordinary run directory `DIR/<key1=v1,key2=v2>`, so everything that works on a
run (eval, export, RCDM) works on a point.

- Every point's config is validated before the first point runs: a bad value in point 7 must
  not surface after hours of points 1-6.
- `DIR/sweep.json` records the base config (its contents, not only its path, so editing the YAML
  later cannot silently change a continued sweep), the fixed overrides and the grid. Re-running
  the same command, or `ssl-lab sweep out=DIR` alone, continues it: finished points (with
  `summary.json`) are skipped, interrupted ones resume from their checkpoint.
- `DIR/sweep.csv`, `DIR/sweep.md` (one row per point) and `DIR/plots/<metric>_vs_<key>.png`
  (mean ± sample std over the other axes, e.g. seeds) are rebuilt after every point
  (sweep_report.py); `assemble(DIR)` rebuilds them alone, also for a plain directory of runs
  without sweep.json (the axes are then the config keys whose values differ between the runs).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_lab.config import Config, validate
from ssl_lab.config_io import (
    from_dict,
    parse_override,
    pop_options,
    read_yaml,
    set_dotted,
    short,
    split_config_args,
)
from ssl_lab.errors import UserError
from ssl_lab.sweep_report import (
    RESERVED,
    SWEEP_FILE,
    UNSAFE_CHARS,
    assemble,
    format_value,
    point_status,
    read_sweep_file,
    write_text,
)

# ----------------------------------------------------------------------------- the grid


@dataclass
class Sweep:
    base: dict[str, Any]  # the YAML config tree the points start from
    config_path: str | None
    fixed: dict[str, Any]  # applied to every point
    grid: dict[str, list[Any]]  # axis -> values, in the order given

    def points(self) -> list[dict[str, Any]]:
        """Cartesian product of the axes, first axis slowest; [{}] when nothing is swept."""
        keys = list(self.grid)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(self.grid[k] for k in keys))]

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "config": self.config_path, "base": self.base, "fixed": self.fixed,
                "grid": [[k, v] for k, v in self.grid.items()],
                "points": [{"name": point_name(p), "values": p} for p in self.points()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sweep:
        return cls(data["base"], data.get("config"), data["fixed"], dict(data["grid"]))

    def same_as(self, other: Sweep) -> bool:
        return self._canonical() == other._canonical()

    def _canonical(self) -> str:
        # through JSON: what sweep.json stores is what a continued sweep will run
        return json.dumps([self.base, self.fixed, list(self.grid.items())], sort_keys=True)


def parse_grid(overrides: list[str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """`key=value` → fixed, `key=[a,b]` → axis. A list that is itself a value is written as a
    list of lists (`key=[[1,2],[3]]` sweeps over the values [1,2] and [3])."""
    fixed: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key in RESERVED:
            raise UserError(f"'{key}' is set by the sweep for each point; use out=DIR to choose "
                            "where the points go")
        if key in fixed or key in grid:
            raise UserError(f"config key '{key}' is given twice; give it once (a list sweeps it)")
        if not isinstance(value, list):
            fixed[key] = value
            continue
        if not value:
            raise UserError(f"'{text}' sweeps over an empty list; give at least one value")
        shown = [format_value(v) for v in value]
        if len(set(shown)) != len(shown):
            raise UserError(f"'{text}' repeats a value; each value of an axis must be distinct")
        grid[key] = value
    return fixed, grid


def point_name(point: dict[str, Any]) -> str:
    """`key1=v1,key2=v2`, made filesystem-safe. Names that had to change (a '/' in a path, a
    list value) or are too long get a hash of the exact text, so two points never collide and
    the same point gets the same name on every re-run."""
    raw = ",".join(f"{k}={format_value(v)}" for k, v in point.items()) or "default"
    safe = UNSAFE_CHARS.sub("_", raw)
    if safe == raw and len(raw) <= 120 and not raw.startswith("."):
        return raw
    return f"{safe[:100].lstrip('.')}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------- validation


def point_config(sweep: Sweep, point: dict[str, Any], run_dir: Path) -> Config:
    """The validated config of one point: the base tree, the fixed overrides, the point's values."""
    tree = copy.deepcopy(sweep.base)
    values = {**sweep.fixed, **point}
    for key, value in values.items():
        set_dotted(tree, key, copy.deepcopy(value))
    set_dotted(tree, "run.dir", str(run_dir))
    if "run.name" not in values:
        set_dotted(tree, "run.name", run_dir.name)
    cfg = from_dict(tree, Config)
    validate(cfg)
    check_names(cfg)
    return cfg


def check_names(cfg: Config) -> None:
    """The checks `validate` leaves to the registries (method, backbone, projector, views,
    precision): cheap, so every point is checked before any trains."""
    from ssl_lab.data.views import get_recipe
    from ssl_lab.methods import get_method
    from ssl_lab.models import BACKBONES, parse_projector_spec
    from ssl_lab.runtime import pick_device, resolve_precision

    get_method(cfg.method.name)
    if cfg.model.backbone not in BACKBONES:
        raise UserError(f"unknown model.backbone {short(cfg.model.backbone)}; choose one of "
                        f"{', '.join(BACKBONES)}")
    parse_projector_spec(cfg.model.projector)
    get_recipe(cfg.views.recipe, **cfg.views.recipe_options())
    resolve_precision(cfg.train.precision, pick_device())


def check_data(configs: list[Config]) -> None:
    """Load each distinct dataset once (missing files fail now, not at point 7); cheap next to
    training, and the memory is released before the first point starts."""
    from ssl_lab.data.sources import load_dataset

    seen = set()
    for cfg in configs:
        key = (cfg.data.name, cfg.data.root, cfg.data.target)
        if key not in seen:
            seen.add(key)
            load_dataset(cfg.data.name, cfg.data.root, val_fraction=cfg.data.val_fraction,
                         seed=cfg.seed).select_target(cfg.data.target)


def validate_all(sweep: Sweep, out: Path) -> list[tuple[str, Config]]:
    """(name, config) of every point, all checked (configs, names, data) before any runs."""
    named = []
    for point in sweep.points():
        name = point_name(point)
        try:
            named.append((name, point_config(sweep, point, out / name)))
        except UserError as exc:
            raise UserError(f"sweep point '{name}': {exc}; nothing was run") from None
    if len({name for name, _ in named}) != len(named):  # only with '=' or ',' inside values
        raise UserError("two sweep points get the same directory name; avoid ',' and '=' in "
                        "swept values")
    check_data([cfg for _, cfg in named])
    return named


# ----------------------------------------------------------------------------- running


def load_sweep(out: Path, config_path: str | None, overrides: list[str]) -> Sweep:
    """The sweep to run: the one given on the command line, or the one recorded in `out`."""
    stored_path = out / SWEEP_FILE
    stored = Sweep.from_json(read_sweep_file(stored_path)) if stored_path.is_file() else None
    if config_path is None and not overrides:
        if stored is None:
            raise UserError(f"nothing to sweep: give key=[a,b,...] overrides, or out=DIR of an "
                            f"existing sweep (no {stored_path})")
        return stored
    base = read_yaml(config_path) if config_path else {}
    fixed, grid = parse_grid(overrides)
    sweep = Sweep(base, str(config_path) if config_path else None, fixed, grid)
    if stored is not None and not sweep.same_as(stored):
        raise UserError(f"{out} holds a different sweep (see {stored_path}); continue it with "
                        f"`ssl-lab sweep out={out}` or choose another out=")
    return sweep


def run_sweep(out: Path, config_path: str | None = None, overrides: list[str] = (),
              train_fn=None) -> list[dict[str, Any]]:
    """Validate every point, then run the unfinished ones in order; returns the table rows.
    `train_fn` (default `ssl_lab.train_loop.train`) lets tests count calls without training."""
    if train_fn is None:
        from ssl_lab.train_loop import train as train_fn
    out = Path(out)
    sweep = load_sweep(out, config_path, list(overrides))
    named = validate_all(sweep, out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / SWEEP_FILE, json.dumps(sweep.to_json(), indent=1))
    failed = {}
    for i, (name, cfg) in enumerate(named, 1):
        failure = run_point(name, cfg, out / name, f"[sweep {i}/{len(named)}]", train_fn)
        if failure:
            failed[name] = failure
        assemble(out, plots=False)  # the table is current even if the sweep is interrupted
    rows = assemble(out)
    print(f"sweep: {out / 'sweep.md'}  {out / 'sweep.csv'}  plots: {out / 'plots'}")
    if failed:
        first = next(iter(failed.items()))
        raise UserError(f"{len(failed)} of {len(named)} sweep points failed (first: {first[0]}: "
                        f"{first[1]}); fix the cause and run `ssl-lab sweep out={out}` to "
                        "retry them (finished points are kept)")
    return rows


def run_point(name: str, cfg: Config, run_dir: Path, tag: str, train_fn) -> str | None:
    """Train one point (or skip/resume it); a UserError (NaN loss...) fails this point only."""
    status = point_status(run_dir)
    if status == "done":
        print(f"{tag} {name}: finished, skipped")
        return None
    if status == "stale":
        shutil.rmtree(run_dir)
    cfg.resume = status == "partial"
    print(f"{tag} {name}: {'resuming' if cfg.resume else 'training'}", flush=True)
    try:
        train_fn(cfg)
    except UserError as exc:
        print(f"{tag} {name}: failed: {exc}")
        return str(exc)
    return None


# ----------------------------------------------------------------------------- command line


def cmd_sweep(ns: argparse.Namespace) -> None:
    """`ssl-lab sweep`: run (or continue) a sweep, or with run=false only rebuild its tables."""
    from ssl_lab.runtime import utc_stamp

    options, args = pop_options(ns.args, {"out": None, "run": True}, "sweep")
    if not options["run"]:
        if not options["out"]:
            raise UserError("run=false needs out=DIR (the sweep to tabulate)")
        assemble(options["out"])
        print(f"sweep: {Path(options['out']) / 'sweep.md'}")
        return
    config_path, overrides = split_config_args(args)
    out = Path(options["out"]) if options["out"] else Path("sweeps") / utc_stamp()
    run_sweep(out, config_path, overrides)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `sweep` on the CLI's subcommands."""
    p = sub.add_parser("sweep", help="run a grid of runs (key=[a,b,c]) and tabulate/plot them")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=[a,b,...] ...] [key=value ...] "
                   "[out=DIR: the sweep directory (default sweeps/<UTC time>); given alone, it "
                   "continues the sweep recorded there] [run=false: only rebuild sweep.csv, "
                   "sweep.md and plots/ of out=DIR]")
    p.set_defaults(func=cmd_sweep)
