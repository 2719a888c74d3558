"""Clinical and gene-expression tables in the MCAT family's CSV conventions.

* clinical CSV: one row per slide with ``case_id``, ``slide_id``, ``survival_months`` and
  ``censorship`` (1 = censored, 0 = event), as MCAT, PORPOISE, MoME and G-HANet use them;
* gene table: ``case_id`` and one numeric column per gene; extra columns are ignored, the model's
  gene list (from its manifest) decides which columns are read and in what order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError, MissingInputError

__all__ = ["CLINICAL_COLUMNS", "OUTCOME_COLUMNS", "Patient", "read_clinical", "patients_from_clinical", "GeneTable"]

ID_COLUMNS = ("case_id", "slide_id")
OUTCOME_COLUMNS = ("survival_months", "censorship")
CLINICAL_COLUMNS = ID_COLUMNS + OUTCOME_COLUMNS


@dataclass(frozen=True)
class Patient:
    case_id: str
    slide_ids: tuple[str, ...]
    time: float = float("nan")  # survival_months
    event: bool = False  # True = death observed (censorship == 0)


def _read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} not found")
    try:
        # ids stay strings: TCGA barcodes and numeric-looking ids must not become floats
        return pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV {what} ({e})") from e


def _require_columns(df: pd.DataFrame, columns: Sequence[str], path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: the {what} has no column {', '.join(repr(m) for m in missing)} "
            f"(found: {', '.join(map(str, df.columns[:12]))}{', ...' if len(df.columns) > 12 else ''})"
        )


def read_clinical(path: str | os.PathLike, require_outcome: bool = True, require_slides: bool = True) -> pd.DataFrame:
    """Reads and validates a clinical CSV; ``require_outcome=False`` for prediction-only tables,
    ``require_slides=False`` for genes-only cohorts (one row per case, no ``slide_id``)."""
    df = _read_csv(path, "clinical table")
    ids = ID_COLUMNS if require_slides or "slide_id" in df.columns else ("case_id",)
    _require_columns(df, (ids + OUTCOME_COLUMNS) if require_outcome else ids, path, "clinical table")
    for col in ids:
        if df[col].isna().any():
            raise InputError(f"{path}: column '{col}' is empty on line {int(df[col].isna().idxmax()) + 2}")
    key = "slide_id" if "slide_id" in ids else "case_id"
    dup = df[key][df[key].duplicated()]
    if len(dup):
        raise InputError(f"{path}: {key} {dup.iloc[0]!r} appears more than once")
    if require_outcome or all(c in df.columns for c in OUTCOME_COLUMNS):
        _check_outcomes(df, path)
    return df


def _check_outcomes(df: pd.DataFrame, path) -> None:
    months = pd.to_numeric(df["survival_months"], errors="coerce")
    bad = months.isna() | (months < 0)
    if bad.any():
        row = int(bad.idxmax())
        raise InputError(
            f"{path}: 'survival_months' must be a number >= 0; line {row + 2} has {_show(df['survival_months'][row])}"
        )
    cens = pd.to_numeric(df["censorship"], errors="coerce")
    bad = ~cens.isin([0, 1])
    if bad.any():
        row = int(bad.idxmax())
        raise InputError(
            f"{path}: 'censorship' must be 1 (censored) or 0 (event); line {row + 2} has {_show(df['censorship'][row])}"
        )
    df["survival_months"], df["censorship"] = months.astype(float), cens.astype(int)
    per_case = df.groupby("case_id")[list(OUTCOME_COLUMNS)].nunique()
    conflicting = per_case.index[(per_case > 1).any(axis=1)]
    if len(conflicting):
        raise InputError(f"{path}: case {conflicting[0]!r} has different outcomes on different slides")


def _show(value) -> str:
    """A cell as the user wrote it (2, 'abc', nan), not as numpy's repr (np.int64(2))."""
    return repr(value.item() if hasattr(value, "item") else value)


def patients_from_clinical(df: pd.DataFrame) -> list[Patient]:
    """One Patient per case_id (slides in table order); outcomes where the table has them."""
    has_outcome = all(c in df.columns for c in OUTCOME_COLUMNS)
    patients = []
    for case_id, rows in df.groupby("case_id", sort=False):
        first = rows.iloc[0]
        patients.append(
            Patient(
                case_id=str(case_id),
                slide_ids=tuple(rows["slide_id"].astype(str)) if "slide_id" in rows else (),
                time=float(first["survival_months"]) if has_outcome else float("nan"),
                event=bool(first["censorship"] == 0) if has_outcome else False,
            )
        )
    return patients


class GeneTable:
    """Gene expression per case, read by gene name in the order a model asks for."""

    def __init__(self, frame: pd.DataFrame, source: str = "<memory>"):
        self.frame, self.source = frame, source

    @classmethod
    def read(cls, path: str | os.PathLike) -> "GeneTable":
        df = _read_csv(path, "gene table")
        _require_columns(df, ["case_id"], path, "gene table")
        if df["case_id"].isna().any():
            raise InputError(f"{path}: column 'case_id' is empty on line {int(df['case_id'].isna().idxmax()) + 2}")
        dup = df["case_id"][df["case_id"].duplicated()]
        if len(dup):
            raise InputError(f"{path}: case_id {dup.iloc[0]!r} has more than one row in the gene table")
        return cls(df.set_index("case_id"), str(path))

    def numeric_genes(self) -> list[str]:
        """Columns usable as genes (numeric), in table order."""
        return [str(c) for c in self.frame.columns if pd.api.types.is_numeric_dtype(self.frame[c])]

    def vectors(self, case_ids: Sequence[str], genes: Sequence[str]) -> np.ndarray:
        """(len(case_ids), len(genes)) float32, columns in ``genes`` order."""
        missing = [g for g in genes if g not in self.frame.columns]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise InputError(
                f"{self.source}: {len(missing)} of the model's {len(genes)} genes are missing from the gene table: {shown}"
            )
        absent = [c for c in case_ids if c not in self.frame.index]
        if absent:
            raise MissingInputError(f"{self.source}: no gene row for case {', '.join(map(repr, absent[:5]))}")
        block = self.frame.loc[list(case_ids), list(genes)]
        values = block.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            n_bad_genes = int(bad.any(axis=0).sum())
            raise InputError(
                f"{self.source}: case {case_ids[r]!r} has no numeric value for gene {genes[c]!r} "
                f"({int(bad.sum())} missing or non-numeric values over {n_bad_genes} genes)"
            )
        return values.astype(np.float32)
