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
