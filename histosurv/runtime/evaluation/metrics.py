"""Survival figures in numpy: Kaplan-Meier, the log-rank test, Uno's c-index, cumulative/dynamic AUC,
the Brier score and calibration by risk bin.

Each follows the reference a statistician would check it against, rule for rule, so the numbers are
equal to 1e-6 (``tests/test_evaluate.py``): scikit-survival 0.23+ for the censoring distribution,
``concordance_index_ipcw``, ``cumulative_dynamic_auc``, ``brier_score`` and ``integrated_brier_score``;
lifelines for ``logrank_test`` / ``multivariate_logrank_test``. Neither is a dependency of the runtime.

Arrays: ``time`` (n,) in months, ``event`` (n,) bool (True = death observed), ``risk`` (n,) with higher =
worse prognosis, ``survival`` (n, T) predicted S(t) at ``times`` (T,). A figure that the data cannot
define raises :class:`Undefined`, whose message says why; callers report it as null with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...data.concordance import weighted_concordance

__all__ = [
    "Undefined", "StepFunction", "KaplanMeier", "kaplan_meier", "censoring_survival", "uno_c_index",
    "cumulative_dynamic_auc", "mean_auc", "brier_scores", "integrated_brier_score", "LogRank", "logrank",
    "calibration_bins",
]


class Undefined(ValueError):
    """The data cannot define this figure (no events by t, no controls, no comparable pairs, ...)."""


@dataclass(frozen=True)
class StepFunction:
    """A right-continuous step function that is 1 before ``x[0]`` and ``y[k]`` on [x[k], x[k+1])."""

    x: np.ndarray
    y: np.ndarray

    def __call__(self, t) -> np.ndarray:
        # scikit-survival reads its step functions the same way: the last jump at or before t
        idx = np.searchsorted(self.x, np.asarray(t, dtype=np.float64), side="right")
        return np.r_[1.0, self.y][idx]


def _counts(time: np.ndarray, event: np.ndarray):
    """Distinct times (U,) with deaths, censorings and the number at risk just before each."""
    uniq, inverse = np.unique(time, return_inverse=True)
    deaths = np.bincount(inverse, weights=event.astype(np.float64), minlength=uniq.size)
    total = np.bincount(inverse, minlength=uniq.size).astype(np.float64)
    at_risk = time.size - np.r_[0.0, np.cumsum(total)[:-1]]
    return uniq, deaths, total - deaths, at_risk


@dataclass(frozen=True)
class KaplanMeier:
    """The Kaplan-Meier estimate at each distinct observed time, with Greenwood's standard error."""

    time: np.ndarray
    survival: np.ndarray
    se: np.ndarray
    at_risk: np.ndarray
    deaths: np.ndarray
    censored: np.ndarray

    def at(self, t: float) -> tuple[float, float]:
        """(S(t), its standard error); Undefined past the last time unless S reached 0 there."""
        if self.time.size == 0:
            raise Undefined("no patients")
        if t > self.time[-1] and self.survival[-1] > 0:
            raise Undefined(f"follow-up ends at {self.time[-1]:g} months, before {t:g}")
        k = int(np.searchsorted(self.time, t, side="right")) - 1
        return (1.0, 0.0) if k < 0 else (float(self.survival[k]), float(self.se[k]))

    def median(self) -> float | None:
        """The first time S falls to 0.5 or below (None: it never does within follow-up)."""
        below = np.flatnonzero(self.survival <= 0.5)
        return float(self.time[below[0]]) if below.size else None

    def at_risk_at(self, t: float) -> int:
        """Patients still followed at ``t`` (time >= t)."""
        k = int(np.searchsorted(self.time, t, side="left"))
        return int(self.at_risk[k]) if k < self.time.size else 0


def kaplan_meier(time, event) -> KaplanMeier:
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    uniq, d, c, n = _counts(t, e)
    s = np.cumprod(1.0 - d / n)
    # Greenwood; a step where everyone left dies takes S to 0, whose error is 0 (not 0 * inf)
    term = np.divide(d, n * (n - d), out=np.zeros_like(d), where=n > d)
    se = s * np.sqrt(np.cumsum(term))
    return KaplanMeier(uniq, s, se, n, d, c)


def censoring_survival(time, event) -> StepFunction:
    """G(t) = P(censored after t): the Kaplan-Meier estimate with censorings as the events.

    Deaths at a time leave the risk set before the censorings at that time, as scikit-survival's
    ``CensoringDistributionEstimator`` counts them (its IPCW weights are 1 / G(t_i)).
    """
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    uniq, d, c, n = _counts(t, e)
    remaining = n - d
    ratio = np.divide(c, remaining, out=np.zeros_like(c), where=c > 0)
    return StepFunction(uniq, np.cumprod(1.0 - ratio))


def _ipcw(time, event, censoring: StepFunction, mask) -> np.ndarray:
    """1 / G(t_i) for the events in ``mask``, 0 elsewhere."""
    w = np.zeros(time.size)
    pick = event & mask
    g = censoring(time[pick])
    if (g <= 0).any():
        raise Undefined("the censoring distribution is 0 at an event time (no one left at risk of censoring)")
    w[pick] = 1.0 / g
    return w


def uno_c_index(time, event, risk, censoring: StepFunction, tau: float) -> float:
    """Uno's c-index truncated at ``tau``: pairs of an event before tau, weighted by 1 / G(t_i)^2."""
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    w = _ipcw(t, e, censoring, t < tau) ** 2
    try:
        return weighted_concordance(t, e, risk, w)
    except ValueError as err:
        raise Undefined(f"no comparable pairs with an event before {tau:g} months") from err


def cumulative_dynamic_auc(time, event, risk, times, censoring: StepFunction, tied_tol: float = 1e-8) -> np.ndarray:
    """AUC(t) at each of ``times`` (T,): cases died by t (weighted 1 / G(t_i)), controls alive after t.

    NaN where a time has no case or no control (the caller says why with :func:`auc_undefined_reason`).
    """
    t, e, r = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool), np.asarray(risk, dtype=np.float64)
    times = np.asarray(times, dtype=np.float64)
    w = _ipcw(t, e, censoring, t <= times.max())
    order = np.argsort(-r)  # highest risk first: the ROC curve is traced as the threshold falls
    t, e, r, w = t[order], e[order], r[order], w[order]
    # of a run of tied risks only the last point of the curve is kept (the tie is one threshold)
    tied = np.abs(np.diff(r)) <= tied_tol  # (n-1,): point k ties with point k+1
    keep = np.r_[~tied, True]
    cases = (t[:, None] <= times) & e[:, None]  # (n, T)
    controls = t[:, None] > times  # (n, T)
    tp, fp = np.cumsum(cases * w[:, None], axis=0), np.cumsum(controls, axis=0)  # (n, T)
    auc = np.full(times.size, np.nan)
    for k in range(times.size):
        if tp[-1, k] <= 0 or fp[-1, k] == 0:
            continue
        x = np.r_[0.0, fp[keep, k] / fp[-1, k]]
        y = np.r_[0.0, tp[keep, k] / tp[-1, k]]
        auc[k] = float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
    return auc


def auc_undefined_reason(time, event, t: float) -> str:
    time, event = np.asarray(time), np.asarray(event, dtype=bool)
    if not (event & (time <= t)).any():
        return f"no deaths at or before {t:g} months"
    return f"no patient followed beyond {t:g} months"


def mean_auc(time, event, times, auc) -> float:
    """The mean of AUC(t) weighted by the Kaplan-Meier drop in survival over each interval (Lambert
    and Chevret), as ``cumulative_dynamic_auc`` returns it; one time: its AUC."""
    times, auc = np.asarray(times, dtype=np.float64), np.asarray(auc, dtype=np.float64)
    if auc.size == 0 or not np.isfinite(auc).all():
        raise Undefined("the AUC is undefined at every reported time")
    if auc.size == 1:
        return float(auc[0])
    km = kaplan_meier(time, event)
    s = np.array([km.at(t)[0] for t in times])
    if 1.0 - s[-1] <= 0:
        raise Undefined(f"no deaths by {times[-1]:g} months")
    return float(np.sum(auc * -np.diff(np.r_[1.0, s])) / (1.0 - s[-1]))


def brier_scores(time, event, survival, times, censoring: StepFunction) -> np.ndarray:
    """The IPCW Brier score (Graf et al.) at each of ``times``: (T,)."""
    t, e = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    s, times = np.asarray(survival, dtype=np.float64), np.asarray(times, dtype=np.float64)
    # a G of 0 weighs nothing, as scikit-survival sets it (it happens only past the last censoring)
    g_times, g_own = censoring(times), censoring(t)
    inv_times = np.divide(1.0, g_times, out=np.zeros_like(g_times), where=g_times > 0)
    inv_own = np.divide(1.0, g_own, out=np.zeros_like(g_own), where=g_own > 0)
    cases = (t[:, None] <= times) & e[:, None]  # (n, T)
    controls = t[:, None] > times  # (n, T)
    return np.mean(s**2 * cases * inv_own[:, None] + (1.0 - s) ** 2 * controls * inv_times, axis=0)


def integrated_brier_score(times, scores) -> float:
    """The trapezoid integral of the Brier score over [times[0], times[-1]], divided by its length."""
    times, scores = np.asarray(times, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if times.size < 2:
        raise Undefined("the integrated Brier score needs at least two reported times with S(t)")
    return float(np.sum(np.diff(times) * (scores[1:] + scores[:-1])) / 2.0 / (times[-1] - times[0]))


@dataclass(frozen=True)
class LogRank:
    chi2: float
    dof: int
    p_value: float
    observed: np.ndarray  # (k,) deaths per group
    expected: np.ndarray  # (k,) deaths expected per group under equal hazards


def logrank(time, event, group) -> LogRank:
    """The log-rank test across the groups of ``group`` (k >= 2 codes 0..k-1)."""
    from scipy.stats import chi2 as chi2_dist

    t, e, g = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool), np.asarray(group)
    k = int(g.max()) + 1
    if k < 2:
        raise Undefined("the log-rank test needs at least two groups")
    uniq = np.unique(t)
    at_risk = np.stack([(g == j).sum() - np.searchsorted(np.sort(t[g == j]), uniq, side="left")
                        for j in range(k)], axis=1).astype(np.float64)  # (U, k)
    deaths = np.stack([np.bincount(np.searchsorted(uniq, t[(g == j) & e]), minlength=uniq.size)
                       for j in range(k)], axis=1).astype(np.float64)  # (U, k)
    n, d = at_risk.sum(axis=1), deaths.sum(axis=1)  # (U,)
    expected = (at_risk * (d / n)[:, None]).sum(axis=0)
    z = deaths.sum(axis=0) - expected
    f = np.divide(d * (n - d), n**2 * (n - 1), out=np.zeros_like(d), where=n > 1)  # (U,)
    v = np.einsum("u,uj,uk->jk", f, at_risk, -at_risk)
    v[np.diag_indices(k)] += (f[:, None] * at_risk * n[:, None]).sum(axis=0)
    # the groups' deviations sum to 0, so one is left out; pinv as lifelines, for a degenerate V
    stat = float(z[:-1] @ np.linalg.pinv(v[:-1, :-1]) @ z[:-1])
    if not np.isfinite(stat):
        raise Undefined("the log-rank statistic is not finite")
    return LogRank(stat, k - 1, float(chi2_dist.sf(stat, k - 1)), deaths.sum(axis=0), expected)


def calibration_bins(time, event, risk, predicted, t: float, n_bins: int) -> list[dict]:
    """Per risk bin (lowest risk first): the mean predicted S(t) beside the Kaplan-Meier S(t) observed in
    the bin, with its Greenwood standard error; the observed value is None with a reason where the
    bin's follow-up ends before t."""
    t_, e, r, p = (np.asarray(a) for a in (time, event, risk, predicted))
    edges = np.quantile(r, np.linspace(0, 1, n_bins + 1)[1:-1])
    # a risk on an edge goes to the lower bin, so tied risks are never split
    which = np.searchsorted(edges, r, side="left")
    out = []
    for b in np.unique(which):
        m = which == b
        row = {"bin": len(out) + 1, "n": int(m.sum()), "deaths": int(e[m].sum()),
               "risk_range": [float(r[m].min()), float(r[m].max())], "predicted": float(p[m].mean())}
        try:
            row["observed"], row["observed_se"] = kaplan_meier(t_[m], e[m]).at(t)
        except Undefined as err:
            row["observed"], row["observed_se"], row["reason"] = None, None, str(err)
        out.append(row)
    return out
