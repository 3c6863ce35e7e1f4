"""`ssl-lab export RUN_DIR [layer=NAME|best] [out=PATH]`: the encoder cut at one layer.

Guillotine Regularization (Bordes et al., TMLR 2023): the layer to keep is often not the last one, so an
export is "the network up to layer L". `PATH/encoder.safetensors` holds only the tensors a
forward pass to L reads (input normalisation, stem, the stages/blocks up to L, projector blocks
up to L); `PATH/export.json` holds the encoder spec, the layer and its width.

    from ssl_lab.export import load_exported
    net = load_exported("runs/x/export-stage3")     # nn.Module in eval mode
    feats = net(images)                             # float NCHW in [0, 1] -> (N, net.width)

Which tensors are needed is measured, not hard-coded per architecture: forward hooks record the
modules a forward pass to L calls, so a new backbone exports correctly without code here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ssl_lab.config_io import pop_options, short
from ssl_lab.errors import UserError
from ssl_lab.models.encoder import (
    Encoder,
    check_spec,
    encoder_from_spec,
    load_encoder,
    read_spec,
)
from ssl_lab.rundir import check_usable
from ssl_lab.runtime import os_user_error, path_kind, read_json, short_path

EXPORT_JSON, WEIGHTS = "export.json", "encoder.safetensors"
FORMAT = "ssl-lab-export"


# ----------------------------------------------------------------------------- which tensors


def used_modules(encoder: Encoder, layer: str) -> set[str]:
    """Names of the submodules a forward pass to `layer` calls, and their ancestors ('' = root)."""
    names = {id(m): n for n, m in encoder.named_modules()}
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: called.add(names[id(mod)]))
             for m in encoder.modules()]
    try:
        x = torch.zeros(1, encoder.in_chans, encoder.image_size, encoder.image_size)
        with torch.no_grad():
            encoder.eval().features(x, [layer])
    finally:
        for hook in hooks:
            hook.remove()
    # containers (the encoder, a ViT's cls_token/pos_embed holder) own tensors but are never
    # called themselves: an ancestor of a called module is used too
    return {".".join(n.split(".")[:i]) for n in called for i in range(n.count(".") + 2)} | {""}


def needed_state(encoder: Encoder, layer: str) -> dict[str, torch.Tensor]:
    """The state-dict entries read by a forward pass to `layer` (copies, contiguous, on CPU)."""
    used = used_modules(encoder, layer)
    state = encoder.state_dict()
    keep = {}
    for name, module in encoder.named_modules():
        if name not in used:
            continue
        prefix = f"{name}." if name else ""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        keep |= {prefix + k: state[prefix + k] for k, _ in own if prefix + k in state}
    return {k: v.detach().cpu().contiguous().clone() for k, v in keep.items()}


class Removed(nn.Module):
    """Stands where an exported encoder has no weights: using it is an error, not garbage."""

    def __init__(self, layer: str, name: str):
        super().__init__()
        self.layer, self.name = layer, name

    def forward(self, *args: Any) -> torch.Tensor:
        raise UserError(f"this encoder was exported cut at layer '{self.layer}': '{self.name}' "
                        "is not part of it; export the run again at a deeper layer")


def prune(encoder: Encoder, keys: set[str], layer: str) -> None:
    """Replace each module that owns tensors, none of them in `keys`, by `Removed`.

    Only the tensor holders (convs, norms, linears) go: containers stay, because code reads
    their attributes (a projector's `feature_dims`) even when they are not run."""
    for name, module in list(encoder.named_modules()):
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if name and own and not {f"{name}.{k}" for k, _ in own} & keys:
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, Removed(layer, name))


# ----------------------------------------------------------------------------- export / load


class ExportedEncoder(nn.Module):
    """Images (N, C, H, W) float in [0, 1] → (N, width) features of `layer` (normalised inside)."""

    def __init__(self, encoder: Encoder, layer: str):
        super().__init__()
        self.encoder, self.layer = encoder, layer
        self.width = encoder.feature_dims[layer]
        self.in_chans, self.image_size = encoder.in_chans, encoder.image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x, [self.layer])[self.layer]


def resolve_layer(run_dir: Path, layer: str, encoder: Encoder) -> tuple[str, str]:
    """(layer name, where it came from); `best` reads best_layer from summary.json/eval.json."""
    if layer == "best":
        for name in ("summary.json", "eval.json"):
            best = _best_layer(run_dir / name)
            if best:
                layer, source = best, f"best_layer of {name}"
                break
        else:
            raise UserError(f"{run_dir} has no best_layer (no summary.json or eval.json with one); "
                            f"run `ssl-lab eval {run_dir}` first or pass layer=NAME "
                            f"(one of {', '.join(encoder.layer_names)})")
    else:
        source = "given"
    if layer not in encoder.feature_dims:
        raise UserError(f"unknown layer '{layer}'; valid layers: {', '.join(encoder.layer_names)}")
    return layer, source


def _best_layer(path: Path) -> str | None:
    """best_layer of a run's summary.json / eval.json (None when the file has none)."""
    if not path.is_file():
        return None
    fix = f"run `ssl-lab eval {short_path(path.parent)}` to write it again, or pass layer=NAME"
    report = read_json(path, path.name, fix)
    best = report.get("best_layer") if isinstance(report, dict) else None
    if best is not None and not isinstance(best, str):
        raise UserError(f"{short_path(path)}: best_layer is {short(str(best))}, not a layer name: "
                        f"the file is damaged; {fix}")
    return best


def export(run_dir: str | Path, layer: str = "best", out: str | Path | None = None, *,
           backbone: nn.Module | None = None, allow_import: bool = False) -> Path:
    """Write `out` (default RUN_DIR/export-<layer>) with encoder.safetensors + export.json.
    A wrapped module's run needs its `backbone` (models/encoder.py)."""
    from ssl_lab import checkpoint as ckpt_io

    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    encoder = load_encoder(run_dir, backbone, allow_import)
    layer, source = resolve_layer(run_dir, layer, encoder)
    out = Path(out) if out else run_dir / f"export-{layer}"
    _check_target(out)
    tensors = needed_state(encoder, layer)
    meta = {"format": FORMAT, "version": 1, "layer": layer, "width": encoder.feature_dims[layer],
            "layer_source": source, "encoder": spec, "run_dir": str(run_dir.resolve()),
            "checkpoint": str(ckpt_io.find_checkpoint(run_dir)),
            "parameters": sum(p.numel() for n, p in encoder.named_parameters() if n in tensors),
            "input": "float (N, in_chans, image_size, image_size) in [0, 1]; normalised inside"}
    _write_atomic(out, tensors, meta)
    return out


def _check_target(out: Path) -> None:
    """Never clobber something that is not a previous export."""
    check_usable(out, "out")
    if out.exists() and not (out / EXPORT_JSON).is_file() and (
            not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an ssl-lab export; choose another out=")


def _write_atomic(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # serialised in memory, written with a plain write: a full disk is an OSError
        (tmp / WEIGHTS).write_bytes(save(tensors, metadata={"layer": meta["layer"]}))
        (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except OSError as exc:
        raise os_user_error("cannot write the export", out, exc, "choose another out=") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing is left after the rename


def load_exported(path: str | Path, backbone: nn.Module | None = None) -> ExportedEncoder:
    """The exported encoder (a directory made by `export`, or its export.json), in eval mode;
    the export of a wrapped module's run needs its `backbone` again."""

    path = Path(path)
    folder = path.parent if path.name in (EXPORT_JSON, WEIGHTS) else path
    if path_kind(folder / EXPORT_JSON, "the export") != "file":
        raise UserError(f"{folder} is not an ssl-lab export (no {EXPORT_JSON}); make one with "
                        "`ssl-lab export RUN_DIR`")
    meta = read_json(folder / EXPORT_JSON, EXPORT_JSON, "export the run again")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder / EXPORT_JSON} is not an ssl-lab export file")
    encoder = encoder_from_spec(check_spec(meta.get("encoder"), folder / EXPORT_JSON),
                                backbone=backbone)
    layer = meta.get("layer")
    if not isinstance(layer, str) or layer not in encoder.feature_dims:
        raise UserError(f"{folder / EXPORT_JSON}: layer {short(str(layer))} is not a layer of its "
                        "encoder: the file is damaged; export the run again")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {folder / WEIGHTS} ({exc}); export the run again") from None
    prune(encoder, set(tensors), meta["layer"])
    try:
        encoder.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0][:300]
        raise UserError(f"{folder / WEIGHTS} does not match its export.json ({detail}); export "
                        "the run again") from None
    return ExportedEncoder(encoder, meta["layer"]).eval()


# ----------------------------------------------------------------------------- command line


def cmd_export(ns: argparse.Namespace) -> None:
    options, rest = pop_options(ns.options, {"layer": "best", "out": None}, "export")
    if rest:
        raise UserError(f"unexpected argument '{rest[0]}'; export takes layer=NAME|best and out=PATH")
    out = export(ns.run_dir, str(options["layer"]), options["out"],
                 allow_import=getattr(ns, "allow_import", False))
    meta = json.loads((out / EXPORT_JSON).read_text())
    print(f"exported layer {meta['layer']} (width {meta['width']}, {meta['parameters']:,} "
          f"parameters) to {out}; load it with ssl_lab.export.load_exported('{out}')")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the encoder cut at one layer (default: best_layer)")
    p.add_argument("run_dir")
    p.add_argument("options", nargs="*", help="layer=NAME|best (default best), out=PATH (default "
                   "RUN_DIR/export-<layer>)")
    p.set_defaults(func=cmd_export)
