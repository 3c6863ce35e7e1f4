"""Device, precision and environment: the few facts every command needs about where it runs."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import json
import os
import platform
import stat
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ssl_lab.errors import UserError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). "auto": bf16 where the hardware does it natively.

    On a 2-core Intel Xeon with AMX the default model's full training loop ran ~15 % faster in
    bf16 autocast + channels_last than in fp32 (bench/bench_train.py; docs/history.md). "fp16"
    is loss-scaled by the training loops (torch.amp.GradScaler).
    """
    if precision == "fp32":
        return None
    if precision == "fp16":  # loss-scaled by the training loop (torch.amp.GradScaler)
        return torch.float16
    if device.type == "cuda":  # fp16 on GPUs without bf16 (V100, T4): loss scaling needed
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    supported = torch.backends.mkldnn.is_available() and _cpu_has_bf16()
    if precision == "bf16" or supported:
        return torch.bfloat16
    return None


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """"bfloat16", "float16" or "float32": what a precision setting resolved to."""
    return str(amp_dtype or torch.float32).replace("torch.", "")


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Ask glibc to keep freed blocks of up to `limit` bytes for reuse instead of unmapping them.

    Why: glibc serves blocks above its mmap threshold (at most 32 MB) with a fresh mmap and
    unmaps them on free, so every such tensor is page-faulted in again on its next allocation:
    512 fast 96-px views (a 56-MB batch) took 73-84 ms instead of 50-56 ms on the dev machine
    (bench/view_ops.py --glibc-default; docs/data.md, "Fast views"). The heap is then trimmed
    only above 2 GiB of free space. Process-wide, Linux with glibc only; returns whether it
    applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    int_max = 2**31 - 1
    return bool(mallopt(m_mmap_threshold, min(limit, int_max))) and bool(
        mallopt(m_trim_threshold, int_max))


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (temporary files name their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def path_kind(path: str | Path, what: str) -> str | None:
    """"dir", "file", "other" or None (missing, or under a file) for a path the user named.

    Path.is_file() and friends raise on a name longer than the file system allows, a loop of
    links or a folder that may not be entered: that is one line naming the path here."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise os_user_error(f"cannot use {what}", path, exc) from None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def existing_run_dir(text: str, made_by: str) -> Path:
    """A run directory argument that must exist (`made_by`: the command that creates one)."""
    path = Path(text)
    if path_kind(path, "run directory") != "dir":
        raise UserError(f"run directory {short_path(path)} does not exist; pass one made by "
                        f"`{made_by}`")
    return path


def evaluable_run_dir(run_dir: str | Path) -> Path:
    """A run directory to evaluate: it exists, holds config.yaml and encoder.json, and can be
    written (eval.json goes there). Checked before any work, for the CLI and Python alike."""
    run_dir = existing_run_dir(str(run_dir), "ssl-lab train")
    missing = [name for name in ("config.yaml", "encoder.json")
               if path_kind(run_dir / name, "run directory") != "file"]
    if missing:
        raise UserError(f"{short_path(run_dir)} is not a run directory (no "
                        f"{' or '.join(missing)}); pass a directory made by `ssl-lab train` or "
                        "`ssl-lab import`")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"run directory {short_path(run_dir)} is not writable (permissions or a "
                        "read-only file system) and the evaluation writes eval.json there; copy "
                        "the run to a writable folder and evaluate the copy")
    return run_dir


def short_path(path: str | Path, limit: int = 160) -> str:
    """`path` for a message: long ones keep their start and end (a run.dir of 5,000 characters
    must not make a 5,000-character error line)."""
    text = str(path)
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


# what to do about an OS error, by errno: the one-line messages end with it
_OS_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space (quota exceeded)",
             errno.EACCES: "choose a location you can write to",
             errno.EPERM: "choose a location you can write to",
             errno.EROFS: "choose a location on a writable file system",
             errno.ENAMETOOLONG: "use a shorter name", errno.ENOTDIR: "a part of the path is a "
             "file: choose another path", errno.EISDIR: "remove or rename that folder"}


def os_error_text(exc: OSError) -> str:
    """'No space left on device; free disk space': the cause of an OS error and its fix."""
    cause = exc.strerror or str(exc).splitlines()[0][:120] or type(exc).__name__
    fix = _OS_FIXES.get(exc.errno or 0)
    return f"{cause}; {fix}" if fix else cause


def os_user_error(what: str, path: str | Path, exc: OSError, then: str = "") -> UserError:
    """An OS error while touching `path` as one line: what failed, where, why, what to do."""
    tail = f"; {then}" if then else ""
    return UserError(f"{what} {short_path(path)}: {os_error_text(exc)}{tail}")


def read_json(path: Path, what: str, fix: str) -> Any:
    """The JSON file `path`; unreadable, empty or truncated is one line naming it and `fix`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # permissions, an I/O error: the fixes for writing do not apply
        raise UserError(f"cannot read {what} {short_path(path)}: {exc.strerror or exc}; {fix}"
                        ) from None
    except UnicodeDecodeError:
        raise UserError(f"{short_path(path)} is not a text file (invalid UTF-8): the {what} is "
                        f"damaged; {fix}") from None
    if not text.strip():
        raise UserError(f"{short_path(path)} is empty: the {what} is damaged; {fix}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too long numbers, deep nests
        raise UserError(f"{short_path(path)} is not valid JSON ({str(exc)[:80]}): the {what} is "
                        f"damaged or truncated; {fix}") from None


def write_text_atomic(path: Path, text: str) -> Path:
    """Write path whole or not at all: a crash or kill mid-write leaves the previous file (or
    none), never a truncated one. The temporary name is per process, so concurrent writers of
    the same file (a shared baseline cache) do not collide; the last rename wins."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device) -> dict:
    packages = {}
    for name in ("torch", "numpy", "ssl-lab", "safetensors", "diffusers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "git_revision": git_revision(),
        "packages": packages,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "argv": sys.argv,
        "utc": utc_stamp(),
    }
