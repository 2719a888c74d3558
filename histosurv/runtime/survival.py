"""S(t) and risk groups outside the graph: for a patient with several slides, and to check a graph's.

The graph returns ``survival`` and ``risk_group`` for one slide. A patient's risk is the mean of its
slides' risks (AMMASurv, section II.E); its curve follows the same rule per head: a Cox curve from the
patient's risk (S = exp(-H0 exp(risk)), as for a slide), a discrete-time curve as the mean of the
slides' curves (their risks are already means of survival probabilities). The group comes from the
patient's risk and the stored cut-offs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .manifest import SurvivalHead

__all__ = ["cox_survival", "discrete_bin_index", "patient_survival", "risk_group", "group_label", "survival_columns"]

_MAX_LOG_HAZARD = 80.0  # exp(80) is finite in FP32; beyond it S is 0 at every time where H0 > 0


def cox_survival(head: SurvivalHead, risk: float) -> np.ndarray:
    h0 = np.asarray(head.baseline_hazard, np.float64)
    return np.exp(-h0 * np.exp(min(float(risk), _MAX_LOG_HAZARD))).astype(np.float32)


def discrete_bin_index(head: SurvivalHead) -> np.ndarray:
    """For each reported time, how many bins have ended by then (0: S = 1). S through bin k is P(T >= the
    bin's upper edge), so between edges the curve is the last completed bin's (a step, stated)."""
    upper = np.asarray(head.time_bins, np.float64)[1:]
    return np.searchsorted(upper, np.asarray(head.times, np.float64), side="right").astype(np.int64)


def risk_group(head: SurvivalHead, risk: float) -> int:
    """0 for the lowest-risk group; a risk equal to a cut-off belongs to the lower group."""
    return int(np.sum(np.float32(risk) > np.asarray(head.cutoffs, np.float32)))


def group_label(head: SurvivalHead, group: int) -> str:
    return head.groups[group] if head.groups and 0 <= group < len(head.groups) else str(group)


def patient_survival(head: SurvivalHead, risk: float, slide_curves: Sequence[np.ndarray]) -> np.ndarray:
    if head.kind == "cox":
        return cox_survival(head, risk)
    return np.mean(np.stack([np.asarray(c, np.float32) for c in slide_curves]), axis=0)


def survival_columns(head: SurvivalHead) -> list[str]:
    """Table columns of S(t), as `histosurv evaluate` reads them."""
    return [f"S({t:g})" for t in head.times or ()]
