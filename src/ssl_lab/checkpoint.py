"""Crash-safe checkpoints: `checkpoints/step-XXXXXXX/` written under a temporary name, then renamed.

A checkpoint holds `weights.safetensors` (every module's state, flat names `module.param`),
`state.pt` (optimizer/scheduler counters; only tensors and plain containers, so it loads with
`torch.load(weights_only=True)`) and `meta.json` (step, epoch, sizes and sha256 of the two
files). `checkpoints/latest` names the newest complete one; loading verifies the checksums and
falls back to an older checkpoint with a warning when the newest is damaged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ssl_lab.errors import UserError
from ssl_lab.runtime import os_user_error, short_path, write_text_atomic

WEIGHTS, STATE, META = "weights.safetensors", "state.pt", "meta.json"
_STEP_NAME = re.compile(r"step-\d{7}")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def flat_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """One flat tensor dict for safetensors (which refuses shared or non-contiguous storage)."""
    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return tensors


def save_checkpoint(run_dir: Path, step: int, modules: dict[str, nn.Module], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoints/step-XXXXXXX whole (temporary folder, then renamed) and keep the newest
    `keep`. An OS error (full disk, permissions) removes the unfinished folder and stops with one
    line naming the checkpoint; the previous checkpoints are untouched."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # serialised in memory, then written with plain writes: a full disk is then an OSError
        # naming its cause (torch.save's own writer reports it as "unexpected pos ...")
        _write_bytes(tmp / WEIGHTS, save(flat_state(modules)))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _write_bytes(tmp / STATE, buffer.getvalue())
        meta = {"step": step, "epoch": state.get("epoch"),
                "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)}
                          for f in (WEIGHTS, STATE)}}
        _write_bytes(tmp / META, json.dumps(meta, indent=1).encode())
        fsync_dir(tmp)
        if final.exists():  # a resumed run re-saving the same step: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        write_text_atomic(root / "latest", final.name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _newest_complete(root)
        then = (f"the newest complete checkpoint, {kept.name}, is kept; " if kept else "") + \
            f"resume with run.dir={short_path(run_dir)} resume=true"
        raise os_user_error("cannot write checkpoint", final, exc, then) from None
    _prune(root, keep)
    return final


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _newest_complete(root: Path) -> Path | None:
    try:
        found = [c for c in _own_checkpoints(root) if (c / META).is_file()]
    except OSError:  # only for the message: an unreadable folder names no checkpoint
        return None
    return found[0] if found else None


def fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # leftovers of a process killed mid-save
        if str(os.getpid()) not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)


def verify(ckpt: Path) -> bool:
    try:
        meta = json.loads((ckpt / META).read_text())
        return all((ckpt / f).stat().st_size == info["bytes"] and sha256_file(ckpt / f) == info["sha256"]
                   for f, info in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False  # a damaged meta.json (any shape of damage): the checkpoint is skipped


def _own_checkpoints(root: Path) -> list[Path]:
    """step-XXXXXXX directories that really lie in `root`, newest first: a link to another run's
    checkpoint is never followed (export would ship someone else's weights)."""
    if not root.is_dir():
        return []
    real_root = root.resolve()
    found = [p for p in root.iterdir() if _STEP_NAME.fullmatch(p.name) and not p.is_symlink()
             and p.is_dir() and p.resolve().parent == real_root]
    return sorted(found, reverse=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (None when there is none at all); warns about each
    damaged one it skips, and stops with a UserError when every one is damaged: starting again
    from step 0 would silently overwrite them."""
    root = checkpoint_root(run_dir)
    candidates = _own_checkpoints(root)
    named = _latest_name(root)
    if named is not None and root / named in candidates:
        candidates = [root / named] + [c for c in candidates if c != root / named]
    for ckpt in candidates:
        if verify(ckpt):
            return ckpt
        warnings.warn(f"checkpoint {ckpt} is damaged (checksum mismatch); trying an older one",
                      stacklevel=2)
    if candidates:
        names = ", ".join(c.name for c in candidates)
        raise UserError(f"every checkpoint in {root} is damaged ({names}); nothing was changed. "
                        "Move them away to start the run again from step 0")
    return None


def _latest_name(root: Path) -> str | None:
    try:
        name = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_NAME.fullmatch(name) else None


def save_training(run_dir: Path, step: int, modules: dict[str, nn.Module],
                  stateful: dict[str, Any], train_time: float, **extra: Any) -> Path:
    """A training checkpoint: module weights, plus the state_dict() of every optimizer, grad
    scaler or other stateful object in `stateful` (None entries are skipped)."""
    state = {"step": step, "train_time_s": train_time, **extra,
             **{name: obj.state_dict() for name, obj in stateful.items() if obj is not None}}
    return save_checkpoint(run_dir, step, modules, state)


def restore_training(run_dir: Path, modules: dict[str, nn.Module], stateful: dict[str, Any]
                     ) -> tuple[int, float, dict[str, Any]]:
    """(step, training seconds so far, the whole state) of the newest verified checkpoint, with
    every module and stateful object loaded; (0, 0.0, {}) when there is no checkpoint."""
    found = find_checkpoint(run_dir)
    if found is None:
        return 0, 0.0, {}
    load_weights(found, modules)
    state = load_state(found)
    for name, obj in stateful.items():
        if obj is not None and name in state:
            obj.load_state_dict(state[name])
    return int(state["step"]), float(state["train_time_s"]), state


def load_weights(ckpt: Path, modules: dict[str, nn.Module], strict: bool = True) -> None:
    """Load module states; an architecture mismatch becomes a UserError listing what differs."""
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {ckpt / WEIGHTS} ({exc}); the checkpoint is damaged") from None
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _check_compatible(module, sub, ckpt, name, strict)
        module.load_state_dict(sub, strict=strict)


def _check_compatible(module: nn.Module, sub: dict[str, torch.Tensor], ckpt: Path, name: str,
                      strict: bool) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(sub)) if strict else []
    unexpected = sorted(set(sub) - set(own)) if strict else []
    shapes = [f"{k}: checkpoint {tuple(sub[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own.keys() & sub.keys() if own[k].shape != sub[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:3]}" if missing else "",
                 f"unexpected {unexpected[:3]}" if unexpected else "",
                 f"shape mismatch {shapes[:3]}" if shapes else ""]
        detail = "; ".join(p for p in parts if p)
        raise UserError(f"checkpoint {ckpt} does not match the '{name}' model ({detail}); "
                        "use the config the checkpoint was trained with")


def load_state(ckpt: Path) -> dict[str, Any]:
    """The non-tensor training state; only plain containers and tensors are ever unpickled."""
    try:
        return torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  any failure to parse the file is the file's fault
        raise UserError(torch_load_error(ckpt / STATE, exc, "the checkpoint is damaged")) from None


def torch_load_error(path: Path, exc: BaseException, damaged: str) -> str:
    """ssl-lab's own line for a file torch.load(weights_only=True) refused. torch's message
    advises weights_only=False (unpickling, which can run code): it is never quoted."""
    text = str(exc).strip()
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Unpickler" in text:
        found = re.search(r"GLOBAL ([\w.]{1,80})", text)  # the class a pickle wants to rebuild
        if found or "Unsupported global" in text:
            what = f" ({found.group(1)})" if found else ""
            return (f"{short_path(path)} holds objects other than tensors and plain "
                    f"containers{what}; ssl-lab does not load such files (they could run code)")
        # torch reads a file that is not a zip archive as an old-style pickle: junk lands here
        return f"cannot read {short_path(path)}: it is not tensors saved by torch.save; {damaged}"
    # the type too: a KeyError on random bytes alone reads "(1785425525)"
    first = f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__
    return f"cannot read {short_path(path)} ({first}); {damaged}"
