"""Every figure of ``histosurv evaluate`` for one cohort, as a strict-JSON-ready dict.

A figure the data cannot define is ``{"value": null, "reason": ...}``, never NaN. The scalar figures
(c-indices, AUC(t), mean AUC, Brier(t), integrated Brier) get bootstrap intervals; calibration gives the
Kaplan-Meier standard error of each bin instead, and the log-rank test its p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...data.concordance import concordance_index
from ...errors import InputError
from . import metrics as M
from .bootstrap import bootstrap_intervals
from .inputs import DEFAULT_TIMES, EvaluationCohort, Outcomes
from .risk_groups import GROUPINGS, RiskGroups, groups_from_column, groups_from_quantiles

__all__ = ["SCHEMA", "EvaluationSettings", "evaluate"]

SCHEMA = "histosurv.evaluation/1"
SIGN = "higher risk = worse prognosis (earlier death); c-index and AUC 0.5 = chance, 1 = perfect"


@dataclass(frozen=True)
class EvaluationSettings:
    """Args:
        times: months to report at (None: the predictions' S(t) columns, else 12, 24, 36, 60).
        groups: median, tertiles or quartiles, when the predictions have no risk_group column
            (None: median).
        bootstrap: replicates for the 95% intervals (0: none).
        seed: of the bootstrap's resampling.
    """

    times: tuple[float, ...] | None = None
    groups: str | None = None
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        if self.groups is not None and self.groups not in GROUPINGS:
            raise InputError(f"--groups must be one of {', '.join(GROUPINGS)}, not {self.groups!r}")
        if self.bootstrap < 0:
            raise InputError(f"--bootstrap must be 0 (no intervals) or more replicates, not {self.bootstrap}")
        if self.seed < 0:
            raise InputError(f"--seed must be a whole number >= 0, not {self.seed}")


@dataclass(frozen=True)
class _Sample:
    """The arrays every scalar figure reads, for the cohort or one bootstrap replicate."""

    time: np.ndarray
    event: np.ndarray
    risk: np.ndarray
    survival: np.ndarray  # (n, S) at the reported times that have an S(t) column

    def take(self, idx: np.ndarray) -> "_Sample":
        return _Sample(self.time[idx], self.event[idx], self.risk[idx], self.survival[idx])


def evaluate(cohort: EvaluationCohort, settings: EvaluationSettings = EvaluationSettings(),
             training: Outcomes | None = None) -> dict:
    """Every figure of ``cohort``; ``training`` gives the censoring distribution of the IPCW figures
    (default: the evaluated cohort itself)."""
    notes = list(cohort.notes)
    times = _reported_times(cohort, settings.times, training, notes)
    s_times = np.array([t for t in times if t in cohort.survival])
    if cohort.survival and s_times.size < times.size:
        notes.append(f"no S(t) column for {_months(t for t in times if t not in cohort.survival)}: no Brier score "
                     "or calibration there")
    predicted = [cohort.survival[t] for t in s_times]
    sample = _Sample(cohort.time, cohort.event, cohort.risk,
                     np.stack(predicted, axis=1) if predicted else np.empty((cohort.time.size, 0)))
    fixed = M.censoring_survival(training.time, training.event) if training is not None else None
    tau = float(times.max())
    auc = M.cumulative_dynamic_auc(sample.time, sample.event, sample.risk, times,
                                   fixed if fixed is not None else M.censoring_survival(sample.time, sample.event))
    mean_times = times[np.isfinite(auc)]
    if 0 < mean_times.size < times.size:
        notes.append(f"mean AUC over {_months(mean_times)} only: the AUC is undefined at the others")

    def figures(s: _Sample) -> dict[str, float | str]:
        return _scalar_figures(s, times, s_times, mean_times, tau, fixed)

    groups = _risk_groups(cohort, settings.groups, notes)  # refused before the bootstrap's time is spent
    point = figures(sample)
    intervals = {}
    if settings.bootstrap:
        intervals = bootstrap_intervals(
            lambda idx: {k: v if isinstance(v, float) else None for k, v in figures(sample.take(idx)).items()},
            sample.time.size, settings.bootstrap, settings.seed)
        if settings.bootstrap < 200:
            notes.append(f"{settings.bootstrap} bootstrap replicates: the 95% intervals are rough (1000 is usual)")
    return {
        "schema": SCHEMA,
        "sign": SIGN,
        "inputs": {"predictions": cohort.predictions, "clinical": cohort.outcomes.source,
                   "train_clinical": training.source if training is not None else None},
        "cohort": _cohort_facts(cohort),
        "censoring_distribution": (f"the training cohort ({training.source}, {training.time.size} patients)"
                                   if training is not None else
                                   "the evaluated cohort itself (no --train-clinical given)"),
        "times_months": [float(t) for t in times],
        "bootstrap": {"replicates": settings.bootstrap, "seed": settings.seed,
                      "method": "95% percentile interval; patients resampled with replacement; a replicate where a "
                                "figure is undefined is skipped for that figure"},
        "figures": _figures_json(point, intervals, times, s_times, mean_times, tau, cohort, sample),
        "risk_groups": _groups_json(cohort, groups),
        "notes": notes,
    }


def _reported_times(cohort: EvaluationCohort, requested, training: Outcomes | None, notes: list[str]) -> np.ndarray:
    """The reported times within follow-up: at or after the first observed time and before the last (and
    before the training cohort's last, where the censoring distribution ends); the others are dropped."""
    if requested is None:
        requested = tuple(cohort.survival) or DEFAULT_TIMES
    first, last = float(cohort.time.min()), float(cohort.time.max())
    kept = []
    for t in sorted(set(requested)):
        if t >= last:
            notes.append(f"dropped {t:g} months: at or beyond the last follow-up ({last:g} months) of "
                         f"{cohort.outcomes.source}")
        elif t < first:
            notes.append(f"dropped {t:g} months: before the first follow-up time ({first:g} months)")
        elif training is not None and t >= training.time.max():
            notes.append(f"dropped {t:g} months: at or beyond the last follow-up of the training cohort "
                         f"({float(training.time.max()):g} months), where the censoring distribution ends")
        else:
            kept.append(t)
    if not kept:
        raise InputError(
            f"{cohort.outcomes.source}: none of the reported times ({_months(requested)}) lies within the follow-up "
            f"({first:g} to {last:g} months); give --times at or after the first and before the last follow-up time"
        )
    return np.array(kept, dtype=np.float64)


def _scalar_figures(s: _Sample, times, s_times, mean_times, tau: float, fixed) -> dict[str, float | str]:
    """name -> value, or the reason it is undefined for this sample."""
    censoring = fixed if fixed is not None else M.censoring_survival(s.time, s.event)
    out = {"harrell_c_index": _try(lambda: concordance_index(s.time, s.event, s.risk).c_index),
           "uno_c_index": _try(lambda: M.uno_c_index(s.time, s.event, s.risk, censoring, tau))}
    # a replicate may end its follow-up before a reported time: its figures there are undefined
    first, last = s.time.min(), s.time.max()
    outside = {t: f"no patient followed beyond {t:g} months" if t >= last else f"no follow-up before {t:g} months"
               for t in times if not first <= t < last}
    # only inside: a death at a replicate's last time can have G = 0 there, which a later time would weigh
    inside = np.array([t for t in times if t not in outside])
    try:
        auc = dict(zip(inside, M.cumulative_dynamic_auc(s.time, s.event, s.risk, inside, censoring) if inside.size
                       else ()))
    except M.Undefined as e:
        auc = dict.fromkeys(inside, str(e))
    for t in times:
        a = outside.get(t) or auc[t]
        out[f"auc@{t:g}"] = a if isinstance(a, str) else (float(a) if np.isfinite(a) else
                                                          M.auc_undefined_reason(s.time, s.event, t))
    picked = [out[f"auc@{t:g}"] for t in mean_times]
    out["mean_auc"] = (_try(lambda: M.mean_auc(s.time, s.event, mean_times, picked)) if mean_times.size and
                       all(isinstance(a, float) for a in picked) else "the AUC is undefined at a reported time")
    if s_times.size:
        brier = M.brier_scores(s.time, s.event, s.survival, s_times, censoring)
        for t, b in zip(s_times, brier):
            out[f"brier@{t:g}"] = outside.get(t) or float(b)
        undefined = [t for t in s_times if t in outside]
        out["integrated_brier_score"] = (f"the Brier score is undefined at {_months(undefined)}" if undefined
                                         else _try(lambda: M.integrated_brier_score(s_times, brier)))
    return out


def _try(compute) -> float | str:
    try:
        value = float(compute())
    except ValueError as e:  # Undefined, and concordance_index's own refusals
        return str(e)
    return value if np.isfinite(value) else "not a finite number"


def _figure(point: dict, intervals: dict, name: str, **extra) -> dict:
    value = point[name]
    out = {"value": value} if isinstance(value, float) else {"value": None, "reason": value}
    out.update(extra)
    if isinstance(value, float) and name in intervals:
        out.update(intervals[name].to_json())
    elif isinstance(value, float):
        out.update({"ci95": None, "ci95_reason": "no bootstrap (--bootstrap 0)"})
    return out


def _figures_json(point, intervals, times, s_times, mean_times, tau, cohort, sample) -> dict:
    figures = {
        "harrell_c_index": _figure(point, intervals, "harrell_c_index"),
        "uno_c_index": _figure(point, intervals, "uno_c_index", tau_months=tau),
        "time_dependent_auc": {
            "per_time": [_figure(point, intervals, f"auc@{t:g}", time_months=float(t)) for t in times],
            "mean": _figure(point, intervals, "mean_auc", over_months=[float(t) for t in mean_times]),
        },
    }
    if not s_times.size:
        why = ("the predictions have no S(t) columns (S(12), S(24), ...)" if not cohort.survival
               else "no S(t) column at a reported time")
        figures["brier_score"] = {"value": None, "reason": why}
        figures["calibration"] = {"value": None, "reason": why}
        return figures
    figures["brier_score"] = {
        "per_time": [_figure(point, intervals, f"brier@{t:g}", time_months=float(t)) for t in s_times],
        "integrated": _figure(point, intervals, "integrated_brier_score",
                              over_months=[float(s_times[0]), float(s_times[-1])]),
    }
    n_bins = min(10, max(2, sample.time.size // 10))
    figures["calibration"] = {
        "bins": "risk deciles" if n_bins == 10 else f"{n_bins} equal-count risk bins (fewer than 100 patients)",
        "observed": "Kaplan-Meier S(t) of the bin's patients, with Greenwood's standard error",
        "per_time": [{"time_months": float(t),
                      "bins": M.calibration_bins(sample.time, sample.event, sample.risk, sample.survival[:, k], t, n_bins)}
                     for k, t in enumerate(s_times)],
    }
    return figures


def _risk_groups(cohort: EvaluationCohort, grouping: str | None, notes: list[str]) -> RiskGroups:
    if cohort.risk_group is not None:
        if grouping is not None:
            notes.append(f"--groups {grouping} not used: the predictions' risk_group column holds the model's "
                         "stored cut-offs")
        return groups_from_column(cohort.risk_group, cohort.risk, cohort.predictions)
    groups = groups_from_quantiles(cohort.risk, grouping or "median", cohort.predictions)
    notes.append(f"risk groups {groups.source}: fitted on the evaluated patients; a model's stored cut-offs "
                 "(a risk_group column) are the right ones")
    notes.extend(groups.notes)
    return groups


def _groups_json(cohort: EvaluationCohort, groups: RiskGroups) -> dict:
    out = {"source": groups.source, "fitted_on": groups.fitted_on,
           "cutoffs": list(groups.cutoffs) if groups.cutoffs is not None else None, "groups": []}
    for j, name in enumerate(groups.names):
        m = groups.code == j
        km = M.kaplan_meier(cohort.time[m], cohort.event[m])
        out["groups"].append({
            "name": name, "n": int(m.sum()), "deaths": int(cohort.event[m].sum()),
            "risk_range": [float(cohort.risk[m].min()), float(cohort.risk[m].max())],
            "median_survival_months": km.median(),
            "kaplan_meier": {"time": km.time.tolist(), "survival": km.survival.tolist(), "se": km.se.tolist(),
                             "at_risk": km.at_risk.astype(int).tolist(), "deaths": km.deaths.astype(int).tolist(),
                             "censored": km.censored.astype(int).tolist()},
        })
    try:
        lr = M.logrank(cohort.time, cohort.event, groups.code)
        out["logrank"] = {"chi2": lr.chi2, "dof": lr.dof, "p_value": lr.p_value,
                          "observed": lr.observed.tolist(), "expected": lr.expected.tolist()}
    except M.Undefined as e:
        out["logrank"] = {"value": None, "reason": str(e)}
    return out


def _cohort_facts(cohort: EvaluationCohort) -> dict:
    t = cohort.time
    g = M.censoring_survival(t, cohort.event)
    reached = np.flatnonzero(g.y <= 0.5)
    return {"n_patients": int(t.size), "n_events": int(cohort.event.sum()), "n_censored": int((~cohort.event).sum()),
            "follow_up_months": {"min": float(t.min()), "max": float(t.max()), "median_observed": float(np.median(t)),
                                 # the reverse Kaplan-Meier median: follow-up as if death were censoring
                                 "median_reverse_km": float(g.x[reached[0]]) if reached.size else None}}


def _months(values) -> str:
    return ", ".join(f"{float(v):g}" for v in values) + " months"
