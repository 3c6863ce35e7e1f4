"""`ssl-lab` command line: one entry point, one subcommand per job.

Every mistake a user can cause surfaces as a `UserError`: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from ssl_lab.config import split_config_args
from ssl_lab.errors import UserError


def cmd_train(ns: argparse.Namespace) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.train import train

    path, overrides = split_config_args(ns.args)
    train(load_config(path, overrides))


def cmd_eval(ns: argparse.Namespace) -> None:
    from ssl_lab.eval.run import evaluate_run, print_layer_table
    from ssl_lab.runtime import existing_run_dir

    run_dir = existing_run_dir(ns.run_dir, "ssl-lab train")
    report = evaluate_run(run_dir, ns.overrides)
    print_layer_table(report, run_dir)


def cmd_views(ns: argparse.Namespace) -> None:
    import torch

    from ssl_lab.config import load_config
    from ssl_lab.data.views import ViewGenerator, save_view_grid
    from ssl_lab.train import load_training_data

    path, overrides = split_config_args(ns.args)
    cfg = load_config(path, overrides)
    data = load_training_data(cfg)
    images = torch.from_numpy(data.train.images[: ns.n])
    views = ViewGenerator(cfg.views.recipe, cfg.views.size or data.image_size, cfg.views.n,
                          noise_std=cfg.views.noise_std)
    out = views(images, torch.Generator().manual_seed(cfg.seed))
    print(f"views: {save_view_grid(images, out, ns.out, n=ns.n)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain an encoder, then probe every layer")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="offline probes of every layer of a run (any dataset)")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="e.g. data.name=digits")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("views", help="save a PNG grid of a batch's views")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] [key=value ...] (views.*, data.*)")
    p.add_argument("--out", default="views.png")
    p.add_argument("--n", type=int, default=8, help="how many images (rows)")
    p.set_defaults(func=cmd_views)

    from ssl_lab import export, importer, sweep
    from ssl_lab.gen import infusion_run, rcdm_run

    for module in (sweep, export, importer, rcdm_run, infusion_run):
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except UserError as exc:
        print(f"ssl-lab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl-lab: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
