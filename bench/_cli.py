"""The benchmark scripts' command lines: argument types, and the arguments as ``--json`` records them.

No torch here, nor in any module a script imports at its top: the parent processes must not load
it (measurements run in fresh child processes, whose peak RSS starts from their parent's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["int_list", "positive_int_list", "choice_list", "pair_list", "args_json"]


def int_list(text: str) -> list[int]:
    """argparse type: integers separated by commas (``--sizes 1024,4096``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def positive_int_list(text: str) -> list[int]:
    """argparse type: like :func:`int_list`, for counts, where 0 or nothing would make an empty run."""
    try:
        values = int_list(text)
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def choice_list(known, what: str):
    """argparse type: a comma-separated subset of ``known``, which ``choices=`` cannot express."""

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return names

    return parse


def pair_list(what: str, example: str):
    """argparse type: comma-separated ``AxB`` pairs of positive integers (head layouts, cuCIM's
    workers x batch); ``what`` and ``example`` word the error."""

    def parse(text: str) -> list[tuple[int, int]]:
        try:
            pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
        except ValueError:
            pairs = [()]
        if any(len(pair) != 2 or min(pair) < 1 for pair in pairs):
            raise argparse.ArgumentTypeError(f"expected {what} pairs such as {example}, got {text!r}")
        return pairs  # type: ignore[return-value]

    return parse


def args_json(args: argparse.Namespace, internal: tuple[str, ...] = ()) -> dict:
    """The parsed arguments as ``--json`` records them: paths as strings, and without the ``internal``
    (hidden) flags that only the scripts' own child processes pass."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in internal}
