"""`ssl-lab import SRC DEST [backbone=resnet50] [in_chans=3] [image_size=224] [stem=imagenet]`:
a released ResNet as an ssl-lab run directory.

SRC is a state dict in torchvision's ResNet layout: a `.safetensors` file, or a `.pth/.pt`
read with `torch.load(weights_only=True)` (tensors and plain containers only: a file that needs
arbitrary unpickling is refused, never executed). It may be nested under "state_dict"/"model"
and carry a prefix ("module.", "backbone.", "module.encoder_q." ...): the prefix is found from
where `layer1.0.conv1.weight` sits, and `prefix=...` picks one when a file holds several
networks (MoCo's query and key encoders). `fc.*` and keys outside the prefix (projectors,
predictors) are ignored; everything the architecture needs must be there with its shape.

DEST gets what `ssl-lab train` writes for a run before training (config.yaml, encoder.json
with ImageNet's mean/std, checkpoints/step-0000000 holding `model.encoder.*`), with no
projector, so `ssl-lab eval DEST data.name=...`, `ssl-lab export` and RCDM work on it. Extra
options: `width=`, `last_width=` (the ssl-lab knobs; torchvision files are width 1) and any
dotted config key (e.g. `data.name=cifar10`, used by eval and RCDM by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ssl_lab.checkpoint import torch_load_error
from ssl_lab.config import Config, validate
from ssl_lab.config_io import from_dict, parse_override, save_config, set_dotted, short
from ssl_lab.errors import UserError
from ssl_lab.runtime import short_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPTIONS: dict[str, Any] = {"backbone": "resnet50", "in_chans": 3, "image_size": 224,
                           "stem": "imagenet", "width": 1.0, "last_width": None, "prefix": None}
NESTED = ("state_dict", "model", "model_state_dict")
COMMON_PREFIXES = {"module", "backbone", "encoder", "model", "net"}
ANCHOR = "layer1.0.conv1.weight"  # present in every torchvision ResNet
# image_size bounds: the import's proof forward pass and eval's batches are sized from it
MIN_SIZE, MAX_SIZE = 8, 1024


# ----------------------------------------------------------------------------- reading


def read_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only torch file (nesting removed)."""
    if not src.is_file():
        raise UserError(f"weights file {short_path(src)} not found")
    if src.suffix == ".safetensors":
        try:
            return load_file(str(src))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"cannot read {short_path(src)} as safetensors ({_first_line(exc)}); "
                            "the file is damaged or not safetensors") from None
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  any failure to parse a user's file is the file's fault
        # checkpoint's own wording: torch's message advises unpickling, which is never quoted
        raise UserError(f"{torch_load_error(src, exc, 'it is damaged or not a torch file')}; "
                        "re-save the weights with torch.save(model.state_dict(), path)") from None
    return _unnest(obj, src)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _unnest(obj: Any, src: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        inner = next((obj[k] for k in NESTED if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not tensors:
        raise UserError(f"{short_path(src)} holds no state dict (a mapping of names to tensors, "
                        f"possibly under {' / '.join(NESTED)})")
    return tensors


def choose_prefix(keys: list[str], given: str | None) -> str:
    """The prefix in front of the ResNet's names; UserError when several networks fit."""
    found = sorted({k[: -len(ANCHOR)] for k in keys
                    if k.endswith(ANCHOR) and (k == ANCHOR or k[-len(ANCHOR) - 1] == ".")})
    if given is not None:
        given = given if not given or given.endswith(".") else given + "."
        if given not in found:
            raise UserError(f"prefix={short(given)} is not in front of {ANCHOR} in this file; "
                            f"found: {short(found) if found else 'none'}")
        return given
    if len(found) <= 1:
        return found[0] if found else ""  # no ResNet at all: verification lists what is missing
    common = [p for p in found if set(p.split(".")[:-1]) <= COMMON_PREFIXES]
    if len(common) == 1:
        return common[0]
    raise UserError(f"the file holds several ResNets (prefixes {short(found, 160)}); "
                    "choose one with prefix=...")


# ----------------------------------------------------------------------------- checking


def match_backbone(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   src: Path) -> dict[str, torch.Tensor]:
    """`tensors` (prefix already removed) checked against the architecture's state dict."""
    state = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    for key in expected:  # older checkpoints predate BatchNorm's counter: it is never read
        bn = key.removesuffix("num_batches_tracked")
        if bn != key and key not in state and f"{bn}running_mean" in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:4]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})" if unexpected else "",
                 f"{len(shapes)} with another shape (file vs model: {shapes[:3]})"
                 if shapes else ""]
        raise UserError(f"{short_path(src)} does not match the chosen architecture: "
                        f"{'; '.join(p for p in parts if p)}; {describe(state)}")
    return state


def describe(state: dict[str, torch.Tensor]) -> str:
    """What the file looks like, so the error says which options would fit it."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        return "it does not look like a torchvision-layout ResNet (no conv1.weight)"
    blocks = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    bottleneck = "layer1.0.conv3.weight" in state
    known = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50"}
    arch = known.get((bottleneck, blocks),
                     f"a {'bottleneck ' if bottleneck else ''}ResNet with {blocks} stage-3 blocks")
    stem = "imagenet" if conv1.shape[-1] == 7 else "cifar or small"
    return (f"the file looks like {arch} with width={conv1.shape[0] / 64:g}, "
            f"in_chans={conv1.shape[1]}, stem={stem}")


# ----------------------------------------------------------------------------- writing


def import_resnet(src: str | Path, dest: str | Path, config_overrides: list[str] = (),
                  **options: Any) -> Path:
    """Import SRC into a new run directory DEST; options as OPTIONS (backbone, in_chans, ...)."""
    from ssl_lab.models.encoder import encoder_from_spec

    src, dest = Path(src), Path(dest)
    opts = _check_options(options)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} already exists; choose a new directory for the imported run")
    cfg = import_config(opts, list(config_overrides))
    spec = import_spec(cfg, opts, src)
    tensors = read_state_dict(src)
    prefix = choose_prefix(list(tensors), opts["prefix"])
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    # shapes only (no memory): width=/last_width= are checked against the file before a
    # network sized from them is allocated
    with torch.device("meta"):
        expected = encoder_from_spec(spec).backbone.state_dict()
    state = match_backbone(own, expected, src)
    encoder = encoder_from_spec(spec).eval()
    encoder.backbone.load_state_dict(state, strict=True)
    with torch.no_grad():  # a forward pass proves the run is usable before it is written
        encoder(torch.zeros(1, opts["in_chans"], opts["image_size"], opts["image_size"]))
    spec["imported_from"] = {"path": str(src.resolve()), "prefix": prefix,
                             "ignored_keys": len(tensors) - len(own)}
    _write_run(dest, cfg, spec, encoder)
    return dest


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UserError(f"unknown import option {short(unknown[0])}; options: {', '.join(OPTIONS)} "
                        "and dotted config keys such as data.name=cifar10")
    opts = OPTIONS | options
    from ssl_lab.models.resnet import ARCHS

    if not isinstance(opts["backbone"], str) or opts["backbone"] not in ARCHS:
        raise UserError(f"import reads torchvision-layout ResNets: backbone must be one of "
                        f"{', '.join(ARCHS)}, got {short(opts['backbone'])}")
    size = opts["image_size"]
    if not _is_int(size) or not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"import option image_size={short(size)} is out of range: use an "
                        f"integer in [{MIN_SIZE}, {MAX_SIZE}], the size the weights were trained "
                        "at (224 for ImageNet ResNets)")
    if not _is_int(opts["in_chans"]) or opts["in_chans"] not in (1, 3):
        raise UserError(f"import option in_chans={short(opts['in_chans'])} is not supported: "
                        "use 3 (RGB, as ImageNet ResNets) or 1 (grey)")
    if opts["prefix"] is not None:
        opts["prefix"] = str(opts["prefix"])
    return opts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _eval_batch(size: int) -> int:
    """Feature-extraction batch for `size`-px inputs: activations grow with the pixels."""
    return 512 if size < 128 else 64 if size <= 256 else 16


def import_config(opts: dict[str, Any], overrides: list[str]) -> Config:
    """The run's config.yaml: the model section, eval settings sized for the input, overrides."""
    model = {"backbone": opts["backbone"], "width": opts["width"], "last_width": opts["last_width"],
             "stem": opts["stem"], "projector": "none"}
    tree: dict[str, Any] = {"model": model, "run": {"name": "imported"},
                            # 224-px ResNet-50 activations: 1024 images would need tens of GB
                            "eval": {"batch_size": _eval_batch(opts["image_size"])}}
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("model."):
            raise UserError(f"'{key}' is set by the import; use the options backbone=, width=, "
                            "last_width=, stem= instead")
        set_dotted(tree, key, value)
    cfg = from_dict(tree, Config)
    validate(cfg)
    return cfg


def import_spec(cfg: Config, opts: dict[str, Any], src: Path) -> dict[str, Any]:
    """encoder.json: ImageNet statistics (grey: their mean) since released weights expect them."""
    n = opts["in_chans"]
    mean = list(IMAGENET_MEAN) if n == 3 else [sum(IMAGENET_MEAN) / 3] * n
    std = list(IMAGENET_STD) if n == 3 else [sum(IMAGENET_STD) / 3] * n
    return {"model": asdict(cfg.model), "in_chans": n, "image_size": opts["image_size"],
            "mean": mean, "std": std, "num_classes": None, "dataset": cfg.data.name,
            "target": cfg.data.target}


def _write_run(dest: Path, cfg: Config, spec: dict[str, Any], encoder: torch.nn.Module) -> None:
    """Written in a temporary directory renamed at the end: never a half-imported run."""
    from ssl_lab.checkpoint import save_checkpoint

    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.run.dir = str(dest)
    save_config(cfg, tmp / "config.yaml")
    (tmp / "encoder.json").write_text(json.dumps(spec, indent=1))
    holder = torch.nn.Module()  # same names as a trained run: model.encoder.*
    holder.encoder = encoder
    save_checkpoint(tmp, 0, {"model": holder}, {"step": 0, "epoch": 0,
                                                "imported_from": spec["imported_from"]["path"]})
    if dest.exists():
        dest.rmdir()  # empty (checked above)
    os.rename(tmp, dest)


# ----------------------------------------------------------------------------- command line


def cmd_import(ns: argparse.Namespace) -> None:
    options, overrides = {}, []
    for text in ns.options:
        key, value = parse_override(text)
        if "." in key:
            overrides.append(text)
        else:
            options[key] = value
    dest = import_resnet(ns.src, ns.dest, overrides, **options)
    print(f"imported {ns.src} into {dest}; evaluate it with `ssl-lab eval {dest} data.name=...`")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="a torchvision-layout ResNet state dict as a run directory")
    p.add_argument("src", help=".safetensors or .pth/.pt (loaded with weights_only=True)")
    p.add_argument("dest", help="new run directory")
    p.add_argument("options", nargs="*", help="backbone=resnet50 in_chans=3 image_size=224 "
                   "stem=imagenet [width=1] [last_width=N] [prefix=module.] [data.name=...]")
    p.set_defaults(func=cmd_import)
