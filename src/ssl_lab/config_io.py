"""The typed-config machinery every command shares: dataclass trees from YAML files and
`key=value` arguments (unknown keys and wrong types rejected), resume against a run's saved
config.yaml, and command options. ssl_lab.config holds the training run's own tree.

A config is a tree of dataclasses. Every leaf has a type annotation that is *checked* when a
value arrives from YAML or the command line, and every key must exist: a typo is an error, not
a silently ignored setting. `to_dict` / `from_dict` round-trip, so the `config.yaml` written into
a run directory re-runs the same experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from ssl_lab.errors import UserError
from ssl_lab.runtime import write_text_atomic

# A config file is a few kB; anything above this is the wrong file (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_PARTS = 8  # every config tree is 2 levels deep; a deeper key is a typo, never a setting
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 6, 6
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters: messages never echo unbounded input (a
    megabyte string, a list of a million items, an int of 5000 digits)."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # int too long to print, self-referencing structure
        text = f"<a {type(value).__name__} too large to show>"
    return cut(text, limit)


def cut(text: str, limit: int = 120) -> str:
    """`text` (a path, a key) cut to `limit` characters, marked with '...' when cut."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type, prefix: str = "", root: type | None = None
              ) -> Any:
    """Build a dataclass tree from a nested dict, rejecting unknown keys and wrong types.
    `root` is the top-level config class (for suggestions); it defaults to `cls`."""
    root = root or cls
    if not isinstance(data, dict):
        raise UserError(f"config section '{cut(prefix, 60) or 'top level'}' must be a mapping, "
                        f"got {short(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise UserError(_unknown_key_message(dotted, root))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint, f"{dotted}.", root)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a dataclass tree, dotted ("optim.lr")."""
    return list(leaf_hints(cls, prefix))


def leaf_hints(cls: type, prefix: str = "") -> dict[str, Any]:
    """{dotted key: its type annotation} for every leaf of a dataclass tree."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(leaf_hints(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


def numeric_keys(cls: type) -> list[str]:
    """The keys whose value may be a number (int or float, possibly also null or a string):
    each needs a Range in its config's table (tests check that none is missing)."""
    return [key for key, hint in leaf_hints(cls).items()
            if {int, float} & set(union_members(hint))]


def _unknown_key_message(dotted: str, root: type) -> str:
    # a long key is no typo of a real one (and difflib on it would be slow)
    close = difflib.get_close_matches(dotted, all_keys(root), n=1) if len(dotted) < 100 else []
    hint = f"; did you mean '{close[0]}'?" if close else "; see the config table in README.md"
    return f"unknown config key '{cut(dotted, 60)}'{hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a leaf annotation; ints are accepted where floats are expected."""
    options = union_members(hint)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _as_float(value, key)
        if option is str and isinstance(value, str):
            return value
    lenient = _lenient(value, options)
    if lenient is not None:
        return lenient
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise UserError(f"config key '{cut(key, 60)}' expects {expected}, got {short(value)}")


def _as_float(value: int | float, key: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range (1e308)
        raise UserError(f"config key '{key}' must be a finite number, got {short(value)}"
                        ) from None


def _lenient(value: Any, options: tuple) -> Any:
    """Second chance for YAML's quirks: PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`)
    and `model.projector=128` as an int; both mean what the user typed."""
    if float in options and isinstance(value, str):
        try:
            return float(value)  # "nan" and "inf" too: the key's Range then refuses them
        except ValueError:
            return None
    if str in options and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def union_members(hint: Any) -> tuple:
    """The types of an annotation: (int, NoneType) for `int | None`, (float,) for `float`."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value) with the value read as YAML (so 3 is int, null is None)."""
    if "=" not in text:
        raise UserError(f"argument '{cut(text, 60)}' is not key=value (example: optim.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml_text(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw  # not YAML (or an alias, or a number too long): the text as typed
    return key.strip(), value


def split_config_args(args: list[str], first: str = "the YAML file"
                      ) -> tuple[str | None, list[str]]:
    """`[FIRST] [key=value ...]`: the first argument without '=' is `first` (a config file, an
    encoder run...)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument '{cut(stray[0], 60)}': give {first} first, then "
                        "key=value (quote a list that contains spaces: 'key=[a, b]')")
    return None, args


def pop_options(args: list[str], defaults: dict[str, Any], command: str) -> tuple[dict, list[str]]:
    """A command's own `name=value` options (every command takes key=value, as `train`):
    ({name: value read as YAML, else the default}, the remaining arguments). Option names have
    no dot, so they never collide with config keys."""
    options, rest = dict(defaults), []
    for text in args:
        key, value = parse_override(text) if "=" in text else (None, None)
        if key is None or "." in key or key in ("seed", "resume"):
            rest.append(text)
        elif key in defaults:
            options[key] = value
        else:
            close = difflib.get_close_matches(key, list(defaults), n=1) if len(key) < 100 else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown {command} option '{cut(key, 60)}'{hint} (options: "
                            f"{', '.join(f'{k}=' for k in defaults)})")
    return options, rest


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[a][b] = value for key "a.b"."""
    node = tree
    parts = key.split(".")
    if len(parts) > MAX_KEY_PARTS:
        raise UserError(f"unknown config key '{cut(key, 60)}': keys are section.name "
                        "(see the config table in README.md)")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{cut(key, 60)}': '{cut(part, 40)}' is not a section")
    node[parts[-1]] = value


def packaged_configs() -> Path:
    """The recipes that ship inside the package (the repository's configs/ links to them)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path as given, else a packaged recipe by name: `simclr`, `simclr.yaml` and
    `configs/simclr.yaml` all work from any directory, also from an installed wheel."""
    path = Path(path)
    if path.is_file() or len(path.parts) > 2 or len(path.parts) == 2 and path.parts[0] != "configs":
        return path
    packaged = packaged_configs() / f"{path.stem}.yaml"
    return packaged if path.suffix in ("", ".yaml") and packaged.is_file() else path


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: `*name` repeats a node by reference, so a 400-byte file of nested
    aliases expands to gigabytes when walked (a "billion laughs"). No config needs them."""

    def compose_node(self, parent, index):  # noqa: D102 (PyYAML's hook)
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _AliasError(f"a YAML alias at line {mark.line + 1}")
        return super().compose_node(parent, index)


class _AliasError(yaml.YAMLError):
    pass


def _load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping; every way the file can be wrong is one UserError line."""
    where = f"config file {cut(path)}"
    try:
        path = resolve_config_path(path)
        found = path.is_file()
    except OSError as exc:  # a name longer than the file system allows, a loop of links
        raise UserError(f"{where} cannot be looked up ({exc.strerror or exc}); pass an existing "
                        "YAML file") from None
    if not found:
        names = ", ".join(sorted(p.stem for p in packaged_configs().glob("*.yaml")))
        raise UserError(f"{where} not found; pass an existing YAML file or a packaged "
                        f"recipe ({names})")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {where} ({exc.strerror or exc}); check its permissions"
                        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UserError(f"{where} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few "
                        "kB of YAML: pass the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (byte {exc.start}); save it as UTF-8 "
                        "YAML") from None
    data = _parse_config_text(text, where) or {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a mapping of config sections, got {short(data)}")
    return data


def _parse_config_text(text: str, where: str) -> Any:
    try:
        return _load_yaml_text(text)
    except _AliasError as exc:
        raise UserError(f"{where} uses {exc}; anchors and aliases (&name, *name, <<) are not "
                        "allowed in configs: write the values out") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"{where} is not valid YAML{at}; fix the syntax") from None
    except ValueError:  # PyYAML builds an int of more than 4300 digits
        raise UserError(f"{where} holds a number too long to read; fix the value") from None
    except RecursionError:
        raise UserError(f"{where} is nested too deeply; a config is sections of keys") from None


def load_typed(cls: type, path: str | Path | None, overrides: list[str] | tuple = (),
               safe_keys: tuple[str, ...] = (), check=None, base: dict | None = None) -> Any:
    """Any command's typed config tree (a dataclass with `resume` and `run.dir`): `base` (or
    the defaults) ← YAML file ← `key=value`; on resume the run's own config.yaml is the base
    and what was given must agree with it (resume_conflicts). `check` validates values."""
    given: dict[str, Any] = read_yaml(path) if path else {}
    for text in overrides:
        set_dotted(given, *parse_override(text))
    tree = _merge(base or {}, given)
    cfg = from_dict(tree, cls)  # the user's own input is typed and checked first
    saved = Path(cfg.run.dir) / "config.yaml" if cfg.resume and cfg.run.dir else None
    if saved is not None and saved.is_file():
        saved_tree = _saved_tree(saved)
        try:
            saved_cfg = from_dict(saved_tree, cls)
        except UserError as exc:
            raise UserError(f"cannot resume: {cut(saved)} is not a config of this command ({exc})"
                            ) from None
        typed = flatten(to_dict(cfg))  # what was given, as typed values (128 -> "128")
        given_keys = [k for k in flatten(tree) if k in typed]
        resume_conflicts(to_dict(saved_cfg), {k: typed[k] for k in given_keys}, safe_keys, saved)
        cfg = from_dict(_merge(to_dict(saved_cfg), tree), cls)
    if check is not None:
        check(cfg)
    return cfg


def _saved_tree(path: Path) -> dict[str, Any]:
    try:
        return read_yaml(path)
    except UserError as exc:
        raise UserError(f"cannot resume: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot resume: {cut(path)} is unreadable ({short(exc, 80)}); restore "
                        "it or start a new run.dir") from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def resume_conflicts(saved: dict[str, Any], given: dict[str, Any], safe_keys: tuple[str, ...],
                     path: Path) -> None:
    """Refuse (one line, exit 2) a resume whose given keys differ from the saved run's, except
    `safe_keys` (a trailing `.*` covers a section) and a raised train.epochs."""
    saved_flat = flatten(saved)
    for key, value in given.items():
        if key in ("resume", "run.dir") or _is_safe(key, safe_keys) or key not in saved_flat:
            continue
        old = saved_flat[key]
        if _same(old, value):
            continue
        if key == "train.epochs" and isinstance(value, (int, float)) and old < value < math.inf:
            sys.stderr.write(f"ssl-lab: train.epochs raised from {old} to {value} on resume: the "
                             "lr schedule (warm-up + cosine) is recomputed for the new length from "
                             "the resumed step on, so the lr jumps and the run no longer equals a "
                             f"fresh {value}-epoch run\n")
            continue
        raise UserError(f"resume: {key} is {short(old)} in {cut(path)} but {short(value)} was given; "
                        f"drop {key} to continue the run as saved, or start a new run.dir (README, "
                        "'Resume', lists the keys that may change)")


def _is_safe(key: str, safe_keys: tuple[str, ...]) -> bool:
    return any(key == s or s.endswith(".*") and key.startswith(s[:-1]) for s in safe_keys)


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(
            old, bool) and not isinstance(new, bool):
        return float(old) == float(new)
    return old == new


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved config as YAML, written whole or not at all."""
    write_text_atomic(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
