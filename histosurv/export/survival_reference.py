"""What a survival model's risk means in time, fitted on its training patients at export.

A Cox head predicts a log relative hazard and nothing in time: the Breslow estimator of the baseline
cumulative hazard H0(t), fitted on the training patients' risks, turns it into S(t | x) =
exp(-H0(t) exp(risk)). A discrete-time head predicts hazards per bin and needs only the bin edges. Both
report S at the version's times (12, 24, 36 and 60 months by default, those within the training
follow-up). Risk groups are cut at the median (two groups) or the tertiles (three) of the same training
risks; patients scored later are placed with these stored cut-offs, never re-cut on a new cohort.

The training patients' risks come from the run folder (``train_predictions.csv``, written by ``train``):
runs written before that file existed export without survival outputs, with a note saying so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..runtime.evaluation.metrics import kaplan_meier
from ..runtime.manifest import SurvivalHead

__all__ = [
    "DEFAULT_TIMES",
    "GROUPINGS",
    "TRAIN_PREDICTIONS",
    "breslow_cumulative_hazard",
    "reported_times",
    "risk_cutoffs",
    "fit_survival_reference",
    "reference_from_run",
]

DEFAULT_TIMES = (12.0, 24.0, 36.0, 60.0)  # months
GROUPINGS = {"median": ("low", "high"), "tertiles": ("low", "intermediate", "high")}
TRAIN_PREDICTIONS = "train_predictions.csv"
_REFERENCE_POINTS = 200  # the training Kaplan-Meier curve kept in the manifest, for reports


def breslow_cumulative_hazard(risk, time, event, at) -> np.ndarray:
    """Breslow's H0 at the times ``at``: the sum over event times t_i <= t of d_i / sum_{T_j >= t_i} exp(risk_j).

    Risks are shifted by their maximum before exp (and H0 by its exp back) so that large log-hazards
    cannot overflow; the product H0 * exp(risk) is unchanged."""
    risk, time = np.asarray(risk, np.float64), np.asarray(time, np.float64)
    event = np.asarray(event, bool)
    shift = float(risk.max())
    weight = np.exp(risk - shift)
    order = np.argsort(time, kind="stable")
    t_sorted, w_sorted = time[order], weight[order]
    at_risk_weight = np.cumsum(w_sorted[::-1])[::-1]  # sum over T_j >= t_sorted[k] (ties: first of the run)
    uniq = np.unique(time[event])
    first = np.searchsorted(t_sorted, uniq, side="left")
    deaths = np.array([np.sum(event & (time == u)) for u in uniq], dtype=np.float64)
    increments = deaths / at_risk_weight[first] * np.exp(-shift)
    cumulative = np.cumsum(increments)
    idx = np.searchsorted(uniq, np.asarray(at, np.float64), side="right")
    return np.r_[0.0, cumulative][idx]


def reported_times(time, event, requested=DEFAULT_TIMES) -> tuple[tuple[float, ...], str]:
    """The requested times within the training follow-up (before its last observed time), and a note on
    what was dropped; with none left, the quartiles of the training event times, said so."""
    time, event = np.asarray(time, np.float64), np.asarray(event, bool)
    last = float(time.max())
    kept = tuple(float(t) for t in sorted(set(requested)) if 0 < t < last)
    dropped = [t for t in sorted(set(requested)) if t not in kept]
    note = f"{', '.join(f'{t:g}' for t in dropped)} months dropped: beyond the training follow-up ({last:g} months)" if dropped else ""
    if not kept:
        kept = tuple(sorted({round(float(q), 1) for q in np.quantile(time[event], (0.25, 0.5, 0.75))}))
        note = (f"none of {', '.join(f'{t:g}' for t in requested)} months lies within the training follow-up "
                f"({last:g} months): reporting the quartiles of the training event times instead")
    return kept, note


def risk_cutoffs(risk, grouping: str = "median") -> tuple[float, ...]:
    if grouping not in GROUPINGS:
        raise InputError(f"risk groups {grouping!r}: choose one of {', '.join(GROUPINGS)}")
    quantiles = np.linspace(0, 1, len(GROUPINGS[grouping]) + 1)[1:-1]
    return tuple(float(q) for q in np.quantile(np.asarray(risk, np.float64), quantiles))


def fit_survival_reference(head: SurvivalHead, risk, time, event, times=None, grouping: str = "median",
                           source: str = "the training patients") -> tuple[SurvivalHead, list[str]]:
    """``head`` completed with the reported times, the Breslow baseline (Cox heads), the risk-group
    cut-offs and the training Kaplan-Meier curve; and notes for the user."""
    risk, time = np.asarray(risk, np.float64), np.asarray(time, np.float64)
    event = np.asarray(event, bool)
    if risk.size < 2 or not np.isfinite(risk).all() or not np.isfinite(time).all():
        raise InputError(f"{source}: {risk.size} training risks, some not finite: no survival reference can be fitted")
    if not event.any():
        raise InputError(f"{source}: no events among the {risk.size} training patients: no baseline hazard can be fitted")
    notes = []
    chosen, note = reported_times(time, event, DEFAULT_TIMES if times is None else times)
    if note:
        notes.append(note)
    if head.kind == "discrete" and not head.time_bins:
        raise InputError("a discrete-time head without recorded bin edges: its S(t) cannot be placed in time")
    km = kaplan_meier(time, event)
    keep = np.unique(np.linspace(0, km.time.size - 1, min(km.time.size, _REFERENCE_POINTS)).round().astype(int))
    baseline = None
    if head.kind == "cox":
        baseline = tuple(float(h) for h in breslow_cumulative_hazard(risk, time, event, chosen))
    fitted = SurvivalHead(
        kind=head.kind, n_bins=head.n_bins, time_bins=head.time_bins, risk=head.risk,
        times=chosen,
        baseline_hazard=baseline,
        grouping=grouping,
        groups=GROUPINGS[grouping],
        cutoffs=risk_cutoffs(risk, grouping),
        reference_curve={"time": [float(t) for t in km.time[keep]], "survival": [float(s) for s in km.survival[keep]]},
        fitted_on=f"{source}: {risk.size} patients, {int(event.sum())} events, follow-up to {float(time.max()):g} months",
    )
    return fitted, notes


def reference_from_run(run_dir, head: SurvivalHead, times=None, grouping: str = "median"):
    """(the fitted head, notes) from the run's training predictions; (head, [why not]) for older runs."""
    path = Path(run_dir) / TRAIN_PREDICTIONS if run_dir else None
    if path is None or not path.is_file():
        return head, [f"no {TRAIN_PREDICTIONS} in the run (trained by an older histosurv, or imported): the version "
                      "returns risk only, without survival curves or risk groups; retrain to have them"]
    frame = pd.read_csv(path)
    missing = {"risk", "survival_months", "censorship"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: columns {sorted(missing)} are missing")
    return fit_survival_reference(head, frame["risk"], frame["survival_months"], frame["censorship"] == 0,
                                  times, grouping, source=f"the training patients of {Path(run_dir).name}")
