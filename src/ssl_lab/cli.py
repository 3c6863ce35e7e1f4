"""`ssl-lab` command line: one entry point, one subcommand per job.

Every mistake a user can cause surfaces as a `UserError`: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ssl_lab.config_io import pop_options, short, split_config_args
from ssl_lab.errors import UserError


def cmd_train(ns: argparse.Namespace) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.train_loop import train

    path, overrides = split_config_args(ns.args)
    train(load_config(path, overrides), allow_import=getattr(ns, "allow_import", False))


def cmd_eval(ns: argparse.Namespace) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.eval.run import evaluate_run, print_layer_table
    from ssl_lab.runtime import evaluable_run_dir
    from ssl_lab.train_loop import eval_notice

    run_dir = evaluable_run_dir(ns.run_dir)  # evaluate_run checks it too (Python callers)
    print(eval_notice(load_config(run_dir / "config.yaml", ns.overrides)), flush=True)
    report = evaluate_run(run_dir, ns.overrides, allow_import=getattr(ns, "allow_import", False))
    print_layer_table(report, run_dir)


def cmd_views(ns: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from ssl_lab.config import load_config
    from ssl_lab.data.views import ViewGenerator, get_recipe, save_view_grid
    from ssl_lab.train_setup import load_training_data, view_size

    options, args = pop_options(ns.args, {"out": "views.png", "rows": 8}, "views")
    if not isinstance(options["rows"], int) or not 1 <= options["rows"] <= 64:
        raise UserError(f"views: rows must be an integer in [1, 64], got {short(options['rows'])}")
    path, overrides = split_config_args(args)
    cfg = load_config(path, overrides)
    data = load_training_data(cfg)
    n = options["rows"]
    images = torch.from_numpy(np.asarray(data.ssl_train.images[:n]))
    size = view_size(cfg, data)
    views = ViewGenerator(get_recipe(cfg.views.recipe, size=size, **cfg.views.recipe_options()),
                          size, cfg.views.n)
    out = views(images, torch.Generator().manual_seed(cfg.seed))
    print(f"views: {save_view_grid(images, out, str(options['out']), n=n)}")


def cmd_data_pack(ns: argparse.Namespace) -> None:
    from ssl_lab.data.pack import pack, parse_options
    from ssl_lab.data.store import describe

    dest, packed = pack(ns.source, ns.dest, parse_options(ns.options))
    print(describe(dest) if packed else f"{dest} is already a complete store of {ns.source}; "
          "nothing to do")


def cmd_data_info(ns: argparse.Namespace) -> None:
    from ssl_lab.data.store import describe, verify

    options, rest = pop_options(ns.options, {"verify": False}, "data info")
    if rest:
        raise UserError(f"unexpected argument '{rest[0]}'; data info takes verify=true")
    print(describe(ns.dest))
    if options["verify"]:
        bad = verify(ns.dest)
        if bad:
            raise UserError(f"{ns.dest}: checksum mismatch in {', '.join(bad)}; pack it again")
        print("checksums  ok")


class _Parser(argparse.ArgumentParser):
    """argparse with ssl-lab's error convention: one line and exit 2 (the usage is `--help`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        line = " ".join(message.split())
        self.exit(2, f"ssl-lab: error: {self.prog}: {line[:300]} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssl-lab", description=__doc__.splitlines()[0],
        epilog=f"{ALLOW_IMPORT} (anywhere): let model.backbone=import:package.module:factory "
        "import and call that factory (never done otherwise)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain an encoder, then probe every layer")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="offline probes of every layer of a run (any dataset)")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="e.g. data.name=digits")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("views", help="save a PNG grid of a batch's views")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] (views.*, data.*); "
                   "out=views.png, rows=8 (how many images)")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("data", help="packed datasets: pack a source into a memory-mapped store")
    data = p.add_subparsers(dest="data_command", required=True)
    q = data.add_parser("pack", help="any data.name source -> a packed store (docs/data.md)")
    q.add_argument("source", help="a data.name: cifar10, imagefolder:PATH, npz:PATH, ...")
    q.add_argument("dest", help="the store folder to create")
    q.add_argument("options", nargs="*", help="resolution=R | max_side=M, fit=crop|pad, "
                   "encoding=raw|jpeg, quality=90, root=DATA_ROOT, workers=2")
    q.set_defaults(func=cmd_data_pack)
    q = data.add_parser("info", help="describe a packed store")
    q.add_argument("dest")
    q.add_argument("options", nargs="*", help="verify=true: re-compute every file's sha256")
    q.set_defaults(func=cmd_data_info)

    from ssl_lab import export, importer, sweep
    from ssl_lab.gen import infusion_run, rcdm_run

    for module in (sweep, export, importer, rcdm_run, infusion_run):
        module.add_commands(sub)
    return parser


ALLOW_IMPORT = "--allow-import"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # accepted anywhere on the line: the one way to let a run's model.backbone=import:... run code
    allow_import = ALLOW_IMPORT in argv
    ns = build_parser().parse_args([a for a in argv if a != ALLOW_IMPORT])
    ns.allow_import = allow_import
    try:
        ns.func(ns)
    except UserError as exc:
        print(f"ssl-lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(interrupted_message(getattr(exc, "run_dir", None), ns), file=sys.stderr)
        return 130
    except OSError as exc:  # a safety net: the known places name their path and cause first
        print(f"ssl-lab: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def os_error_line(exc: OSError) -> str:
    """An OS error no command caught, as runtime.os_user_error words it: the path (both of a
    rename), the cause and its fix."""
    from ssl_lab.runtime import os_error_text, os_user_error

    if exc.filename is None:
        return f"operating-system error: {os_error_text(exc)}"
    path = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return str(os_user_error("cannot use", path, exc))


def interrupted_message(run_dir: Path | None, ns: argparse.Namespace) -> str:
    """One line for Ctrl-C: the run directory the engine was writing (set on the exception by
    RunDir.take), the checkpoint a resume starts from, and the command that resumes it. A
    directory removed on the way out (nothing had been written) is not named."""
    if run_dir is None or not Path(run_dir).is_dir():
        return "ssl-lab: interrupted"
    latest = Path(run_dir) / "checkpoints" / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    where = (f"a resume starts from {Path(run_dir) / 'checkpoints' / name} "
             f"(step {int(name[5:])})" if name[5:].isdigit()
             else "no checkpoint yet, so a resume starts at step 0")
    if ns.command == "sweep":  # a point's run directory lies in the sweep's out=
        how = (f"`ssl-lab sweep out={shlex.quote(str(Path(run_dir).parent))}` (finished points "
               "are skipped)")
    else:
        sub = getattr(ns, f"{ns.command}_command", None)
        words = " ".join(w for w in ("ssl-lab", ns.command, sub) if w)
        how = f"`{words} run.dir={shlex.quote(str(run_dir))} resume=true`"
    return f"ssl-lab: interrupted; run directory {run_dir}: {where}; continue with {how}"


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
