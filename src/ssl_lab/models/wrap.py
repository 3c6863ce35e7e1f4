"""Any `nn.Module` as an ssl-lab backbone: `from_module(net, layers={"mid": "layer2", ...})`.

Forward hooks on the named sub-modules capture their outputs, reduced to (N, C): 4-D maps
(N, C, H, W) are global-average-pooled, 3-D tokens (N, T, C) give the CLS token (index 0) or
the mean over all T tokens (`token_pool`), 2-D outputs are used as is, and a tuple/list output
gives its first tensor. The entry named `backbone` (else the last entry, renamed) is the
backbone output. Widths are measured once, by one dummy forward when wrapping.

`load_factory("import:package.module:factory")` imports user code: only call it when the user
opted in (a run directory never makes ssl-lab import what it names on its own).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ssl_lab.config_io import short
from ssl_lab.errors import UserError
from ssl_lab.models.base import Backbone
from ssl_lab.models.resnet import pool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKEN_POOLS = ("cls", "mean")
_PROJ_NAME = re.compile(r"proj\d+")


class _AllCaptured(BaseException):
    """Ends the wrapped forward once every requested output is captured (layers after the
    deepest one need not run). A BaseException so a module's own `except Exception` lets it by."""


class ModuleBackbone(Backbone):
    """A wrapped `nn.Module` (registered as `module`) with the built-in backbones' protocol:
    `embed_dim`, `feature_dims`, `layer_names`, `features`, `forward`, `forward_features` and
    a JSON `config` that records what was wrapped (never used to import anything)."""

    supports_last_width = False  # Expand/Narrow rebuilds a built-in backbone's last block
    # parameters after the deepest hooked layer (a classifier head) get no gradient: DDP must
    # be told (ssl_lab.dist.wrap_ddp)
    leaves_parameters_unused = True

    def __init__(self, module: nn.Module, layers: Mapping[str, str], *, input_size: int = 32,
                 in_chans: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, token_pool: str = "cls"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise UserError(f"from_module needs a torch.nn.Module, got {type(module).__name__}")
        for key, v in dict(input_size=input_size, in_chans=in_chans).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"from_module {key} must be a positive integer (got {short(v)})")
        if token_pool not in TOKEN_POOLS:
            raise UserError(f"unknown token_pool {short(token_pool)}; choose one of "
                            f"{', '.join(TOKEN_POOLS)}")
        self.module = module
        self.paths = _layer_paths(module, layers)
        self.input_size, self.in_chans, self.token_pool = input_size, in_chans, token_pool
        self.mean = _channel_stats("mean", mean, IMAGENET_MEAN, in_chans)
        self.std = _channel_stats("std", std, IMAGENET_STD, in_chans)
        if min(self.std) <= 0:
            raise UserError(f"from_module std must be positive (got {list(self.std)})")
        self.feature_dims = self._measure_widths()
        self.embed_dim = self.feature_dims["backbone"]
        cls = type(module)
        self.config = dict(name="module", module_class=f"{cls.__module__}.{cls.__qualname__}",
                           layers=dict(self.paths), input_size=input_size, in_chans=in_chans,
                           mean=list(self.mean), std=list(self.std), token_pool=token_pool,
                           feature_dims=dict(self.feature_dims))

    def _measure_widths(self) -> dict[str, int]:
        # The one place a dummy forward is acceptable: an arbitrary module cannot declare its
        # widths. Eval mode and no_grad so BN statistics and autograd are untouched.
        modes = {m: m.training for m in self.module.modules()}
        ref = next(iter([*self.module.parameters(), *self.module.buffers()]), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        x = torch.zeros(2, self.in_chans, self.input_size, self.input_size, dtype=dtype,
                        device=ref.device if ref is not None else None)
        self.module.eval()
        try:
            with torch.no_grad():
                raw = self._run(x, list(self.paths))
        except UserError:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(
                f"a dummy forward of a {tuple(x.shape)} batch through {type(self.module).__name__}"
                f" failed ({type(err).__name__}: {first}); input_size={self.input_size} / "
                f"in_chans={self.in_chans} probably do not match the module: pass the ones it "
                "expects") from err
        finally:
            for m, training in modes.items():
                m.training = training  # exactly as before, even for a sub-module kept in eval
        return {name: int(self._pooled(name, out).shape[1]) for name, out in raw.items()}

    def _run(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, object]:
        """Raw outputs of the named layers (first call of each), hooks removed afterwards."""
        raw: dict[str, object] = {}
        wanted = set(names)

        def hook_for(name: str):
            def hook(_module: nn.Module, _args: object, out: object) -> None:
                raw.setdefault(name, out)
                # dynamo would have to trace the raise: a compiled forward simply runs to the end
                if len(raw) == len(wanted) and not torch.compiler.is_compiling():
                    raise _AllCaptured
            return hook

        handles = [self.module.get_submodule(self.paths[n]).register_forward_hook(hook_for(n))
                   for n in wanted]
        try:
            self.module(x)
        except _AllCaptured:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in raw]
        if missing:
            path = self.paths[missing[0]] or "<the module itself>"
            raise UserError(f"layer {short(missing[0])} (sub-module {short(path)}) did not run in "
                            f"{type(self.module).__name__}.forward; map it to a sub-module "
                            "that forward calls")
        return {n: raw[n] for n in names}

    def _tensor(self, name: str, out: object) -> torch.Tensor:
        if isinstance(out, tuple | list):
            out = next((o for o in out if isinstance(o, torch.Tensor)), out)
        if not isinstance(out, torch.Tensor):
            raise UserError(f"layer {short(name)} (sub-module {short(self.paths[name])}) returns "
                            f"{type(out).__name__}, not a tensor or a tuple of tensors; map the "
                            "name to a sub-module that returns a tensor")
        return out

    def _pooled(self, name: str, out: object) -> torch.Tensor:
        t = self._tensor(name, out)
        if t.dim() == 4:
            return pool(t)
        if t.dim() == 3:
            return t[:, 0] if self.token_pool == "cls" else t.mean(dim=1)
        if t.dim() == 2:
            return t
        raise UserError(f"layer {short(name)} (sub-module {short(self.paths[name])}) outputs a "
                        f"{t.dim()}-D tensor {tuple(t.shape)}; only (N, C, H, W), (N, T, C) and "
                        "(N, C) can be pooled: map the name to another sub-module")

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled (N, C) features by name from one (possibly cut short) forward of the module."""
        wanted = self.check_layers(layers)
        if not wanted:
            return {}
        return {n: self._pooled(n, out) for n, out in self._run(x, wanted).items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone output, pooled: (N, embed_dim)."""
        return self.features(x, ["backbone"])["backbone"]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone layer's raw (unpooled) output."""
        return self._tensor("backbone", self._run(x, ["backbone"])["backbone"])


def from_module(module: nn.Module, layers: Mapping[str, str], *, input_size: int = 32,
                in_chans: int = 3, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, token_pool: str = "cls") -> ModuleBackbone:
    """Wrap any `nn.Module` as a backbone whose layers are the named sub-modules' outputs.

    `layers` maps ssl-lab layer names to dotted sub-module paths (`net.get_submodule`); the entry
    named "backbone", else the last one (renamed "backbone"), is the backbone output. One dummy
    forward at (2, in_chans, input_size, input_size) measures the widths. `mean`/`std` (default
    ImageNet's) are the input statistics the module expects; the encoder normalises with them.
    """
    return ModuleBackbone(module, layers, input_size=input_size, in_chans=in_chans, mean=mean,
                          std=std, token_pool=token_pool)


def _layer_paths(module: nn.Module, layers: Mapping[str, str]) -> dict[str, str]:
    """{name: path} checked and ordered as given, the backbone entry last and named so."""
    if not isinstance(layers, Mapping) or not layers:
        raise UserError("from_module needs layers={name: 'dotted.submodule', ...} with at least "
                        "one entry (the last one is the backbone output)")
    for name, path in layers.items():
        if not isinstance(name, str) or not name.isidentifier() or _PROJ_NAME.fullmatch(name):
            raise UserError(f"bad layer name {short(name)}: use a Python identifier other than "
                            "proj<k> (those name the projector's layers)")
        if not isinstance(path, str):
            raise UserError(f"layer {short(name)} must map to a dotted sub-module path string "
                            f"(got {type(path).__name__})")
        _resolve(module, name, path)
    items = list(layers.items())
    last = next((i for i, (n, _) in enumerate(items) if n == "backbone"), len(items) - 1)
    backbone = items.pop(last)[1]
    return {**dict(items), "backbone": backbone}


def _resolve(module: nn.Module, name: str, path: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        parent = path.rpartition(".")[0]
        try:
            scope = module.get_submodule(parent)
        except AttributeError:
            parent, scope = "", module
        valid = [f"{parent}.{c}" if parent else c for c, _ in scope.named_children()][:12]
        hint = (f"valid names include: {', '.join(valid)}" if valid else
                f"{short(parent)} has no sub-modules, use it itself" if parent else
                "it has no sub-modules: map the name to '' (the module itself)")
        raise UserError(f"layer {short(name)}: {type(module).__name__} has no sub-module {short(path)}; "
                        f"{hint}") from None


def _channel_stats(key: str, given: Sequence[float] | None, imagenet: tuple[float, ...],
                   in_chans: int) -> tuple[float, ...]:
    if given is None:
        if in_chans == 3:
            return imagenet
        if in_chans == 1:
            return (sum(imagenet) / 3,)
        raise UserError(f"from_module has no default {key} for in_chans={in_chans}; pass "
                        f"{key}=(...) with {in_chans} values")
    values = tuple(float(v) for v in given)
    if len(values) != in_chans:
        raise UserError(f"from_module {key} has {len(values)} values but in_chans={in_chans}; "
                        f"pass one value per input channel")
    return values


def load_factory(spec: str) -> Backbone:
    """Import `package.module` named by "import:package.module:factory" and return `factory()`,
    which must return a backbone (e.g. `from_module(...)`).

    This imports and runs user code: call it only when the user opted in explicitly (the CLI and
    `train` guard it); a run directory's record of a wrapped module never reaches here by itself.
    """
    body = spec[len("import:"):] if isinstance(spec, str) and spec.startswith("import:") else ""
    mod_name, _, attr = body.rpartition(":")
    if not mod_name or not attr:
        raise UserError(f"bad backbone factory {short(spec)}; write import:package.module:factory")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise UserError(f"cannot import {short(mod_name)} for {short(spec)} ({err}); make it importable "
                        "(install it or add its folder to PYTHONPATH)") from None
    factory = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UserError(f"{mod_name} has no callable {short(attr)} (from {short(spec)}); name a function "
                        "that takes no arguments and returns a backbone")
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise UserError(f"{spec} returned {type(backbone).__name__}, not a backbone; make it "
                        "return ssl_lab.models.from_module(net, layers=...)")
    return backbone
