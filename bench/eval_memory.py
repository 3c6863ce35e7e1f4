"""Where the evaluation's memory goes: RSS and its peak (VmRSS / VmHWM, Linux) printed around
each step of `ssl-lab eval` (feature files, each probe of each layer, in RAM or blocked, each
encoder, the pixel baseline).

    cp -r runs/main /tmp/ev && SSL_LAB_CACHE=$(mktemp -d) python bench/eval_memory.py /tmp/ev [key=value ...]

It evaluates (and rewrites eval.json in) the run directory it is given: pass a copy. A layer
probed in RAM shows `linear_probe` / `knn_classify`; one streamed from its feature file (beyond
eval.ram_budget_mb, e.g. `eval.ram_budget_mb=64`) shows `linear_probe_rows` / `knn_rows`.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import ssl_lab.eval.blocked as blocked
import ssl_lab.eval.metrics as metrics
import ssl_lab.eval.probes as probes
import ssl_lab.eval.run as run

# module -> functions that are looked up in it at call time (so a wrapper there is seen)
TRACED = ((metrics, ("linear_probe", "knn_classify", "rankme", "zero_fraction")),
          (blocked, ("linear_probe_rows", "knn_rows", "rankme_rows", "zero_fraction_rows")),
          (probes, ("evaluate_layer_rows",)),
          (run, ("features_by_split", "write_features", "evaluate_encoder", "pixel_baseline")))


def memory() -> str:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) // 1000
    return f"rss {fields['VmRSS']} MB, peak {fields['VmHWM']} MB"


def traced(module, name: str) -> None:
    """Replace module.name by a wrapper that prints memory before and after each call."""
    inner = getattr(module, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        before = memory()
        out = inner(*args, **kwargs)
        first = args[0] if args else None
        shape = tuple(first.shape) if hasattr(first, "shape") else \
            (first.n, first.dim) if hasattr(first, "dim") and hasattr(first, "n") else ""
        print(f"{name}{shape}: before [{before}] after [{memory()}]", flush=True)
        return out

    setattr(module, name, wrapper)


@contextlib.contextmanager
def tracing():
    """Every function of TRACED wrapped while inside; the originals are put back after."""
    saved = [(module, name, getattr(module, name)) for module, names in TRACED for name in names]
    try:
        for module, name, _ in saved:
            traced(module, name)
        yield
    finally:
        for module, name, inner in saved:
            setattr(module, name, inner)


def main() -> None:
    with tracing():
        run.evaluate_run(sys.argv[1], sys.argv[2:])
    print("end:", memory())


if __name__ == "__main__":
    main()
