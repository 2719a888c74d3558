"""Clinical and gene-expression tables in the MCAT family's CSV conventions.

* clinical CSV: one row per slide with ``case_id``, ``slide_id``, ``survival_months`` and
  ``censorship`` (1 = censored, 0 = event), as MCAT, PORPOISE, MoME and G-HANet use them. Tables
  that name these otherwise (``submitter_id``, ``slide``, ``OS.time`` in days, ``vital_status``
  Dead/Alive, an ``event`` column where 1 = death ...) are read through a :class:`ClinicalColumns`
  mapping; :func:`read_clinical` always returns the canonical columns;
* gene table: ``case_id`` and one numeric column per gene; extra columns are ignored, the model's
  gene list (from its manifest) decides which columns are read and in what order.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError, MissingInputError

__all__ = [
    "CLINICAL_COLUMNS", "OUTCOME_COLUMNS", "TIME_UNITS", "ClinicalColumns", "Patient", "read_clinical",
    "patients_from_clinical", "GeneTable",
]

ID_COLUMNS = ("case_id", "slide_id")
OUTCOME_COLUMNS = ("survival_months", "censorship")
CLINICAL_COLUMNS = ID_COLUMNS + OUTCOME_COLUMNS

DAYS_PER_MONTH = 30.4375  # 365.25 / 12
# months per one unit of time
TIME_UNITS = {"months": 1.0, "days": 1.0 / DAYS_PER_MONTH, "weeks": 7.0 / DAYS_PER_MONTH, "years": 12.0}

# words read in an event or censorship column whatever its sense (case-insensitive)
_DEATH_WORDS = ("dead", "deceased", "died", "event", "1:deceased")
_ALIVE_WORDS = ("alive", "living", "censored", "0:living")
# flags read in the column's own sense: 1 = event for an event column, 1 = censored for a censorship column
_TRUE_WORDS = ("1", "true", "yes")
_FALSE_WORDS = ("0", "false", "no")

# the flag that sets each field, named in error messages
_FLAGS = {
    "case_id": "--case-column", "slide_id": "--slide-column", "time": "--time-column", "time_unit": "--time-unit",
    "event": "--event-column", "censorship": "--censorship-column", "event_values": "--clinical-columns",
    "censored_values": "--clinical-columns",
}


@dataclass(frozen=True)
class ClinicalColumns:
    """Which columns of a user's clinical table hold the case, slide, time and outcome.

    ``time`` is in ``time_unit`` (months, days, weeks or years; read as months with 30.4375 days
    a month). The outcome is ``event`` (1/true/yes/dead... = death observed) when given, else
    ``censorship`` (1 = censored, MCAT's convention). Either column may hold words, in any case:
    dead/deceased/event mean death observed, alive/living/censored mean censored; ``event_values``
    and ``censored_values`` add a table's own words (e.g. ``("DECEASED_DSS",)``).
    """

    case_id: str = "case_id"
    slide_id: str = "slide_id"
    time: str = "survival_months"
    time_unit: str = "months"
    event: str | None = None
    censorship: str = "censorship"
    event_values: tuple[str, ...] = ()
    censored_values: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("case_id", "slide_id", "time", "censorship") + (("event",) if self.event is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"clinical columns: {name} ({_FLAGS[name]}) must be a column name, not {value!r}")
        unit = str(self.time_unit).strip().lower()
        if unit not in TIME_UNITS and unit + "s" in TIME_UNITS:  # day -> days
            unit += "s"
        if unit not in TIME_UNITS:
            raise InputError(
                f"clinical columns: time unit {self.time_unit!r} (--time-unit) is not one of {', '.join(TIME_UNITS)}"
            )
        object.__setattr__(self, "time_unit", unit)
        if self.event is not None and self.censorship != "censorship":
            raise InputError(
                f"clinical columns: both an event column ({self.event!r}) and a censorship column "
                f"({self.censorship!r}) are given; give one (--event-column: 1 = event, --censorship-column: 1 = censored)"
            )
        words = {}
        for name in ("event_values", "censored_values"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
                raise InputError(f"clinical columns: {name} must be a list of words, not {value!r}")
            words[name] = tuple(str(v).strip().lower() for v in value)
            object.__setattr__(self, name, words[name])
        both = sorted(set(words["event_values"]) & set(words["censored_values"]))
        if both:
            raise InputError(f"clinical columns: {both[0]!r} is in both event_values and censored_values")

    # ---------------------------------------------------------------- recording

    @property
    def is_default(self) -> bool:
        return self == ClinicalColumns()

    @property
    def outcome(self) -> str:
        """The user's column that holds the outcome (event or censorship)."""
        return self.event if self.event is not None else self.censorship

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, for a run's config; :meth:`from_dict` reads them back."""
        d = dataclasses.asdict(self)
        d["event_values"], d["censored_values"] = list(self.event_values), list(self.censored_values)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "clinical columns") -> "ClinicalColumns":
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise InputError(f"{source}: expected an object of column names, got {type(d).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in fields]
        if unknown:
            raise InputError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
        values = dict(d)
        for name in ("event_values", "censored_values"):
            if name in values:
                v = values[name]
                values[name] = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, (list, tuple)) else v
        try:
            return cls(**values)
        except InputError as e:
            raise InputError(f"{source}: {str(e).removeprefix('clinical columns: ')}") from None

    def describe(self) -> str:
        """One line: how the table's columns are read ('the MCAT columns' for the default)."""
        if self.is_default:
            return "the MCAT columns (case_id, slide_id, survival_months, censorship)"
        parts = [f"case_id={self.case_id}", f"slide_id={self.slide_id}", f"time={self.time} ({self.time_unit})"]
        parts.append(f"event={self.event}" if self.event is not None else f"censorship={self.censorship}")
        if self.event_values or self.censored_values:
            parts.append(f"event words={list(self.event_values)}, censored words={list(self.censored_values)}")
        return ", ".join(parts)

    # ---------------------------------------------------------------- reading

    def sources(self) -> dict[str, str]:
        """canonical column -> the user's column."""
        return {"case_id": self.case_id, "slide_id": self.slide_id, "survival_months": self.time, "censorship": self.outcome}

    def _field_of(self, canonical: str) -> str:
        return {"survival_months": "time", "censorship": "event" if self.event is not None else "censorship"}.get(
            canonical, canonical
        )

    def flag_of(self, canonical: str) -> str:
        return _FLAGS[self._field_of(canonical)]

    def outcome_codes(self) -> tuple[dict[str, int], str]:
        """(lower-case word -> censorship 0/1, the words as a hint) for the outcome column."""
        event_sense = self.event is not None
        codes = {w: 0 for w in _DEATH_WORDS} | {w: 1 for w in _ALIVE_WORDS}
        codes |= {w: 0 if event_sense else 1 for w in _TRUE_WORDS} | {w: 1 if event_sense else 0 for w in _FALSE_WORDS}
        codes |= {w: 0 for w in self.event_values} | {w: 1 for w in self.censored_values}
        hint = "true/false, yes/no, dead/alive, deceased/living, event/censored"
        extra = [*self.event_values, *self.censored_values]
        return codes, hint + (f", {', '.join(extra)}" if extra else "")


@dataclass(frozen=True)
class Patient:
    case_id: str
    slide_ids: tuple[str, ...]
    time: float = float("nan")  # survival_months
    event: bool = False  # True = death observed (censorship == 0)


def _read_csv(path: str | os.PathLike, what: str, id_columns: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: {what} not found")
    try:
        # ids stay strings: TCGA barcodes and numeric-looking ids must not become floats
        return pd.read_csv(path, dtype={c: str for c in id_columns})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV {what} ({e})") from e


def _found(df: pd.DataFrame) -> str:
    return f"found: {', '.join(map(str, df.columns[:12]))}{', ...' if len(df.columns) > 12 else ''}"


def _require_columns(df: pd.DataFrame, columns: Sequence[str], path, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: the {what} has no column {', '.join(repr(m) for m in missing)} ({_found(df)})")


def _require_mapped(df: pd.DataFrame, canonical: Sequence[str], path, columns: ClinicalColumns) -> None:
    """Like _require_columns, naming the flag that chose each user column (or that could choose it)."""
    src = columns.sources()
    missing = [c for c in canonical if src[c] not in df.columns]
    if not missing:
        return
    mapped = [c for c in missing if src[c] != c]
    if len(missing) == 1 and mapped:
        c = missing[0]
        raise InputError(
            f"{path}: the clinical table has no column {src[c]!r} (given by {columns.flag_of(c)}; {_found(df)})"
        )
    names = ", ".join(repr(src[c]) + (f" (given by {columns.flag_of(c)})" if c in mapped else "") for c in missing)
    flags = [columns.flag_of(c) for c in missing if c not in mapped]
    if "censorship" in missing and "censorship" not in mapped:
        flags.append("--event-column")
    it = "it" if len(missing) == 1 else "them"
    hint = f"; if the table names {it} otherwise, say which column with {' / '.join(flags)}" if flags else ""
    raise InputError(f"{path}: the clinical table has no column {names} ({_found(df)}{hint})")


def read_clinical(
    path: str | os.PathLike,
    require_outcome: bool = True,
    require_slides: bool = True,
    columns: ClinicalColumns | None = ClinicalColumns(),
) -> pd.DataFrame:
    """Reads and validates a clinical CSV; ``require_outcome=False`` for prediction-only tables,
    ``require_slides=False`` for genes-only cohorts (one row per case, no slide column).

    ``columns`` says which of the table's columns hold the case, slide, time and outcome (default:
    the MCAT names). The frame returned has the canonical columns ``case_id``, ``slide_id``,
    ``survival_months`` (months, float) and ``censorship`` (1 = censored, int) first, those present,
    then every other column of the table as it is (the user's columns read into canonical ones are
    not repeated; a canonical-named column of the table is dropped when the mapping reads that
    quantity from another column). Errors name the user's columns.
    """
    columns = ClinicalColumns() if columns is None else columns
    src = columns.sources()
    df = _read_csv(path, "clinical table", (columns.case_id, columns.slide_id))
    ids = ID_COLUMNS if require_slides or src["slide_id"] in df.columns else ("case_id",)
    has_outcome = require_outcome or all(src[c] in df.columns for c in OUTCOME_COLUMNS)
    used = ids + (OUTCOME_COLUMNS if has_outcome else ())
    _require_mapped(df, used, path, columns)
    for c in ids:
        col = df[src[c]]
        if col.isna().any():
            raise InputError(f"{path}: column '{src[c]}' is empty on line {int(np.argmax(col.isna().to_numpy())) + 2}")
    key = src["slide_id"] if "slide_id" in ids else src["case_id"]
    dup = df[key][df[key].duplicated()]
    if len(dup):
        raise InputError(f"{path}: {key} {dup.iloc[0]!r} appears more than once")
    # the canonical columns first, then the rest of the table; the mapped columns win over canonical-named ones
    dropped = {src[c] for c in used} | {c for c in CLINICAL_COLUMNS if src[c] != c}
    out = pd.DataFrame({c: df[src[c]] for c in used}, index=df.index)
    out = pd.concat([out, df[[c for c in df.columns if c not in dropped]]], axis=1)
    if has_outcome:
        _check_outcomes(out, path, columns)
    return out


def _check_outcomes(df: pd.DataFrame, path, columns: ClinicalColumns = ClinicalColumns()) -> None:
    """Checks the outcome columns of a canonical frame and turns them into months (float) and 0/1 (int);
    messages name the user's columns, as given in ``columns``."""
    time_col, outcome_col = columns.time, columns.outcome
    codes, words = columns.outcome_codes()
    raw_outcome = df["censorship"]
    cens = raw_outcome.map(lambda v: _outcome_code(v, codes)).astype(float)
    raw_time = df["survival_months"]
    time = pd.to_numeric(raw_time, errors="coerce").astype(float)
    bad = ~np.isfinite(time.to_numpy()) | (time.to_numpy() < 0)
    if bad.any():
        row = int(np.argmax(bad))
        hint = ""
        if pd.isna(raw_time.iloc[row]) and cens.iloc[row] == 1:
            hint = (
                f" (the case is censored: if '{time_col}' holds only times of death, give a column that holds the "
                "follow-up time of living patients too, e.g. TCGA's OS.time, with --time-column)"
            )
        raise InputError(
            f"{path}: '{time_col}' must be a number >= 0; line {row + 2} has {_show(raw_time.iloc[row])}{hint}"
        )
    bad = cens.isna().to_numpy()
    if bad.any():
        row = int(np.argmax(bad))
        value = raw_outcome.iloc[row]
        sense = "1 (event) or 0 (censored)" if columns.event is not None else "1 (censored) or 0 (event)"
        hint = ""
        if isinstance(value, str):
            hint = (
                f" (words are read too, in any case: {words}; add a table's own in the --clinical-columns "
                "file as \"event_values\" / \"censored_values\")"
            )
        raise InputError(f"{path}: '{outcome_col}' must be {sense}; line {row + 2} has {_show(value)}{hint}")
    df["survival_months"], df["censorship"] = time * TIME_UNITS[columns.time_unit], cens.astype(int)
    per_case = df.groupby("case_id")[list(OUTCOME_COLUMNS)].nunique()
    conflicting = per_case.index[(per_case > 1).any(axis=1)]
    if len(conflicting):
        raise InputError(f"{path}: case {conflicting[0]!r} has different outcomes on different slides")


def _outcome_code(value, codes: Mapping[str, int]) -> float:
    """censorship (1.0 = censored, 0.0 = event) of one cell, NaN if it is not a known coding."""
    if isinstance(value, (bool, np.bool_)):
        return float(codes["true" if value else "false"])
    if isinstance(value, str):
        word = value.strip().lower()
        if word in codes:
            return float(codes[word])
        try:
            value = float(word)
        except ValueError:
            return float("nan")
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return float(codes["1" if value == 1 else "0"])
    return float("nan")


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
            # by position: a row with one field too many makes pandas index by the first column, labels no lines
            raise InputError(f"{path}: column 'case_id' is empty on line {int(np.argmax(df['case_id'].isna().to_numpy())) + 2}")
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
