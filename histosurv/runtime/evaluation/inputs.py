"""The tables ``histosurv evaluate`` reads: a predictions table joined to a clinical table by case.

The predictions table is what ``histosurv predict --out`` writes, or any CSV with ``case_id`` and
``risk`` (higher = worse prognosis), one row per patient; optional columns ``S(12)``, ``S(24)``, ...
hold the predicted probability of surviving that many months, and ``risk_group`` a model's group.
The outcomes always come from the clinical table (read with the same column mapping as ``train``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...data.tables import ClinicalColumns, read_clinical
from ...errors import InputError, MissingInputError

__all__ = ["DEFAULT_TIMES", "EvaluationCohort", "Outcomes", "load_cohort", "read_outcomes", "parse_times"]

DEFAULT_TIMES = (12.0, 24.0, 36.0, 60.0)  # months, the reporting times
_SURVIVAL_COLUMN = re.compile(r"^\s*S\(\s*(\d+(?:\.\d+)?)\s*\)\s*$")


@dataclass(frozen=True)
class Outcomes:
    """Per patient: follow-up in months and whether the death was observed."""

    case_ids: np.ndarray
    time: np.ndarray
    event: np.ndarray
    source: str


@dataclass(frozen=True)
class EvaluationCohort:
    outcomes: Outcomes
    risk: np.ndarray  # (n,) higher = worse prognosis
    survival: dict[float, np.ndarray]  # t (months) -> (n,) predicted S(t), from the S(t) columns
    risk_group: pd.Series | None  # the predictions' risk_group column, as written
    predictions: str
    notes: tuple[str, ...] = ()

    @property
    def time(self) -> np.ndarray:
        return self.outcomes.time

    @property
    def event(self) -> np.ndarray:
        return self.outcomes.event


def parse_times(text: str | None) -> tuple[float, ...] | None:
    """``--times 12,24,36,60`` as sorted months (None when not given)."""
    if text is None:
        return None
    values = []
    for item in str(text).split(","):
        try:
            t = float(item)
        except ValueError:
            raise InputError(f"--times takes months separated by commas (12,24,36,60), got {item.strip()!r}") from None
        if not (np.isfinite(t) and t > 0):
            raise InputError(f"--times: each time must be a number of months > 0, got {item.strip()!r}")
        values.append(t)
    return tuple(sorted(set(values)))


def read_outcomes(path, columns: ClinicalColumns | None = None) -> Outcomes:
    """One row per case of a clinical table (its slides share the outcome, which read_clinical checks)."""
    table = read_clinical(path, require_outcome=True, require_slides=False, columns=columns)
    per_case = table.drop_duplicates("case_id")
    return Outcomes(per_case["case_id"].astype(str).to_numpy(), per_case["survival_months"].to_numpy(np.float64),
                    per_case["censorship"].to_numpy() == 0, str(path))


def load_cohort(predictions, clinical, columns: ClinicalColumns | None = None) -> EvaluationCohort:
    """The predictions table joined to the clinical table's outcomes, checked for what would make a
    figure NaN."""
    frame = _read_predictions(predictions)
    outcomes = read_outcomes(clinical, columns)
    by_case = pd.Series(np.arange(outcomes.case_ids.size), index=outcomes.case_ids)
    ids = frame["case_id"].to_numpy()
    missing = [c for c in ids if c not in by_case.index]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{predictions}: {len(missing)} case(s) have no row in the clinical table {clinical}: {shown}")
    rows = by_case.loc[ids].to_numpy()
    joined = Outcomes(ids, outcomes.time[rows], outcomes.event[rows], str(clinical))
    notes = list(_unscored_note(outcomes, ids, clinical)) + list(_disagreement_note(frame, joined, predictions))
    if not joined.event.any():
        raise InputError(
            f"{clinical}: no events: all {ids.size} evaluated patients are censored ('censorship' 1 or the event "
            "column 0 on every row), so no figure of discrimination or calibration is defined"
        )
    survival = {t: frame[c].to_numpy(np.float64) for t, c in _survival_columns(frame).items()}
    return EvaluationCohort(joined, frame["risk"].to_numpy(np.float64), survival,
                            frame["risk_group"] if "risk_group" in frame else None, str(predictions), tuple(notes))


def _read_predictions(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: predictions table not found")
    try:
        frame = pd.read_csv(path, dtype={"case_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable CSV predictions table ({e})") from e
    missing = [c for c in ("case_id", "risk") if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: the predictions table has no column {', '.join(map(repr, missing))} "
                         f"(found: {', '.join(map(str, frame.columns[:12]))})")
    if len(frame) < 2:
        raise InputError(f"{path}: {len(frame)} patient(s); evaluating predictions needs at least two")
    _check_ids(frame, path)
    _check_numbers(frame, "risk", path, "a finite number")
    for column in _survival_columns(frame).values():
        _check_numbers(frame, column, path, "a probability in [0, 1]", low=0.0, high=1.0)
    frame["risk"] = pd.to_numeric(frame["risk"])
    return frame.reset_index(drop=True)


def _check_ids(frame: pd.DataFrame, path) -> None:
    empty = frame["case_id"].isna().to_numpy()
    if empty.any():
        raise InputError(f"{path}: 'case_id' is empty on line {int(np.argmax(empty)) + 2}")
    dup = frame["case_id"].duplicated(keep=False).to_numpy()
    if dup.any():
        case = frame["case_id"].iloc[int(np.argmax(dup))]
        lines = ", ".join(str(k + 2) for k in np.flatnonzero(frame["case_id"].to_numpy() == case)[:5])
        raise InputError(f"{path}: case_id {case!r} appears more than once (lines {lines}); the predictions table "
                         "needs one row per patient (a patient's risk is the mean of its slides', as predict writes it)")


def _check_numbers(frame: pd.DataFrame, column: str, path, expected: str, low=-np.inf, high=np.inf) -> None:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if bad.any():
        k = int(np.argmax(bad))
        raw = frame[column].iloc[k]
        raise InputError(f"{path}: {column!r} must be {expected}; line {k + 2} (case {frame['case_id'].iloc[k]!r}) "
                         f"has {raw.item() if hasattr(raw, 'item') else raw!r} ({int(bad.sum())} such rows)")


def _survival_columns(frame: pd.DataFrame) -> dict[float, str]:
    """t (months) -> column name, for the columns named S(t)."""
    found = {}
    for column in frame.columns:
        m = _SURVIVAL_COLUMN.match(str(column))
        if m:
            found[float(m.group(1))] = column
    return dict(sorted(found.items()))


def _unscored_note(outcomes: Outcomes, ids: np.ndarray, clinical) -> list[str]:
    unscored = np.setdiff1d(outcomes.case_ids, ids)
    if not unscored.size:
        return []
    return [f"{unscored.size} case(s) of {clinical} have no prediction and are not evaluated "
            f"(e.g. {', '.join(map(repr, unscored[:3]))})"]


def _disagreement_note(frame: pd.DataFrame, joined: Outcomes, path) -> list[str]:
    """predict --out copies the outcomes it was given; if they differ from --clinical's, say so."""
    if not {"survival_months", "censorship"} <= set(frame.columns):
        return []
    time = pd.to_numeric(frame["survival_months"], errors="coerce").to_numpy(np.float64)
    event = pd.to_numeric(frame["censorship"], errors="coerce").to_numpy(np.float64) == 0
    differ = ~np.isclose(time, joined.time, rtol=1e-6, atol=1e-6) | (event != joined.event)
    if not differ.any():
        return []
    return [f"{path}: survival_months/censorship differ from the clinical table for {int(differ.sum())} case(s) "
            f"(e.g. {frame['case_id'].iloc[int(np.argmax(differ))]!r}); the clinical table's outcomes are used"]
