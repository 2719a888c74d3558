"""Survival losses: Cox partial likelihood (AMMASurv) and discrete-time NLL (MCAT family)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["cox_ph_loss", "nll_discrete_loss", "fit_time_bins", "assign_time_bins"]


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox log partial likelihood with Breslow's handling of ties, averaged over events.

        loss = -1/|E| * sum_{i in E} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]

    Tied times share one risk set that holds all of them (Breslow). O(n log n): a sort and a
    cumulative log-sum-exp, no n x n matrix.
    """
    event = event.bool()
    if not event.any():
        return risk.sum() * 0.0  # no events: no information, but keep the graph connected
    order = torch.argsort(time, descending=True, stable=True)
    r, t = risk[order], time[order]
    log_risk_set = torch.logcumsumexp(r, dim=0)  # over everyone with a later or equal time ...
    _, counts = torch.unique_consecutive(t, return_counts=True)
    group_end = torch.repeat_interleave(torch.cumsum(counts, 0) - 1, counts)
    log_risk_set = log_risk_set[group_end]  # ... up to the last member of one's tie group
    e = event[order]
    return -(r[e] - log_risk_set[e]).mean()


def nll_discrete_loss(
    logits: torch.Tensor, bins: torch.Tensor, censorship: torch.Tensor, alpha: float = 0.0, eps: float = 1e-7
) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood as in MCAT's ``nll_loss``.

    hazards h = sigmoid(logits) (B, K), S_k = prod_{j<=k}(1 - h_j), S_-1 = 1. An event in bin y
    contributes -log S_{y-1} - log h_y; a censoring in bin y contributes -log S_y. ``alpha``
    up-weights the uncensored term (MCAT's default is 0).
    """
    y = bins.long().view(-1, 1)
    c = censorship.float().view(-1, 1)
    hazards = torch.sigmoid(logits)
    survival = torch.cumprod(1 - hazards, dim=1)
    s_padded = torch.cat([torch.ones_like(c), survival], dim=1)  # S_-1 = 1
    log = lambda x: torch.log(x.clamp(min=eps))  # noqa: E731
    uncensored = -(1 - c) * (log(s_padded.gather(1, y)) + log(hazards.gather(1, y)))
    censored = -c * log(s_padded.gather(1, y + 1))
    return ((1 - alpha) * (censored + uncensored) + alpha * uncensored).mean()


def fit_time_bins(time: np.ndarray, event: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Bin edges as MCAT draws them: quantiles of the event times, outer edges widened to cover all.

    Fit on the training split only; ``assign_time_bins`` applies the edges anywhere.
    """
    time, event = np.asarray(time, float), np.asarray(event, bool)
    if event.sum() < n_bins:
        raise ValueError(f"{int(event.sum())} events cannot define {n_bins} time bins")
    edges = np.quantile(time[event], np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = time.min() - 1e-6, time.max() + 1e-6
    return edges


def assign_time_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # left-closed bins [e_k, e_k+1), as pd.cut(right=False); times beyond the fitted range clip
    return np.clip(np.searchsorted(edges, np.asarray(time, float), side="right") - 1, 0, len(edges) - 2)
