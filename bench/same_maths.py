"""Do two source trees train the same weights? A short run of each (one thread, so the float
summation order is fixed), then every tensor of their final checkpoints compared bit for bit.

    git worktree add /tmp/old COMMIT
    python bench/same_maths.py /tmp/old/src src OUT.json [key=value ...]

Default run: the main job's config on a tenth of its training split for one epoch, no offline
evaluation. The JSON holds the comparison, each run's views/s (one-thread, not a benchmark:
see bench/main_job.py for timing) and the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from main_job import cpu_model  # noqa: E402

DEFAULT = ["data.fraction=0.1", "train.epochs=1", "eval.enabled=false", "train.threads=1"]


def train_tree(src: Path, run_dir: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    env = os.environ | {"PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1",
                        "SSL_LAB_CACHE": str(run_dir.parent / "cache")}
    proc = subprocess.run([sys.executable, "-m", "ssl_lab", "train", f"run.dir={run_dir}",
                           *DEFAULT, *overrides], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{src}: training failed:\n{proc.stderr[-2000:]}")
    root = run_dir / "checkpoints"
    return load_file(str(root / (root / "latest").read_text().strip() / "weights.safetensors"))


def main() -> None:
    a_src, b_src, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    overrides = sys.argv[4:]
    with tempfile.TemporaryDirectory() as tmp:
        a = train_tree(a_src, Path(tmp) / "a", overrides)
        b = train_tree(b_src, Path(tmp) / "b", overrides)
        speed = [json.loads((Path(tmp) / r / "summary.json").read_text())["views_per_s"]
                 for r in ("a", "b")]
    differ = sorted(k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k]))
    result = {"a": str(a_src), "b": str(b_src), "overrides": [*DEFAULT, *overrides],
              "tensors": len(a), "same_names": a.keys() == b.keys(), "differing": differ,
              "bit_identical": a.keys() == b.keys() and not differ,
              "views_per_s_one_thread": speed, "cpu": cpu_model()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"bit-identical: {result['bit_identical']} ({len(a)} tensors; differing: {differ[:5]})")


if __name__ == "__main__":
    main()
