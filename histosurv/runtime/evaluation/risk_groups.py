"""Risk groups for the Kaplan-Meier curves and the log-rank test.

A model's stored cut-offs (a ``risk_group`` column in the predictions) are the right ones: they were
fitted on the training risks. Cutting at the evaluated cohort's own quantiles instead fits the groups
on the patients being evaluated, which flatters the separation; it is the fallback, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ...errors import InputError

__all__ = ["GROUPINGS", "RiskGroups", "groups_from_column", "groups_from_quantiles"]

# --groups: quantiles cut at, and the groups' names from lowest to highest risk
GROUPINGS = {
    "median": ((0.5,), ("low", "high")),
    "tertiles": ((1 / 3, 2 / 3), ("low", "intermediate", "high")),
    "quartiles": ((0.25, 0.5, 0.75), ("Q1", "Q2", "Q3", "Q4")),
}


@dataclass(frozen=True)
class RiskGroups:
    code: np.ndarray  # (n,) 0..k-1, lowest risk first
    names: tuple[str, ...]
    source: str  # how the groups were made, for the output
    fitted_on: str  # which patients set the cut-offs
    cutoffs: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()


def groups_from_column(values: pd.Series, risk: np.ndarray, path: str) -> RiskGroups:
    """The predictions' ``risk_group`` column: numbers in their order, words by their median risk."""
    if values.isna().any():
        raise InputError(f"{path}: 'risk_group' is empty on line {int(np.argmax(values.isna().to_numpy())) + 2}")
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        labels = numeric.to_numpy(dtype=np.float64)
        names = [f"{v:g}" for v in np.unique(labels)]
        code = np.searchsorted(np.unique(labels), labels)
    else:
        labels = values.astype(str).to_numpy()
        by_risk = pd.Series(risk).groupby(labels).median().sort_values(kind="stable")
        names = [str(v) for v in by_risk.index]
        code = np.array([names.index(v) for v in labels])
    _need_two(names, path, f"'risk_group' holds one group only ({names[0]!r})")
    return RiskGroups(code, tuple(names), "the predictions' risk_group column (a model's stored cut-offs)",
                      "the model's training patients (stored cut-offs)")


def groups_from_quantiles(risk: np.ndarray, grouping: str, path: str) -> RiskGroups:
    """Groups cut at this cohort's risk quantiles; groups left empty by tied risks are dropped."""
    quantiles, names = GROUPINGS[grouping]
    cutoffs = np.quantile(risk, quantiles)
    code = np.searchsorted(cutoffs, risk, side="left")  # a risk on a cut-off goes to the lower group
    present = np.unique(code)
    notes = ()
    if present.size < len(names):
        empty = [names[j] for j in range(len(names)) if j not in present]
        notes = (f"risk groups {', '.join(empty)} are empty (tied risks at the {grouping} cut-offs) and left out",)
    kept = tuple(names[j] for j in present)
    _need_two(kept, path, f"'risk' cannot be cut at its {grouping}: every patient falls into one group (risks "
                          f"{float(risk.min()):g} to {float(risk.max()):g}); give a risk_group column or other --groups")
    return RiskGroups(np.searchsorted(present, code), kept, f"cut at the evaluated cohort's risk {grouping}",
                      "the evaluated cohort itself (no risk_group column: cut-offs fitted on these patients)",
                      tuple(float(c) for c in cutoffs), notes)


def _need_two(names, path: str, detail: str) -> None:
    if len(names) < 2:
        raise InputError(f"{path}: fewer than 2 risk groups for the Kaplan-Meier curves and the log-rank test: {detail}")
