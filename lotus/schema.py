"""Validate plain dicts (from YAML) into typed, nested dataclasses.

Errors name the full key and what was expected, e.g. ``train.epochs: expected int >= 1, got 'ten'``.
Field limits come from ``dataclasses.field(metadata={"min": .., "max": .., "min_exclusive": True,
"max_exclusive": True})``. A dataclass may define ``check(self, prefix)`` for cross-field rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from lotus.errors import ConfigError

__all__ = ["ConfigError", "validate", "to_dict", "describe_type"]

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def describe_type(tp: Any) -> str:
    """Human-readable name of a type annotation ("int", "'a' | 'b'", "list of float")."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {describe_type(args[0])}" if args else "list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _limits(meta: dict) -> str:
    parts = []
    if "min" in meta:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {meta['min']}")
    if "max" in meta:
        parts.append(f"{'<' if meta.get('max_exclusive') else '<='} {meta['max']}")
    return " and ".join(parts)


def _fail(key: str, tp: Any, meta: dict, value: Any) -> None:
    lim = _limits(meta)
    expected = describe_type(tp) + (f" {lim}" if lim else "")
    if isinstance(value, float) and not math.isfinite(value):
        expected = f"a finite {expected}"
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _convert(key: str, tp: Any, value: Any, meta: dict) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(key, arg, value, meta)
            except ConfigError:  # try the next member of the union
                continue
        _fail(key, tp, meta, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in get_args(tp)):
            return value
        _fail(key, tp, meta, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(key, tp, meta, value)
        return validate(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(key, tp, meta, value)
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        out = [_convert(f"{key}[{i}]", item_tp, v, {}) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            _fail(key, tp, meta, value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, tp, meta, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, tp, meta, value)
    elif tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, tp, meta, value)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            _fail(key, tp, meta, value)
    elif isinstance(tp, type) and not isinstance(value, tp):
        _fail(key, tp, meta, value)
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, tp, meta, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            _fail(key, tp, meta, value)
        if hi is not None and (value > hi or (meta.get("max_exclusive") and value == hi)):
            _fail(key, tp, meta, value)
    return value


def validate(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys, types and limits recursively."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key (allowed in {prefix or 'the top level'}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(key, hints[name], data[name], dict(f.metadata))
        elif dataclasses.is_dataclass(hints[name]) and f.default is dataclasses.MISSING:
            kwargs[name] = validate(hints[name], {}, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    try:
        obj = cls(**kwargs)
    except ValueError as e:  # a library config (e.g. pruning.StructuredConfig) validating itself
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{str(e).removeprefix(cls.__name__ + '.')}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list tree (for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
