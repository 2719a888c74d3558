"""Command-line options generated from config dataclasses, so defaults and help live in one place.

A field's help is the comment written beside it in the dataclass (``lr: float = 2e-4  # Adam step``),
or, for names every model shares, :data:`COMMON_HELP`; its default is shown as a user would type it
(``256,256``, not ``(256, 256)``); fields with a fixed set of values get ``choices``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing

__all__ = ["add_dataclass_options", "dataclass_values", "add_union_options", "given_values", "field_docs", "shown"]

# Fields of several model configs, described once.
COMMON_HELP = {
    "survival_head": "cox (one log-hazard) or discrete (hazard logits over time bins, NLL loss)",
    "n_bins": "time bins of a discrete head (quantiles of the training event times)",
    "dropout": "dropout probability in training",
    "heads": "attention heads",
    "feature_dim": "width of the patch features",
    "n_genes": "number of genes",
    "dim": "token width",
    "depth": "transformer layers",
}
_FIELD = re.compile(r"^\s{4}(\w+)\s*:[^#]*#\s*(.+?)\s*$")


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field: the comment on its line in ``cls``'s source}."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {m.group(1): m.group(2) for m in map(_FIELD.match, lines) if m and m.group(1) in names}


def shown(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(shown, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_dataclass_options(
    parser: argparse.ArgumentParser, cls, exclude=(), title: str | None = None, choices: dict | None = None
) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = docs.get(f.name) or COMMON_HELP.get(f.name, f.name.replace("_", " "))
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            allowed = (choices or {}).get(f.name)
            group.add_argument(flag, dest=f.name, type=_parser_for(kind), default=default,
                               metavar=None if allowed else f.name.upper(), choices=allowed,
                               help=f"{doc} (default: {shown(default)})")


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


def add_union_options(
    parser: argparse.ArgumentParser, classes: dict[str, type], exclude=(), title: str = "", choices: dict | None = None
) -> None:
    """One flag per field of any of ``classes`` ({owner name: dataclass}); a flag not given keeps the
    owner's default (it is absent from the namespace), so each class's defaults stay its own."""
    group = parser.add_argument_group(title)
    owners: dict[str, list[str]] = {}
    kinds, docs = {}, {}
    for owner, cls in classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in exclude:
                default = "required" if f.default is dataclasses.MISSING else shown(f.default)
                owners.setdefault(f.name, []).append(f"{owner} {default}")
                kinds[f.name] = hints[f.name]
                docs.setdefault(f.name, field_docs(cls).get(f.name))
    for name in sorted(owners):
        flag, kind = "--" + name.replace("_", "-"), kinds[name]
        doc = docs[name] or COMMON_HELP.get(name, name.replace("_", " "))
        used_by = f"{doc}. Defaults: {'; '.join(owners[name])}"
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=used_by)
        else:
            allowed = (choices or {}).get(name)
            group.add_argument(flag, dest=name, type=_parser_for(kind), default=argparse.SUPPRESS,
                               metavar=None if allowed else name.upper(), choices=allowed, help=used_by)


def given_values(args: argparse.Namespace, cls, all_names, exclude=(), owner: str | None = None) -> dict:
    """The fields of ``cls`` given on the command line; a given flag ``cls`` does not have is an error."""
    mine = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    foreign = sorted(n for n in all_names if n not in mine and hasattr(args, n))
    if foreign:
        raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in foreign)} do not apply to {owner or cls.__name__}")
    return {n: getattr(args, n) for n in mine if hasattr(args, n)}
