"""Command-line options generated from config dataclasses, so defaults live in one place."""

from __future__ import annotations

import argparse
import dataclasses
import typing

__all__ = ["add_dataclass_options", "dataclass_values"]


def add_dataclass_options(parser: argparse.ArgumentParser, cls, exclude=(), title: str | None = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=default, metavar=f.name.upper(),
                               help=f"default: {default}")


def dataclass_values(args: argparse.Namespace, cls, exclude=()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in exclude}


def _parser_for(kind):
    """argparse ``type`` for a dataclass field: tuples of ints are written as comma lists (1,2,3)."""
    if typing.get_origin(kind) is tuple:
        inner = typing.get_args(kind)[0]

        def parse(text: str):
            try:
                return tuple(inner(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a comma-separated list of {inner.__name__}, got {text!r}")

        return parse
    return kind


def add_union_options(parser: argparse.ArgumentParser, classes: dict[str, type], exclude=(), title: str = "") -> None:
    """One flag per field of any of ``classes`` ({owner name: dataclass}); a flag not given keeps the
    owner's default (it is absent from the namespace), so each class's defaults stay its own."""
    group = parser.add_argument_group(title)
    owners: dict[str, list[str]] = {}
    kinds = {}
    for owner, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in exclude:
                default = "required" if f.default is dataclasses.MISSING else f.default
                owners.setdefault(f.name, []).append(f"{owner} ({default})")
                kinds[f.name] = hints[f.name]
    for name in sorted(owners):
        flag, kind = "--" + name.replace("_", "-"), kinds[name]
        used_by = "defaults: " + ", ".join(owners[name])
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=used_by)
        else:
            group.add_argument(flag, dest=name, type=_parser_for(kind), default=argparse.SUPPRESS, metavar=name.upper(), help=used_by)


def given_values(args: argparse.Namespace, cls, all_names, exclude=()) -> dict:
    """The fields of ``cls`` given on the command line; a given flag ``cls`` does not have is an error."""
    mine = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    foreign = sorted(n for n in all_names if n not in mine and hasattr(args, n))
    if foreign:
        raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in foreign)} do not apply to {cls.__name__}")
    return {n: getattr(args, n) for n in mine if hasattr(args, n)}
