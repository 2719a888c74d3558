"""The list of slides a batch run scores: a CSV with ``path``, ``slide_id`` and ``case_id``.

Relative paths are taken from the manifest's folder, so an archive and its manifest can move together.
The manifest's digest (of its rows, not its bytes, so re-saving it with other line endings changes
nothing) is part of a run's identity: a run resumed with another manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ...errors import InputError

__all__ = ["SlideRow", "read_manifest", "manifest_digest"]

COLUMNS = ("path", "slide_id", "case_id")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # slide ids name files in the run folder


@dataclass(frozen=True)
class SlideRow:
    slide_id: str
    case_id: str
    path: str  # absolute

    def to_dict(self) -> dict:
        return {"slide_id": self.slide_id, "case_id": self.case_id, "path": self.path}


def read_manifest(path: str | os.PathLike) -> list[SlideRow]:
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{path}: slide manifest not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV slide manifest ({e})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: the slide manifest needs columns {', '.join(COLUMNS)}; missing {', '.join(missing)} "
            f"(found: {', '.join(map(str, df.columns)) or 'none'})"
        )
    if df.empty:
        raise InputError(f"{path}: the slide manifest lists no slides")
    rows = []
    for i, r in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        values = {c: str(getattr(r, c)).strip() for c in COLUMNS}
        for c in COLUMNS:
            if not values[c]:
                raise InputError(f"{path}: line {i}: '{c}' is empty")
        if not _SAFE_ID.match(values["slide_id"]):
            raise InputError(
                f"{path}: line {i}: slide_id {values['slide_id']!r} may hold only letters, digits, '.', '_' and '-' "
                "(it names the slide's result files)"
            )
        slide = Path(values["path"])
        if not slide.is_absolute():
            slide = path.parent / slide
        rows.append(SlideRow(values["slide_id"], values["case_id"], str(slide.resolve())))
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        if row.slide_id in seen:
            raise InputError(f"{path}: slide_id {row.slide_id!r} is on lines {seen[row.slide_id]} and {i}")
        seen[row.slide_id] = i
    return rows


def manifest_digest(rows: list[SlideRow]) -> str:
    text = json.dumps([r.to_dict() for r in rows], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
