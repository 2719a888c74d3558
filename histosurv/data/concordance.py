"""Concordance indices in numpy, with the pair rules of scikit-survival.

A pair (i, j) is comparable when i had an event and j was still at risk after it: t_j > t_i, or
t_j == t_i with j censored (two events at the same time are not comparable). The pair is concordant
when i's risk is higher; risks within ``tied_tol`` count one half. Harrell's index counts every
comparable pair once: the definition of ``sksurv.metrics.concordance_index_censored`` that the
MCAT-family papers report, so figures from histosurv and from those papers mean the same thing.
Uno's index (``histosurv.runtime.evaluation``) weighs the pairs of each event by ``weights``.

It lives in ``data/`` because both sides use it: training reports it, ``histosurv evaluate`` (which
never imports torch) does too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Concordance", "concordance_index", "weighted_concordance"]


@dataclass(frozen=True)
class Concordance:
    c_index: float
    concordant: int
    discordant: int
    tied_risk: int
    comparable: int


def concordance_index(time, event, risk, tied_tol: float = 1e-8, block: int = 512) -> Concordance:
    """Harrell's c-index of ``risk`` (higher = earlier event) against right-censored ``time``/``event``.

    Memory stays at ``block`` x n booleans, so tens of thousands of patients are fine.
    """
    t, e, r = _check(time, event, risk)
    concordant = tied = comparable = 0
    for _, con, tie, comp in _pairs_per_event(t, e, r, tied_tol, block):
        concordant += int(con.sum())
        tied += int(tie.sum())
        comparable += int(comp.sum())
    if comparable == 0:
        raise ValueError("no comparable pairs: the c-index is undefined for these times and events")
    c = (concordant + 0.5 * tied) / comparable
    return Concordance(c, concordant, comparable - concordant - tied, tied, comparable)


def weighted_concordance(time, event, risk, weights, tied_tol: float = 1e-8, block: int = 512) -> float:
    """Concordance where every pair of event i counts ``weights[i]`` (Uno's index: squared inverse
    probability of censoring weights, zero from its truncation time on).

    Raises ValueError where no comparable pair has a positive weight.
    """
    t, e, r = _check(time, event, risk)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != t.size or not np.isfinite(w).all():
        raise ValueError("weights must be finite, one per sample")
    numerator = denominator = 0.0
    for i, con, tie, comp in _pairs_per_event(t, e, r, tied_tol, block):
        numerator += float(w[i] @ (con + 0.5 * tie))
        denominator += float(w[i] @ comp)
    if denominator <= 0:
        raise ValueError("no comparable pairs with a positive weight: the c-index is undefined")
    return numerator / denominator


def _pairs_per_event(t, e, r, tied_tol: float, block: int):
    """Per block of events i: (i, concordant, tied, comparable) pair counts of each i, shape (b,)."""
    events = np.flatnonzero(e)
    for start in range(0, events.size, block):
        i = events[start : start + block]
        ti, ri = t[i, None], r[i, None]  # (b, 1)
        comp = (t > ti) | ((t == ti) & ~e)  # (b, n): j still at risk after i's event
        diff = r - ri  # (b, n)
        ties = comp & (np.abs(diff) <= tied_tol)
        yield i, (comp & (diff < 0) & ~ties).sum(axis=1), ties.sum(axis=1), comp.sum(axis=1)


def _check(time, event, risk):
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    if not (t.size == e.size == r.size):
        raise ValueError(f"time, event and risk differ in length: {t.size}, {e.size}, {r.size}")
    if t.size < 2:
        raise ValueError("the c-index needs at least two samples")
    if e.dtype != np.bool_:
        if not np.isin(e, (0, 1)).all():
            raise ValueError("event must be boolean (True = event observed)")
        e = e.astype(bool)
    if not e.any():
        raise ValueError("all samples are censored: the c-index is undefined")
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        raise ValueError("time and risk must be finite")
    return t, e, r
