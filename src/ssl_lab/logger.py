"""One metrics logger for every training command: `metrics.jsonl`, TensorBoard and a progress bar,
fed by one log window.

The window accumulates the loss on the device without a host sync; `close_window` reads it once
per log step, which is also where a NaN is noticed (before the next checkpoint can save it).
Only the writing process (rank 0) opens files; other ranks keep the window for the NaN check.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ssl_lab import checkpoint as ckpt_io
from ssl_lab.rundir import RunDir
from ssl_lab.runtime import os_user_error, short_path


def nan_message(run_dir: Path, step: int, window: int, hint: str) -> str:
    """The NaN stop's one line: where, the last good checkpoint, what to change, how to resume."""
    found = ckpt_io.find_checkpoint(run_dir)
    last = f"the last good checkpoint is {found}" if found else "no checkpoint was written yet"
    where = f"at step {step}" if window == 1 else f"between steps {step - window + 1} and {step}"
    return (f"loss became NaN/inf {where}; {last}; {hint} (resume with run.dir={run_dir} "
            "resume=true)")


class MetricsLogger:
    def __init__(self, run: RunDir, total_steps: int, initial_step: int, desc: str,
                 write: bool = True):
        self.write = write
        self._writer = None
        self._jsonl = None
        self._path = run.metrics
        if write:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only where it writes

            try:
                self._writer = SummaryWriter(str(run.tensorboard))
                self._jsonl = open(run.metrics, "a")  # noqa: SIM115  (closed in close())
            except OSError as exc:
                self.close()
                raise os_user_error("cannot write", exc.filename or run.metrics, exc) from None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                        dynamic_ncols=True, disable=not write)
        self._loss_sum: torch.Tensor | float = 0.0
        self.window_steps = self.last_window_steps = 0
        self._window_start = time.perf_counter()

    def add_step(self, loss: torch.Tensor) -> None:
        """One finished step: its loss joins the window (no sync), the bar advances."""
        self._loss_sum = self._loss_sum + loss.detach().float()
        self.window_steps += 1
        self.bar.update(1)

    def close_window(self) -> tuple[float, float]:
        """(mean loss, seconds) of the window since the last call; starts a new window."""
        self.last_window_steps = self.window_steps
        loss = float(self._loss_sum) / max(self.window_steps, 1)
        elapsed = time.perf_counter() - self._window_start
        self._loss_sum, self.window_steps = 0.0, 0
        self._window_start = time.perf_counter()
        return loss, elapsed

    def log(self, record: dict[str, Any], **postfix: str) -> None:
        """Append a record ({"step": ..., scalar: value, ...}) to every sink."""
        if not self.write:
            return
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as exc:  # a full disk: one line, and the checkpoints so far are intact
            raise os_user_error("cannot write", self._path, exc,
                                f"resume with run.dir={short_path(self._path.parent)} resume=true"
                                ) from None
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, global_step=record["step"])
        if postfix:
            self.bar.set_postfix(**postfix)

    def note(self, text: str) -> None:
        """A line above the progress bar (the main process only)."""
        if self.write:
            tqdm.write(text)

    def close(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        for sink in (self._jsonl, self._writer):
            if sink is not None:
                with contextlib.suppress(OSError):  # a full disk already reported its error
                    sink.close()
        self._jsonl = self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
