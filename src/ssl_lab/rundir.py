"""The run directory every training command writes: named paths, create / refuse-to-overwrite /
resume, atomic result files, and one writer at a time.

`train`, `rcdm train` and `infusion train` all go through `RunDir`: nothing is created before the
command's inputs are validated (`RunDir.check` only looks), files are replaced whole or not at
all, and an exclusive lock (`RunDir.lock`) makes a second process on the same directory stop at
once instead of interleaving its checkpoints with the first one's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_lab.config_io import save_config
from ssl_lab.errors import UserError
from ssl_lab.runtime import (
    env_info,
    os_user_error,
    precision_name,
    short_path,
    utc_stamp,
    write_text_atomic,
)

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class RunDir:
    """A run directory's named paths (nothing is touched on construction)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def started(self) -> bool:
        """A run has started once its config.yaml exists (it is written first)."""
        return self.config.is_file()

    @classmethod
    def check(cls, run_dir: str | None, resume: bool, default_name: str) -> RunDir:
        """The directory a command will use, after checking it may be used; creates nothing.

        A new directory per run (`runs/<default_name>-<UTC stamp>` unless given); an existing
        run only with resume=true, so work is never overwritten. resume=true on a directory that
        holds no run yet starts it.
        """
        if run_dir:
            path = Path(run_dir)
        elif resume:
            raise UserError("resume=true needs run.dir=<the run directory to continue>")
        else:
            path = Path("runs") / f"{default_name}-{utc_stamp()}"
        check_usable(path)
        out = cls(path)
        if path.is_dir() and not resume and _holds_anything(path):
            raise UserError(f"run directory {path} already exists; pass resume=true to continue it "
                            "or choose another run.dir")
        return out

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_user_error("cannot create run directory", self.path, exc,
                                "choose another run.dir") from None

    def write_json(self, name: str, obj: Any) -> Path:
        """RUN/name, whole or not at all; an OS error (full disk...) is one line naming it."""
        return _write(self.path / name, json.dumps(obj, indent=1))

    def write_env(self, device: Any, **extra: Any) -> Path:
        return _write(self.env, json.dumps(env_info(device) | extra, indent=1))

    @contextlib.contextmanager
    def take(self, resume: bool) -> Iterator[None]:
        """Create the directory and hold its writer lock for the whole run (a second writer
        stops at once with a UserError). A Ctrl-C inside carries this directory
        (`exc.run_dir`): cli.main names it, its newest checkpoint and the resume command, for
        every command that trains (train, sweep, rcdm train, infusion train)."""
        self.create()
        with self.lock():
            if not resume and self.started:  # another process started it since check() looked
                raise UserError(f"run directory {short_path(self.path)} already exists; pass "
                                "resume=true to continue it or choose another run.dir")
            try:
                yield
            except KeyboardInterrupt as exc:
                exc.run_dir = self.path
                raise

    def write_start(self, cfg: Any, spec_name: str, spec: Any, device: Any,
                    amp_dtype: torch.dtype | None, grad_scaler: bool, step: int, **env: Any) -> None:
        """After a successful restore: config.yaml first (a run has started once it exists),
        then the application's own spec (encoder.json, rcdm.json...), then env.json with the
        resolved precision."""
        # resume=false: the file describes the run, so reading it (eval on another dataset,
        # rcdm) never turns into a resume check against itself
        try:
            save_config(dataclasses.replace(cfg, resume=False), self.config)
        except OSError as exc:
            raise os_user_error("cannot write", self.config, exc) from None
        self.write_json(spec_name, spec)
        self.write_env(device, precision=precision_name(amp_dtype), grad_scaler=grad_scaler,
                       resumed_at_step=step, **env)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory's exclusive writer lock (see RunLock)."""
        lock = RunLock(self.path / LOCK_NAME)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


def _holds_anything(path: Path) -> bool:
    return any(p.name != LOCK_NAME for p in path.iterdir())


def _write(path: Path, text: str) -> Path:
    try:
        return write_text_atomic(path, text)
    except OSError as exc:
        raise os_user_error("cannot write", path, exc) from None


# room left under PATH_MAX for what a run writes inside its directory
# (checkpoints/.tmp-step-0000000-<pid>/weights.safetensors, evals/<dataset>.json...)
_INSIDE = 160


def check_usable(path: Path, key: str = "run.dir") -> None:
    """Stop with one line when `path` cannot be a writable directory: it is a file, lies under
    a file, has a name longer than the file system allows, or its nearest existing folder is
    not writable (permissions, read-only mount). Only looks: nothing is created."""
    shown = short_path(path)
    existing = _nearest_existing(path, key)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):  # not reported by this file system: Linux's usual limits
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise UserError(f"{key} {shown}: the name {short_path(part, 40)!r} is "
                            f"{len(os.fsencode(part))} bytes, longer than the file system allows "
                            f"({name_max}); choose a shorter {key}")
    if len(os.fsencode(os.path.abspath(path))) > path_max - _INSIDE:
        raise UserError(f"{key} {shown} is too long a path for this file system (at most "
                        f"{path_max - _INSIDE} bytes leave room for the run's files); choose a "
                        f"shorter {key}")
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {short_path(existing)}, a file"
        raise UserError(f"{key} {shown} {where}, not a directory; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK) or \
            (existing == path and not os.access(path, os.R_OK)):
        what = "is" if existing == path else f"would be created in {short_path(existing)}, which is"
        raise UserError(f"{key} {shown} {what} not writable (permissions or a read-only file "
                        f"system); choose a writable {key}")


def _nearest_existing(path: Path, key: str) -> Path:
    """`path` or its closest ancestor that exists (a file there is reported by the caller)."""
    for candidate in (path, *path.absolute().parents):
        try:
            os.stat(candidate)
            return candidate
        except OSError as exc:
            # missing, under a file, too long a name: climb (the caller names the cause)
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                continue
            raise os_user_error(f"cannot use {key}", path, exc, f"choose another {key}") from None
    return Path("/")


class RunLock:
    """An exclusive lock file naming its holder (pid, host, start time).

    The kernel's `flock` does the locking, so a holder killed with kill -9 releases it at once
    and the stale file (still naming it) is taken over by the next writer, with a note. A file
    system without working flock (some network mounts) is an error, not a silent non-lock.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open_locked()
            # a releasing holder unlinks the file: a lock on the old inode would be no lock
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        stale = _read_holder(fd, default="")
        if stale:  # the file outlived its holder (kill -9, power loss): flock already let go
            sys.stderr.write(f"ssl-lab: taking over the stale lock of {stale} in {self.path.parent}\n")
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
            os.fsync(fd)
        except OSError as exc:  # a full disk: let go of the lock, say so in one line
            self.release()
            raise os_user_error("cannot write the lock file", self.path, exc) from None

    def _open_locked(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot create the lock file {self.path} ({exc.strerror}); choose a "
                            "writable run.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd, default="another process")
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"run directory {self.path.parent} is in use by {holder}; wait for "
                                "that process to end (or stop it) before writing to this run") from None
            raise UserError(f"cannot lock {self.path} ({exc.strerror}); use a local run.dir") from None
        return fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int, default: str) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return default
