"""Clinical covariates (age, sex, stage, grade, ...) as a model's third input.

A model trained with covariates takes a ``clinical`` tensor of C values, one per covariate named at
training, in the order the manifest lists them:

* a numeric covariate is sent as its raw value (years, not z-scores): the graph subtracts the training
  patients' mean and divides by their standard deviation;
* a categorical covariate is sent as the index of its value in the manifest's ``categories`` list
  (``stage`` with categories ``["I", "II", "III", "IV"]``: ``"III"`` is 2.0); the graph one-hot
  encodes it;
* a missing value is NaN: numeric ones then count as the training mean, categorical ones as no
  category (every one-hot slot 0). A whole vector of NaN is "no clinical data", which every model
  trained with covariates accepts, as genes are optional for the models that allow it.

:func:`encode_table` turns a user's clinical table (strings and numbers as people write them) into
those values, refusing a category the model never saw, or a number that is not one, by case and column.
Categories are read from every patient of the training table, not only the training split, so a
value that is rare in a cohort is still a known one at inference (its weight was never trained away
from zero, which is the honest answer for it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError

__all__ = [
    "Covariate",
    "ClinicalSpec",
    "CovariateRequest",
    "fit_covariates",
    "encode_table",
    "encode_row",
    "category_label",
    "MISSING_WORDS",
]

# cells read as missing, whatever the column's type (pandas also reads an empty cell as NaN)
MISSING_WORDS = frozenset({"", "na", "n/a", "nan", "null", "none", "unknown", "not reported", "[not available]",
                           "[unknown]", "[not evaluated]", "[discrepancy]", "--"})


@dataclass(frozen=True)
class Covariate:
    name: str  # the column of the clinical table
    kind: str  # "numeric" or "categorical"
    mean: float | None = None  # numeric: training patients' mean (the graph's centring)
    scale: float | None = None  # numeric: training patients' population standard deviation (1 if constant)
    categories: tuple[str, ...] = ()  # categorical: the values seen at training; a value's index is its code

    def __post_init__(self):
        if self.kind not in ("numeric", "categorical"):
            raise ValueError(f"covariate {self.name!r}: kind must be numeric or categorical, got {self.kind!r}")
        if self.kind == "numeric" and (self.mean is None or not self.scale):
            raise ValueError(f"numeric covariate {self.name!r} needs a mean and a non-zero scale")
        if self.kind == "categorical" and not self.categories:
            raise ValueError(f"categorical covariate {self.name!r} needs at least one category")

    @property
    def width(self) -> int:
        """Columns it takes in the encoded (one-hot / standardised) vector."""
        return len(self.categories) if self.kind == "categorical" else 1


@dataclass(frozen=True)
class ClinicalSpec:
    """What a model's ``clinical`` input holds, in order; kept in the run config and the manifest."""

    covariates: tuple[Covariate, ...]

    def __post_init__(self):
        names = [c.name for c in self.covariates]
        if not names:
            raise ValueError("a clinical spec needs at least one covariate")
        if len(set(names)) != len(names):
            raise ValueError(f"covariates named twice: {names}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.covariates]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.covariates)

    def describe(self) -> str:
        return ", ".join(
            f"{c.name} ({'/'.join(c.categories)})" if c.kind == "categorical" else f"{c.name} (numeric)"
            for c in self.covariates
        )


@dataclass(frozen=True)
class CovariateRequest:
    """The covariates a user names at training: ``names`` in order; those in ``categorical`` are read as
    categories even when they look numeric (grade 1-3); other columns are numeric when every present
    value parses as a number, categorical otherwise."""

    names: tuple[str, ...]
    categorical: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.names:
            raise ValueError("name at least one covariate")
        stray = [c for c in self.categorical if c not in self.names]
        if stray:
            raise InputError(f"--categorical names {', '.join(stray)}, which --covariates does not")
        if len(set(self.names)) != len(self.names):
            raise InputError(f"--covariates names a column twice: {', '.join(self.names)}")


def category_label(value) -> str | None:
    """A cell as a category name: stripped text; 2.0 and 2 and "2" are all "2"; None when missing."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    text = str(value).strip()
    return None if text.lower() in MISSING_WORDS else text


def _number(value) -> float:
    """A cell as a float: NaN when missing, ValueError when it is text that is not a number."""
    label = category_label(value)
    if label is None:
        return float("nan")
    number = float(label)  # ValueError names the text
    if not math.isfinite(number):
        raise ValueError(label)
    return number


def fit_covariates(table: pd.DataFrame, request: CovariateRequest, train_rows: Sequence[int], source: str = "clinical table") -> ClinicalSpec:
    """The :class:`ClinicalSpec` of ``request`` on ``table`` (one row per patient): numeric scalers from
    the rows ``train_rows``, categories from every row (see the module docstring)."""
    missing = [c for c in request.names if c not in table.columns]
    if missing:
        raise InputError(
            f"{source}: no column {', '.join(map(repr, missing))} for --covariates; its columns are "
            f"{', '.join(map(str, table.columns))}"
        )
    train_rows = list(train_rows)
    covariates = []
    for name in request.names:
        column = table[name]
        labels = [category_label(v) for v in column]
        numeric = name not in request.categorical and _all_numbers(labels)
        if numeric:
            values = np.array([_number(v) for v in column.iloc[train_rows]], dtype=np.float64)
            present = values[np.isfinite(values)]
            if present.size == 0:
                raise InputError(f"{source}: covariate {name!r} has no value for any training patient")
            scale = float(present.std())
            covariates.append(Covariate(name, "numeric", float(present.mean()), scale if scale > 1e-8 else 1.0))
        else:
            seen = sorted({label for label in labels if label is not None}, key=_natural)
            if not seen:
                raise InputError(f"{source}: covariate {name!r} has no value for any patient")
            if len(seen) > 50:
                raise InputError(
                    f"{source}: covariate {name!r} has {len(seen)} distinct values; a categorical covariate "
                    "with that many is more likely an identifier or a number written as text"
                )
            covariates.append(Covariate(name, "categorical", categories=tuple(seen)))
    return ClinicalSpec(tuple(covariates))


def _all_numbers(labels: Sequence[str | None]) -> bool:
    present = [label for label in labels if label is not None]
    try:
        for label in present:
            float(label)
    except ValueError:
        return False
    return bool(present)


def _natural(label: str):
    """Sort numbers numerically and text alphabetically (grades 1, 2, 10; stages I, II, III, IV)."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def encode_row(spec: ClinicalSpec, values: Mapping[str, object], case: str = "") -> np.ndarray:
    """(C,) float32 wire values for one patient's ``values`` (column -> cell); absent columns are NaN."""
    out = np.full(len(spec.covariates), np.nan, dtype=np.float32)
    where = f"case {case!r}: " if case else ""
    for j, cov in enumerate(spec.covariates):
        value = values.get(cov.name)
        if cov.kind == "numeric":
            try:
                number = _number(value)
            except ValueError:
                raise InputError(f"{where}clinical covariate {cov.name!r} must be a number, got {value!r}") from None
            if abs(number) > _FLOAT32_MAX:  # would be sent as an infinity
                raise InputError(f"{where}clinical covariate {cov.name!r} is {number:g}, beyond any measurement (check the units)")
            out[j] = number
            continue
        label = category_label(value)
        if label is None:
            continue
        if label not in cov.categories:
            raise InputError(
                f"{where}clinical covariate {cov.name!r} is {label!r}, a value the model never saw at training "
                f"(it knows {', '.join(map(repr, cov.categories))}); leave the cell empty to score without it"
            )
        out[j] = cov.categories.index(label)
    return out


def encode_table(spec: ClinicalSpec, table: pd.DataFrame, case_ids: Sequence[str], source: str = "clinical table",
                 case_column: str = "case_id") -> np.ndarray:
    """(len(case_ids), C) float32 wire values, one row per case (a case's first row in ``table``);
    a covariate column the table lacks is refused, a missing cell is NaN."""
    missing = [c for c in spec.names if c not in table.columns]
    if missing:
        raise InputError(
            f"{source}: the model reads clinical covariates {', '.join(spec.names)}; the table has no column "
            f"{', '.join(map(repr, missing))}"
        )
    first = table.drop_duplicates(case_column)
    first = first.set_index(first[case_column].astype(str))
    rows = []
    for case in case_ids:
        if str(case) not in first.index:
            raise InputError(f"{source}: no row for case {case!r}")
        row = first.loc[str(case)]
        try:
            rows.append(encode_row(spec, {name: row[name] for name in spec.names}, str(case)))
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
    return np.stack(rows) if rows else np.zeros((0, len(spec.covariates)), np.float32)


def check_wire_values(spec: ClinicalSpec, values: np.ndarray) -> np.ndarray:
    """Checks a ``clinical`` tensor as sent to a model (codes for categories, NaN for missing) and
    returns it as (C,) float32; InputError names the covariate at fault."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if values.size != len(spec.covariates):
        raise InputError(
            f"'clinical' has {values.size} values; the model reads {len(spec.covariates)}: {', '.join(spec.names)}"
        )
    for j, cov in enumerate(spec.covariates):
        v = float(values[j])
        if math.isnan(v):
            continue
        if math.isinf(v):
            raise InputError(f"clinical covariate {cov.name!r} is infinite")
        if cov.kind == "categorical" and (not v.is_integer() or not 0 <= v < len(cov.categories)):
            raise InputError(
                f"clinical covariate {cov.name!r} must be a category index 0..{len(cov.categories) - 1} "
                f"({', '.join(f'{i}={c}' for i, c in enumerate(cov.categories))}) or NaN, got {v:g}"
            )
    return values
