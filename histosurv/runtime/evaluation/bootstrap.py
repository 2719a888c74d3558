"""Percentile bootstrap intervals: resample patients with replacement, recompute every figure.

A replicate in which a figure is undefined (no comparable pair, no death by t, no patient followed
past t) is skipped for that figure only; each interval says how many replicates made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

__all__ = ["Interval", "bootstrap_intervals"]

LEVEL = 0.95
MIN_REPLICATES = 20  # below this a 2.5th percentile is one or two values: no interval is given


@dataclass(frozen=True)
class Interval:
    lower: float | None
    upper: float | None
    used: int  # replicates in which the figure was defined
    replicates: int

    def to_json(self) -> dict:
        out = {"ci95": None if self.lower is None else [self.lower, self.upper],
               "replicates_used": self.used, "replicates": self.replicates}
        if self.lower is None:
            out["ci95_reason"] = (f"the figure was defined in {self.used} of {self.replicates} bootstrap replicates, "
                                  f"fewer than {MIN_REPLICATES}")
        return out


def bootstrap_intervals(statistic: Callable[[np.ndarray], Mapping[str, float | None]], n: int, replicates: int,
                        seed: int) -> dict[str, Interval]:
    """95% percentile interval of each figure ``statistic(idx)`` returns (None or NaN: undefined there).

    ``idx`` (n,) indexes the patients of one replicate; replicate k draws the same patients for a given
    seed whatever the figures are.
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(replicates):
        for name, value in statistic(rng.integers(0, n, size=n)).items():
            kept = values.setdefault(name, [])
            if value is not None and np.isfinite(value):
                kept.append(float(value))
    return {name: _percentile(v, replicates) for name, v in values.items()}


def _percentile(values: list[float], replicates: int) -> Interval:
    if len(values) < MIN_REPLICATES:
        return Interval(None, None, len(values), replicates)
    tail = 100 * (1 - LEVEL) / 2
    lower, upper = np.percentile(values, [tail, 100 - tail])
    return Interval(float(lower), float(upper), len(values), replicates)
