"""Where the evaluation's memory goes: RSS and its peak (VmRSS / VmHWM, Linux) printed around
each step of `ssl-lab eval` (feature extraction, each probe of each layer, each encoder).

    cp -r runs/main /tmp/ev && SSL_LAB_CACHE=$(mktemp -d) python bench/eval_memory.py /tmp/ev

It evaluates (and rewrites eval.json in) the run directory it is given: pass a copy.
"""

from __future__ import annotations

import functools
import sys

import ssl_lab.eval.metrics as metrics
import ssl_lab.eval.run as run


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
        shape = tuple(args[0].shape) if args and hasattr(args[0], "shape") else ""
        print(f"{name}{shape}: before [{before}] after [{memory()}]", flush=True)
        return out

    setattr(module, name, wrapper)


def main() -> None:
    for name in ("linear_probe", "knn_classify", "rankme", "zero_fraction"):
        traced(metrics, name)  # evaluate_layer looks these up in its module at call time
    for name in ("features_by_split", "evaluate_encoder", "pixel_baseline"):
        traced(run, name)
    run.evaluate_run(sys.argv[1], sys.argv[2:])
    print("end:", memory())


if __name__ == "__main__":
    main()
