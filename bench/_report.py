"""How the benchmark scripts print and save their figures: plain-text tables, number cells, ``--json``.

The tables are quoted in README.md, so every script formats through these few helpers and the
columns line up the same way everywhere. No torch here: the parents import this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["print_aligned", "print_rows", "cell", "mb", "size", "plural", "problems_line", "write_json"]


def print_aligned(header: list[str], body: list[list[str]], left: tuple[int, ...] = (0,)) -> None:
    """A plain-text table: columns ``left`` (names, notes) left-aligned, numbers right-aligned, so
    figures of different magnitudes still line up on their last digit."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *body]:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells).rstrip())


def print_rows(rows: list[dict], columns: Sequence[tuple[str, Callable[[dict], str]]], left: Sequence[str] = ()) -> None:
    """:func:`print_aligned` for rows kept as dicts: ``columns`` are (header, cell formatter), and the
    headers in ``left`` are left-aligned, so a table's layout reads as one list."""
    header = [h for h, _ in columns]
    body = [[format_cell(r) for _, format_cell in columns] for r in rows]
    print_aligned(header, body, left=tuple(i for i, h in enumerate(header) if h in left))


def cell(value, fmt: str = ".1f", suffix: str = "") -> str:
    """A table cell for a figure that may be missing (no baseline, nothing to divide): "-" then."""
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def mb(nbytes: float) -> str:
    """Bytes as whole MB (10^6 bytes), the unit of the memory columns."""
    return f"{nbytes / 1e6:.0f}"


def size(nbytes: float) -> str:
    """Bytes for a sentence: GB above 1 GB (whole ones from 10 GB), else MB; 10^9 and 10^6 bytes."""
    if nbytes >= 10e9:
        return f"{nbytes / 1e9:.0f} GB"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def plural(n: int, noun: str) -> str:
    """``n`` and ``noun``, with an s unless n is 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def problems_line(problems: dict) -> str:
    """The run's last line: "errors: 0", or each problem and its count. A script whose problems are
    not empty exits with status 1."""
    return "errors: 0" if not problems else "errors: " + ", ".join(f"{k}: {v}" for k, v in problems.items())


def write_json(path: Path, data) -> None:
    """``--json``: every figure, indented for reading and diffing; values json cannot encode (paths,
    numpy scalars) as their str."""
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")
