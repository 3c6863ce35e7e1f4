"""`ssl-lab rcdm train | sample | score`: the command line over the RCDM Python API.

Every subcommand takes `key=value` arguments:

    ssl-lab rcdm train ENCODER_RUN layer=backbone run.dir=runs/r1 ...
    ssl-lab rcdm train run.dir=runs/r1 resume=true          # continue as saved
    ssl-lab rcdm sample runs/r1 split=test n=8 k=4 out=DIR
    ssl-lab rcdm score runs/r1 n=200 k=4

The API: `rcdm_config.load_train_config`, `rcdm_train.train_rcdm`,
`rcdm_sample.sample_command`, `rcdm_score.score_command`.
"""

from __future__ import annotations

import argparse

from ssl_lab.config_io import split_config_args
from ssl_lab.runtime import existing_run_dir


def cmd_train(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.rcdm_config import load_train_config
    from ssl_lab.gen.rcdm_train import train_rcdm

    encoder_run, overrides = split_config_args(ns.args, "ENCODER_RUN")
    train_rcdm(load_train_config(encoder_run, overrides),
               allow_import=getattr(ns, "allow_import", False))


def cmd_sample(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.rcdm_config import SampleArgs, parse_args
    from ssl_lab.gen.rcdm_sample import sample_command

    args = parse_args(SampleArgs, ns.overrides)  # bad values stop here, before any loading
    run_dir = existing_run_dir(ns.run_dir, "ssl-lab rcdm train")
    # the output folder (out=, else the default one) must be new unless overwrite=true:
    # sample_command checks it before loading the model
    paths = sample_command(run_dir, args)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_score(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.rcdm_config import ScoreArgs, parse_args
    from ssl_lab.gen.rcdm_score import format_score, score_command

    args = parse_args(ScoreArgs, ns.overrides)
    run_dir = existing_run_dir(ns.run_dir, "ssl-lab rcdm train")
    report = score_command(run_dir, args)
    print(format_score(report))
    print(f"score: {run_dir / 'score.json'}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `rcdm {train,sample,score}` to an argparse subparsers object."""
    parser = sub.add_parser("rcdm", help="diffusion model conditioned on a frozen representation "
                                         "(RCDM): train, sample, score")
    rsub = parser.add_subparsers(dest="rcdm_command", required=True)
    p = rsub.add_parser("train", help="train a diffusion model on an encoder's features")
    p.add_argument("args", nargs="*", metavar="ARG",
                   help="encoder run directory (made by `ssl-lab train`; may be left out on "
                   "resume), then key=value, e.g. layer=proj2 train.epochs=5 "
                   "unet.channels=64-128-128 run.dir=... resume=true")
    p.set_defaults(func=cmd_train)
    p = rsub.add_parser("sample", help="k samples per conditioning image, as a grid and arrays")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="images=a.png,b.png | split=test n=8; k= steps= seed= eta= interp= "
                   "batch_size= out=NEW_DIR overwrite=true (replace an existing folder's files)")
    p.set_defaults(func=cmd_sample)
    p = rsub.add_parser("score", help="faithfulness by retrieval and diversity -> score.json")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="n= split= k= steps= seed= eta= batch_size= grid_rows=")
    p.set_defaults(func=cmd_score)
