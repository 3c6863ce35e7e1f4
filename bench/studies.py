"""The layer / width / cheap-SSL studies (docs/RESULTS.md, "Studies"; tables in docs/studies/):
their definitions (the scales, STUDIES, their runs), running, freezing and the command line;
`report`'s tables and plots are in bench/study_report.py.

    python bench/studies.py run     [--scale cpu|gpu] [--seeds 3] [--worker 0/2] [--out runs/studies]
    python bench/studies.py collect [--scale cpu|gpu] [--seeds 3] [--out runs/studies] [--raw RAW]
    python bench/studies.py report  [--scale cpu|gpu] [--seeds 3] [--raw RAW] [--docs docs/studies]
    python bench/studies.py freeze  [--scale cpu|gpu]
    python bench/studies.py list    [--scale cpu|gpu] [--seeds 3]

(RAW: docs/results/studies, the committed raw-results folder.)

Every study run's protocol is frozen: bench/study_protocols/<scale>/<run>.yaml holds every key
of the config, as a run directory's config.yaml does, except seed and run.dir. `run` builds a
run's config from that file alone plus `seed=` and `run.dir=` (an extra evaluation adds its own
overrides), so neither configs/*.yaml nor ssl_lab.config's defaults, which both move, change a
study, and a file that lacks a key of today's config schema stops `run` rather than take the
key's default. Bit-exact numbers also need the code the published runs used (the git revision
in each raw run's env.json) and one thread per run: both set the order of float sums.

`freeze` (re)writes those files from the published protocol: bench/study_protocols/
published_defaults.yaml (the defaults of commit 26957dd, which the published runs used, and
every key added since at the value that reproduces them) <- configs/<method>.yaml <- the scale
<- the run's overrides, with views at the image size (26957dd's `views.size=0`). Re-freezing is a
deliberate step: a new config key first needs its value in published_defaults.yaml (freeze and
tests/test_studies.py fail until then); review the diff of the frozen files before committing.

`run` trains every run the studies need (each an ordinary run directory under --out, shared
between studies: the SimCLR baseline serves the Guillotine, width and cheap-SSL tables) and
the extra evaluations (transfer to digits, one per shapes factor). Finished runs and evals are
skipped and interrupted runs resume, so the command continues where it stopped. Runs are
ordered seed by seed, so an early stop leaves every study with the same, complete seeds.
`--worker i/n` takes every n-th run from the i-th: n processes split the work (one thread each
at the cpu scale). Each finished run's small files (summary.json, config.yaml, metrics.jsonl,
env.json with the git revision, evals/*.json: no weights) are copied to the raw-results
folder, --raw/<scale>/<run>-s<seed>/, which is committed; `collect` copies them for runs that
finished elsewhere. The tables in docs/studies/*.md and docs/RESULTS.md are built from that
folder by `python bench/report.py` (bench/study_report.py's TABLES); `report` draws the
plots (docs/studies/img) from it.

`--scale cpu` is sized for a 2-core CPU (1/8-width ResNet-18, a 20k-image subset, 3 epochs);
`--scale gpu` is the full-size version (full-width ResNet-18, every image, 100 epochs).
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

from ssl_lab.eval.run import dataset_tag

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "results" / "studies"  # <scale>/<run>-s<seed>/: committed raw files
RAW_FILES = ("summary.json", "config.yaml", "metrics.jsonl", "env.json")  # + evals/*.json
SCALES = {
    "cpu": (
        "model.width=0.125",
        "data.fraction=0.37",
        "eval.train_fraction=0.37",
        "train.epochs=3",
        "train.threads=1",
    ),
    "gpu": (
        "model.width=1.0",
        "data.fraction=1.0",
        "eval.train_fraction=1.0",
        "train.epochs=100",
        "optim.warmup_epochs=10",
    ),
}
TRANSFER = ("data.name=digits",)
SHAPES_FACTORS = ("shape", "colour", "x", "y", "scale")
WIDTHS = (32, 128, 512, 2048)
NOISE_STDS = (0.1, 0.4)
PROJ_DIMS = (16, 256)
PROTOCOLS = ROOT / "bench" / "study_protocols"  # <scale>/<run name>.yaml: frozen, complete
PUBLISHED_DEFAULTS = PROTOCOLS / "published_defaults.yaml"  # what freeze starts from
PER_RUN = ("seed", "run.dir")  # set by `run` for each seed; in no frozen file
# `views.size=0` meant the dataset's own image size at 26957dd (Fashion-MNIST's default view
# size is 20 px since): freeze writes the size out
IMAGE_SIZES = {"fashion-mnist": 28, "shapes": 32}
NO_BASELINES = ("eval.baselines=false",)  # their random-init floor is the SimCLR architecture's


@dataclass(frozen=True)
class Run:
    """One training run: its protocol's name (PROTOCOLS/<scale>/<name>.yaml), the config and
    overrides that protocol was frozen from, the extra `ssl-lab eval` override lists it needs
    and, once seeded, its seed."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    evals: tuple[tuple[str, ...], ...] = ()
    seed: int | None = None

    @property
    def dir_name(self) -> str:
        """The run directory's name: <name>-s<seed>."""
        return f"{self.name}-s{self.seed}"

    def seeded(self, seed: int) -> Run:
        return replace(self, seed=seed)


def _barlow(d: int, scaled: bool, views: int = 2, fraction: float | None = None) -> Run:
    """multiview_barlow with the fastssl projector of width d; beta fixed at the d=64 value of
    Ghosh et al. (0.04) or scaled as 0.04 * 64 / d."""
    name = f"mvbarlow-d{d}-{'scaled' if scaled else 'fixed'}-v{views}" + (f"-f{fraction}" if fraction else "")
    extra = (f"data.fraction={fraction}",) if fraction else ()
    return Run(
        name,
        "multiview_barlow",
        (
            f"model.projector={d}n-{d}",
            f"views.n={views}",
            f"method.beta_scaling={'inverse_dim' if scaled else 'none'}",
            *extra,
            *NO_BASELINES,
        ),
    )


# the SimCLR baseline (last_width 512 in the published protocol) doubles as the width study's 512 point
SIMCLR = Run("simclr", "simclr", ("eval.mlp=true",), evals=(TRANSFER,))
STUDIES: dict[str, list[Run]] = {
    # Guillotine Regularization: per-layer probes in and out of distribution; weak vs strong
    # views; label positives
    "guillotine": [
        SIMCLR,
        Run("vicreg", "vicreg", evals=(TRANSFER,)),
        Run("simclr-weak", "simclr", ("views.recipe=weak",), evals=(TRANSFER,)),
        Run("supcon", "supcon", evals=(TRANSFER,)),
        # per-factor probes skip the baselines (5 more cold evaluations per seed); the run's own
        # evaluation (default target: shape) has them
        Run(
            "simclr-shapes",
            "simclr",
            ("data.name=shapes", "data.fraction=1.0"),
            evals=tuple((f"data.target={f}", *NO_BASELINES) for f in SHAPES_FACTORS),
        ),
    ],
    # Expand or Narrow: last_width with the projector fixed, SSL and supervised
    "width": [
        *(
            Run(f"simclr-lw{w}", "simclr", (f"model.last_width={w}", "eval.mlp=true"), evals=(TRANSFER,))
            if w != 512
            else SIMCLR
            for w in WIDTHS
        ),
        *(
            Run(
                f"supervised-lw{w}",
                "supervised",
                (f"model.last_width={w}", "eval.mlp=true"),
                evals=(TRANSFER,),
            )
            for w in WIDTHS
        ),
    ],
    # Democratizing JE-SSL (one negative, noise-only views, small batches) and small projectors
    # with more views (Ghosh et al. 2024: projector width, views vs data)
    "cheap": [
        SIMCLR,
        Run("simclr-neg1", "simclr", ("method.negatives=1",)),
        *(
            Run(f"simclr-noise{s}", "simclr", ("views.recipe=noise", f"views.noise_std={s}"))
            for s in NOISE_STDS
        ),
        Run("simclr-b32", "simclr", ("optim.batch_size=32",)),
        *(_barlow(d, scaled) for d in PROJ_DIMS for scaled in (False, True)),
        _barlow(256, True, views=2),
        _barlow(256, True, views=4, fraction=0.185),
    ],
}


def protocol_runs() -> list[Run]:
    """Every distinct run, unseeded: one frozen protocol each."""
    unique: dict[str, Run] = {}
    for runs in STUDIES.values():
        for run in runs:
            unique.setdefault(run.name, run)
    return list(unique.values())


def all_runs(seeds: int) -> list[Run]:
    """Every distinct run, seed by seed (seed 0 of every study first)."""
    return [run.seeded(seed) for seed in range(seeds) for run in protocol_runs()]


# ----------------------------------------------------------------------------- running


def eval_tag(overrides: tuple[str, ...], cfg_path: Path) -> str:
    from ssl_lab.config import load_config

    cfg = load_config(cfg_path, list(overrides))
    return dataset_tag(cfg.data.name, cfg.data.target)


def protocol_path(run: Run, scale: str) -> Path:
    return PROTOCOLS / scale / f"{run.name}.yaml"


def study_config(run: Run, out: Path, scale: str):
    """The seeded run's config: its frozen protocol, `seed=` and `run.dir=`, nothing else."""
    from ssl_lab.config import load_config

    path = protocol_path(run, scale)
    fix = (f"give the key its published value in {_shown(PUBLISHED_DEFAULTS)}, then "
           f"`python bench/studies.py freeze --scale {scale}`")
    read_complete(path, fix)
    return load_config(path, [f"seed={run.seed}", f"run.dir={out / run.dir_name}"])


def execute(run: Run, out: Path, scale: str) -> None:
    from ssl_lab.eval.run import evaluate_run
    from ssl_lab.sweep import run_point

    run_dir = out / run.dir_name
    cfg = study_config(run, out, scale)
    check_saved(run_dir, cfg)
    failure = run_point(run.dir_name, cfg, run_dir, "[study]", _train)
    if failure or not (run_dir / "summary.json").is_file():
        return
    for overrides in run.evals:
        if not (run_dir / "evals" / f"{eval_tag(overrides, run_dir / 'config.yaml')}.json").is_file():
            evaluate_run(run_dir, list(overrides))


def collect(run: Run, out: Path, raw: Path) -> bool:
    """Copy a finished run's small files (RAW_FILES and every evals/*.json) to raw/<run dir>/;
    False if it has not finished. Files already there are overwritten: an eval added later
    lands too."""
    run_dir = out / run.dir_name
    if not (run_dir / "summary.json").is_file():
        return False
    keep = raw / run.dir_name
    (keep / "evals").mkdir(parents=True, exist_ok=True)
    for path in [*(run_dir / f for f in RAW_FILES), *sorted((run_dir / "evals").glob("*.json"))]:
        shutil.copy(path, keep / path.relative_to(run_dir))
    return True


def check_saved(run_dir: Path, cfg) -> None:
    """Stop at a run directory trained by another config (e.g. by the defaults of the day,
    before the protocols were frozen): skipping or resuming it would mix protocols."""
    from ssl_lab.config_io import flatten, read_yaml, to_dict

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved, frozen = flatten(read_yaml(path)), flatten(to_dict(cfg))
    differ = [k for k, v in frozen.items() if k not in ("resume", "run.dir") and saved.get(k, v) != v]
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} (frozen: {frozen[k]!r})" for k in differ[:4])
        raise SystemExit(f"{_shown(run_dir)} was trained with another config: {shown}"
                         f"{' ...' if len(differ) > 4 else ''}; move it away to rerun it")


def _train(cfg) -> None:
    from ssl_lab.train_loop import train

    train(cfg)


# ----------------------------------------------------------------------------- freezing


def missing_keys(tree: dict) -> list[str]:
    """The keys of today's config schema, but PER_RUN, that a config tree does not set."""
    from ssl_lab.config import Config
    from ssl_lab.config_io import all_keys, flatten

    given = flatten(tree)
    return [key for key in all_keys(Config) if key not in given and key not in PER_RUN]


def read_complete(path: Path, fix: str) -> dict:
    """A frozen config tree, which must set every key but PER_RUN: no default leaks in."""
    from ssl_lab.config_io import read_yaml

    if not path.is_file():
        raise SystemExit(f"{_shown(path)} is missing: `python bench/studies.py freeze` writes it")
    tree = read_yaml(path)
    missing = missing_keys(tree)
    if missing:
        raise SystemExit(f"{_shown(path)} does not set {', '.join(missing)} (new config keys?): {fix}")
    return tree


def published_config(run: Run, scale: str):
    """(config, overrides) of the run as published: PUBLISHED_DEFAULTS <- configs/<method>.yaml
    <- the scale <- the run's overrides, and views at the image size where `views.size=0`."""
    from ssl_lab.config import RESUME_SAFE_KEYS, Config, validate
    from ssl_lab.config_io import load_typed

    fix = "give each new key the value that reproduces the published runs (as the keys marked there)"
    base = read_complete(PUBLISHED_DEFAULTS, fix)
    path = ROOT / "configs" / f"{run.config}.yaml"
    overrides = [*SCALES[scale], *run.overrides]
    cfg = load_typed(Config, path, overrides, RESUME_SAFE_KEYS, validate, base=base)
    if cfg.views.size == 0:
        overrides.append(f"views.size={IMAGE_SIZES[cfg.data.name]}")
        cfg = load_typed(Config, path, overrides, RESUME_SAFE_KEYS, validate, base=base)
    return cfg, overrides


def freeze(scale: str, dest: Path = PROTOCOLS) -> list[Path]:
    """Write every run's complete protocol to dest/<scale>/<name>.yaml (the config as a run
    directory's config.yaml holds it, but PER_RUN); remove the files of runs that are gone."""
    import yaml

    from ssl_lab.config_io import to_dict
    from ssl_lab.runtime import write_text_atomic

    paths = []
    for run in protocol_runs():
        cfg, overrides = published_config(run, scale)
        tree = to_dict(cfg)
        del tree["seed"], tree["run"]["dir"]  # PER_RUN
        path = dest / scale / f"{run.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, _header(run, scale, overrides) + yaml.safe_dump(tree, sort_keys=False))
        paths.append(path)
    for stale in set((dest / scale).glob("*.yaml")) - set(paths):
        stale.unlink()
    return paths


def _header(run: Run, scale: str, overrides: list[str]) -> str:
    text = (f"Study run {run.name}, {scale} scale: its published protocol, every config key but "
            f"seed and run.dir (set per run by `python bench/studies.py run`). Frozen by "
            f"`python bench/studies.py freeze --scale {scale}` from published_defaults.yaml "
            f"(commit 26957dd's defaults; keys added since are marked there) <- "
            f"configs/{run.config}.yaml <- {' '.join(overrides)}")
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, 96, break_on_hyphens=False))


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ----------------------------------------------------------------------------- the command line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["run", "collect", "report", "freeze", "list"])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th run starting at the i-th")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "studies")
    parser.add_argument("--raw", type=Path, default=RAW)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "studies")
    args = parser.parse_args()
    runs = all_runs(args.seeds)
    if args.action == "list":
        print("\n".join(f"{r.dir_name}: {_shown(protocol_path(r, args.scale))} seed={r.seed}"
                        for r in runs))
    elif args.action == "freeze":
        paths = freeze(args.scale)
        print(f"{len(paths)} protocols in {_shown(PROTOCOLS / args.scale)}")
    elif args.action == "run":
        i, n = (int(x) for x in args.worker.split("/"))
        for run in runs[i::n]:
            execute(run, args.out / args.scale, args.scale)
            collect(run, args.out / args.scale, args.raw / args.scale)
    elif args.action == "collect":
        done = sum(collect(run, args.out / args.scale, args.raw / args.scale) for run in runs)
        print(f"{done} of {len(runs)} runs collected in {_shown(args.raw / args.scale)}")
    else:
        from study_report import plot_all  # a sibling script; it imports this module's definitions

        for path in plot_all(args.raw / args.scale, args.seeds, args.docs / "img"):
            print(f"wrote {_shown(path)}")
        print("tables: python bench/report.py")


if __name__ == "__main__":
    main()
