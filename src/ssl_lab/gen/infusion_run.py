"""`ssl-lab infusion train | sample | score`: the command line over the infusion Python API.

Every subcommand takes `key=value` arguments:

    ssl-lab infusion train [CONFIG.yaml] data.name=digits run.dir=runs/x ...
    ssl-lab infusion train run.dir=runs/x resume=true        # continue as saved
    ssl-lab infusion sample runs/x n=64 chains=8 seed=0 out=DIR
    ssl-lab infusion score runs/x score.parzen_samples=2000

The API: `infusion_config.load_infusion_config`, `infusion_train.train_infusion`,
`infusion_eval.sample_run`, `infusion_eval.score_run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_lab.config_io import split_config_args
from ssl_lab.runtime import existing_run_dir


def cmd_train(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.infusion_config import load_infusion_config
    from ssl_lab.gen.infusion_train import train_infusion

    path, overrides = split_config_args(ns.args)
    run_dir = train_infusion(load_infusion_config(path, overrides))
    print(f"run: {run_dir}")


def cmd_sample(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.infusion_config import check_infusion_run, parse_sample_args
    from ssl_lab.gen.infusion_eval import sample_run

    args = parse_sample_args(ns.overrides)  # bad values stop here, before any loading
    run_dir = existing_run_dir(ns.run_dir, "ssl-lab infusion train")
    check_infusion_run(run_dir)
    # the output folder (out=, else the default one) must be new unless overwrite=true:
    # sample_run checks it before loading the model
    paths = sample_run(run_dir, args)
    for name, path in paths.items():
        print(f"{name}: {path}")


def cmd_score(ns: argparse.Namespace) -> None:
    from ssl_lab.gen.infusion_eval import score_run

    report = score_run(existing_run_dir(ns.run_dir, "ssl-lab infusion train"), ns.overrides)
    chain, prior = report["chain"], report["prior"]
    print(f"Parzen LL (test, nats): chain {chain['parzen']['test_ll']:.1f} "
          f"(σ={chain['parzen']['sigma']}), prior {prior['parzen']['test_ll']:.1f}")
    print(f"lower bound (test, nats): chain {chain['bound']['test_bound']:.1f} "
          f"(proposal: {chain['bound']['picked_on_val']}); "
          f"prior exact LL {prior['exact_ll']:.1f}")
    print(f"score: {Path(ns.run_dir) / 'score.json'}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `infusion {train,sample,score}` to an argparse subparsers object."""
    parser = sub.add_parser("infusion", help="infusion-trained generative chains (Bordes+ 2017)")
    inner = parser.add_subparsers(dest="infusion_command", required=True)
    p = inner.add_parser("train", help="train a transition operator by infusion training")
    p.add_argument("args", nargs="*", metavar="ARG", help="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_train)
    p = inner.add_parser("sample", help="PNG grids of samples and of the chain's steps")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="n=64 (samples) chains=8 (rows of chain.png) seed=0 out=NEW_DIR "
                   "(default RUN/samples/n<n>-chains<chains>-seed<seed>) overwrite=true "
                   "(replace an existing folder's files)")
    p.set_defaults(func=cmd_sample)
    p = inner.add_parser("score", help="Parzen LL and lower bound on test -> RUN/score.json")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="score.* keys, e.g. score.parzen_samples=2000 score.sigmas=0.1,0.2")
    p.set_defaults(func=cmd_score)
