"""Typed dataclasses from YAML mappings and `--section.field=value` overrides.

`build_dataclass(cls, mapping, where)` converts every value to its field's type (nested dataclasses,
Optional / Union, Literal, lists, torch dtypes, numbers written as strings such as "1e3"). An unknown key
gets a "did you mean" hint. Every problem is collected and raised as one ConfigError that lists them all,
each naming its field. `parse_overrides` turns command-line overrides into a nested mapping, and `merge`
lays one mapping over another. Nothing here knows a particular config: training/config.py holds the
schema of `nbdiff train` and its validation.

Why not a library: dacite builds dataclasses from dicts, but it converts strings ("1e3", "true") only
through hooks written per type, and it stops at the first error. OmegaConf's structured configs do not
take `Literal` fields. Either one would change the messages users get today.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal, Union

import torch
import yaml

from nbdiff_megatron.errors import ConfigError


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and torch dtypes as plain dicts, lists and strings (YAML/JSON-ready)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if hasattr(value, "is_floating_point"):  # a torch.dtype
        return str(value).replace("torch.", "")
    return value


def did_you_mean(name: str, choices: list[str]) -> str:
    """A hint naming the closest of `choices` to `name`, else the list of them."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return (
        f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(choices))}."
    )


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the field type `tp`, or raise ConfigError naming `where`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not a {tp}")
    if origin is Literal:
        if value in args:
            return value
        hint = did_you_mean(str(value), [str(a) for a in args])
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}.{hint}")
    if origin in (list, tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if re.fullmatch(r"[0-9.eE+_-]+", value) else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    if getattr(tp, "__module__", "") == "torch" and isinstance(value, str):  # torch.dtype fields
        dtype = getattr(torch, value.replace("torch.", ""), None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise ConfigError(f"{where}: {value!r} is not a torch dtype (e.g. float32, bfloat16)")
    return value


def _resolved_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a hint that cannot be resolved here: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and types."""
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {raw!r}")
    hints = _resolved_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    problems = Problems()
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            problems.need(
                False,
                f"unknown config key '{path}'.{did_you_mean(str(key), names)}"
                " Fix the YAML file or the --override.",
            )
            continue
        try:
            kwargs[key] = coerce(value, hints.get(key, Any), path)
        except ConfigError as exc:
            problems.add(exc)
    problems.raise_if_any()
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`['--a.b=1', 'c.d=x']` -> nested dict {'a': {'b': 1}, 'c': {'d': 'x'}} (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(
                f"override '{item}' has no value: write it as --section.field=value "
                "(e.g. --train.steps=100)"
            )
        key, raw_value = text.split("=", 1)
        parts = [p for p in key.replace("-", "_").split(".") if p]
        if len(parts) < 2:
            raise ConfigError(
                f"override '{item}' must name a section and a field, e.g. --train.steps=100"
            )
        try:
            value = yaml.safe_load(raw_value) if raw_value != "" else None
        except yaml.YAMLError:
            value = raw_value
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of {part}")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, nested mappings merged key by key (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class Problems:
    """Collects every config problem, so that one run reports them all at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def need(self, cond: bool, message: str) -> None:
        """Keep `message` unless `cond` holds."""
        if not cond:
            self.messages.append(message)

    def add(self, exc: ConfigError) -> None:
        """Keep the message(s) of a ConfigError (a collected one brings its whole list)."""
        self.messages.extend(getattr(exc, "problems", None) or [str(exc)])

    def check(self, fn: Any, *args: Any, section: str = "data") -> None:
        """Run a check that raises ConfigError (or ValueError, reported as `section: message`) and
        keep its message(s)."""
        try:
            fn(*args)
        except ConfigError as exc:
            self.add(exc)
        except ValueError as exc:
            self.messages.append(f"{section}: {exc}")

    def raise_if_any(self) -> None:
        """One ConfigError listing every problem kept (none: return)."""
        raise_collected(self.messages)


def raise_collected(messages: list[str]) -> None:
    """Raise one ConfigError listing every message (none: return); `.problems` keeps the list."""
    if not messages:
        return
    if len(messages) == 1:
        error = ConfigError(messages[0])
    else:
        items = "\n".join(f"  - {m}" for m in messages)
        error = ConfigError(f"{len(messages)} problems in the config:\n{items}")
    error.problems = list(messages)
    raise error
