"""Harrell's concordance index, with the pair rules of scikit-survival.

A pair (i, j) is comparable when i had an event and j was still at risk after it: t_j > t_i, or
t_j == t_i with j censored (two events at the same time are not comparable). The pair is concordant
when i's risk is higher; risks within ``tied_tol`` count one half. This is the definition of
``sksurv.metrics.concordance_index_censored`` that the MCAT-family papers report, so figures from
histosurv and from those papers mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Concordance", "concordance_index"]


@dataclass(frozen=True)
class Concordance:
    c_index: float
    concordant: int
    discordant: int
    tied_risk: int
    comparable: int


def concordance_index(time, event, risk, tied_tol: float = 1e-8, block: int = 512) -> Concordance:
    """C-index of ``risk`` (higher = earlier event) against right-censored ``time``/``event``.

    Memory stays at ``block`` x n booleans, so tens of thousands of patients are fine.
    """
    t, e, r = _check(time, event, risk)
    events = np.flatnonzero(e)
    concordant = tied = comparable = 0
    for start in range(0, events.size, block):
        i = events[start : start + block]
        ti, ri = t[i, None], r[i, None]  # (b, 1)
        comp = (t > ti) | ((t == ti) & ~e)  # (b, n): j still at risk after i's event
        diff = r - ri  # (b, n)
        ties = comp & (np.abs(diff) <= tied_tol)
        concordant += int((comp & (diff < 0) & ~ties).sum())
        tied += int(ties.sum())
        comparable += int(comp.sum())
    if comparable == 0:
        raise ValueError("no comparable pairs: the c-index is undefined for these times and events")
    c = (concordant + 0.5 * tied) / comparable
    return Concordance(c, concordant, comparable - concordant - tied, tied, comparable)


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
