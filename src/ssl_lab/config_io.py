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
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from ssl_lab.errors import UserError
from ssl_lab.runtime import write_text_atomic


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], cls: type, prefix: str = "", root: type | None = None
              ) -> Any:
    """Build a dataclass tree from a nested dict, rejecting unknown keys and wrong types.
    `root` is the top-level config class (for suggestions); it defaults to `cls`."""
    root = root or cls
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix or 'top level'}' must be a mapping, got {data!r}")
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
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key_message(dotted: str, root: type) -> str:
    close = difflib.get_close_matches(dotted, all_keys(root), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see the config table in README.md"
    return f"unknown config key '{dotted}'{hint}"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a leaf annotation; ints are accepted where floats are expected."""
    options = _union_members(hint)
    for option in options:
        if option is type(None) and value is None:
            return None
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    lenient = _lenient(value, options)
    if lenient is not None:
        return lenient
    expected = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise UserError(f"config key '{key}' expects {expected}, got {value!r}")


def _lenient(value: Any, options: tuple) -> Any:
    """Second chance for YAML's quirks: PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`)
    and `model.projector=128` as an int; both mean what the user typed."""
    if float in options and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if str in options and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` → ("a.b", value) with the value read as YAML (so 3 is int, null is None)."""
    if "=" not in text:
        raise UserError(f"argument '{text}' is not key=value (example: optim.lr=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def split_config_args(args: list[str], first: str = "the YAML file"
                      ) -> tuple[str | None, list[str]]:
    """`[FIRST] [key=value ...]`: the first argument without '=' is `first` (a config file, an
    encoder run...)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        raise UserError(f"unexpected argument '{stray[0]}': give {first} first, then "
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
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown {command} option '{key}'{hint} (options: "
                            f"{', '.join(f'{k}=' for k in defaults)})")
    return options, rest


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a section")
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in packaged_configs().glob("*.yaml")))
        raise UserError(f"config file {path} not found; pass an existing YAML file or a packaged "
                        f"recipe ({names})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of config sections")
    return data


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
            raise UserError(f"cannot resume: {saved} is not a config of this command ({exc})"
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
        raise UserError(f"cannot resume: {path} is unreadable ({exc}); restore it or start a "
                        "new run.dir") from None


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
        if key == "train.epochs" and isinstance(value, (int, float)) and value > old:
            sys.stderr.write(f"ssl-lab: train.epochs raised from {old} to {value} on resume: the "
                             "lr schedule (warm-up + cosine) is recomputed for the new length from "
                             "the resumed step on, so the lr jumps and the run no longer equals a "
                             f"fresh {value}-epoch run\n")
            continue
        raise UserError(f"resume: {key} is {_short(old)} in {path} but {_short(value)} was given; "
                        f"drop {key} to continue the run as saved, or start a new run.dir (README, "
                        "'Resume', lists the keys that may change)")


def _is_safe(key: str, safe_keys: tuple[str, ...]) -> bool:
    return any(key == s or s.endswith(".*") and key.startswith(s[:-1]) for s in safe_keys)


def _same(old: Any, new: Any) -> bool:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(
            old, bool) and not isinstance(new, bool):
        return float(old) == float(new)
    return old == new


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
