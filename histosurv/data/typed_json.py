"""Dataclasses to and from JSON-compatible dicts, with errors that name the field at fault.

The manifest and the h5 attributes are written by one histosurv and read by another (or by hand
edits), so reading checks every field against its type annotation and says where a value is wrong
("versions.3.encoder.preprocessing.mean: expected a list of numbers, got 'imagenet'"), instead of
failing later, far from the file, with a KeyError.

Supported annotations: the JSON scalars, ``X | None``, ``tuple[X, ...]``, ``list[X]``,
``dict[str, X]`` and nested dataclasses; ``dict`` and ``list`` without parameters are free-form.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

__all__ = ["to_json_dict", "from_json_dict", "FieldError"]


class FieldError(ValueError):
    """A value does not fit its field; ``path`` names the field (dotted)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path or 'top level'}: {message}")
        self.path = path


def to_json_dict(obj) -> Any:
    """``obj`` as plain dicts, lists and scalars (tuples become lists), ready for ``json.dumps``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_dict(v) for v in obj]
    return obj


def from_json_dict(cls, data, path: str = ""):
    """An instance of dataclass ``cls`` from ``data``; unknown keys and wrong types raise FieldError.
    Fields with defaults may be absent."""
    return _convert(cls, data, path)


def _convert(kind, value, path: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, path)
            except FieldError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else FieldError(path, f"{value!r} fits none of {[_name(o) for o in options]}")
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, path)
    if kind in (dict, list) or origin in (dict, list, tuple):
        return _container(kind, origin, args, value, path)
    return _scalar(kind, value, path)


def _dataclass(cls, value, path: str):
    if not isinstance(value, dict):
        raise FieldError(path, f"expected an object ({cls.__name__}), got {_shown(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise FieldError(path, f"unknown field(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(where, "missing")
            continue
        values[name] = _convert(hints[name], value[name], where)
    return cls(**values)


def _container(kind, origin, args, value, path: str):
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"expected an object, got {_shown(value)}")
        if not args:
            return dict(value)
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise FieldError(path, f"expected a list, got {_shown(value)}")
    if kind is list or not args:
        return list(value)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise FieldError(path, f"expected {len(args)} values, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    items = [_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _scalar(kind, value, path: str):
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON writers that print 256.0
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise FieldError(path, f"expected {_name(kind)}, got {_shown(value)}")


def _name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
