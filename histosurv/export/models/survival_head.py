"""Survival outputs shared by every model of the zoo.

Two parametrisations are used in this field:

* ``cox``: one logit per bag, the log relative hazard; risk = logit (AMMASurv, Pathomic Fusion).
* ``discrete``: ``n_bins`` logits of per-interval hazards h_k = sigmoid(logit_k), survival
  S_k = prod_{j<=k} (1 - h_j) and risk = -sum_k S_k (MCAT, PORPOISE, MoME, G-HANet).

Models return logits; ``risk_from_logits`` turns either kind into the one risk the serving side
exposes (higher = worse prognosis).
"""

from __future__ import annotations

import torch

__all__ = ["HEAD_KINDS", "n_outputs", "risk_from_logits"]

HEAD_KINDS = ("cox", "discrete")


def n_outputs(kind: str, n_bins: int) -> int:
    if kind == "cox":
        return 1
    if kind == "discrete":
        if n_bins < 2:
            raise ValueError(f"a discrete-time head needs at least 2 bins, got {n_bins}")
        return n_bins
    raise ValueError(f"unknown survival head {kind!r}; expected one of {HEAD_KINDS}")


def risk_from_logits(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, K) logits -> (B,) risk."""
    if kind == "cox":
        return logits[:, 0]
    if kind == "discrete":
        # NOTE: cumprod is written as exp(cumsum(log)) because the ONNX exporters handle cumsum
        # everywhere and cumprod not at all on older opsets (research/models.md section 5).
        log_survival = torch.cumsum(torch.nn.functional.logsigmoid(-logits), dim=1)
        return -torch.exp(log_survival).sum(dim=1)
    raise ValueError(f"unknown survival head {kind!r}; expected one of {HEAD_KINDS}")
