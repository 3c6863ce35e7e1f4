"""The short trials behind the DINO and SimSiam configs (docs/methods.md), re-runnable, with their
raw results kept in the repository.

    python bench/method_trials.py run [--runs runs/trials] [--raw docs/results/method_trials]
    python bench/method_trials.py table [--raw docs/results/method_trials]

Each trial is `ssl-lab train configs/NAME.yaml` on a fifth of Fashion-MNIST for 2 epochs (168
steps), one thread, no offline evaluation; its number is the online linear probe on `backbone`
at the last step (`online/backbone`, training views) and that window's mean loss: a cheap proxy
for choosing between variants, never a test accuracy. `run` writes one JSON per trial (the
resolved config and the last metrics record); `table` prints the markdown table from those files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.fraction=0.2", "train.epochs=2", "train.log_every_steps=12",
          "eval.enabled=false", "train.threads=1"]
DINO_HEAD = "model.projector=1024g-1024g-256u-4096w"  # the authors' head (no BatchNorm)
TRIALS: list[tuple[str, str, list[str]]] = [
    ("simclr", "simclr", []),
    ("mocov3", "mocov3", []),
    ("simsiam", "simsiam", []),
    ("simsiam", "simsiam-authors-lr", ["optim.lr=0.05", "optim.weight_decay=0.0001"]),
    ("dino", "dino", []),
    ("dino", "dino-multicrop", ["views.small_n=8"]),
    ("dino", "dino-bn-relu", ["model.projector=1024b-1024b-256u-4096w"]),
    ("dino", "dino-authors-head", [DINO_HEAD]),
    ("dino", "dino-multicrop-bn-relu", ["views.small_n=8", "model.projector=1024b-1024b-256u-4096w"]),
    ("dino", "dino-multicrop-authors-head", ["views.small_n=8", DINO_HEAD]),
    ("dino", "dino-multicrop-authors-head-freeze1", ["views.small_n=8", DINO_HEAD,
                                                     "method.freeze_last_layer_epochs=1"]),
    ("dino", "dino-multicrop-authors-head-k256", ["views.small_n=8",
                                                  "model.projector=1024g-1024g-256u-256w"]),
    ("dino", "dino-multicrop-authors-head-tt002", ["views.small_n=8", DINO_HEAD,
                                                   "method.teacher_temp=0.02",
                                                   "method.warmup_teacher_temp=0.02"]),
]


def run(runs: Path, raw: Path) -> None:
    from ssl_lab.config import load_config
    from ssl_lab.config_io import to_dict
    from ssl_lab.train_loop import train

    raw.mkdir(parents=True, exist_ok=True)
    for name, tag, overrides in TRIALS:
        out = raw / f"{tag}.json"
        if out.is_file():
            continue
        run_dir = runs / tag
        resume = ["resume=true"] if (run_dir / "config.yaml").is_file() else []
        cfg = load_config(ROOT / "configs" / f"{name}.yaml",
                          [*COMMON, *overrides, f"run.dir={run_dir}", *resume])
        train(cfg)
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        out.write_text(json.dumps({"config": name, "overrides": overrides, "common": COMMON,
                                   "last": last, "resolved": to_dict(cfg)}, indent=1))


def table(raw: Path) -> str:
    lines = ["| config | overrides | online probe, backbone | loss |", "|---|---|---:|---:|"]
    for _, tag, _ in TRIALS:
        path = raw / f"{tag}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        lines.append(f"| {r['config']} | {_shown(r['overrides'])} | "
                     f"{r['last']['online/backbone']:.3f} | {r['last']['loss']:.3f} |")
    return "\n".join(lines)


# what an override means, shown after it in the table
NOTES = {"optim.weight_decay=0.0001": "the authors' ImageNet values",
         "model.projector=1024b-1024b-256u-4096w": "BN + ReLU",
         DINO_HEAD: "the authors' head", "model.projector=1024g-1024g-256u-256w": "K = 256: ln K = 5.545"}


def _shown(overrides: list[str]) -> str:
    """The overrides in code style; a lone override with a note gets it in parentheses."""
    if not overrides:
        return ""
    note = NOTES.get(overrides[-1]) if len(overrides) <= 2 else None
    return f"`{' '.join(overrides)}`" + (f" ({note})" if note else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--runs", type=Path, default=Path("runs/trials"))
    parser.add_argument("--raw", type=Path, default=ROOT / "docs" / "results" / "method_trials")
    args = parser.parse_args()
    if args.command == "run":
        run(args.runs, args.raw)
    print(table(args.raw))


if __name__ == "__main__":
    main()
