"""Survival metrics and losses against independent references."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sksurv.metrics import concordance_index_censored

from histosurv.export.concordance import concordance_index
from histosurv.export.losses import assign_time_bins, cox_ph_loss, fit_time_bins, nll_discrete_loss


def _random_survival(seed: int, n: int, tie_levels: int | None):
    rng = np.random.default_rng(seed)
    time = rng.exponential(30, n)
    risk = rng.normal(size=n) - 0.01 * time
    if tie_levels:  # coarse values create many tied times and tied risks
        time = np.round(time / time.max() * tie_levels)
        risk = np.round(risk * 2) / 2
    event = rng.random(n) < 0.6
    return time, event, risk


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n, tie_levels", [(2, None), (7, 3), (50, None), (200, 10), (501, 25)])
def test_c_index_equals_scikit_survival(seed, n, tie_levels):
    time, event, risk = _random_survival(seed, n, tie_levels)
    if not event.any():
        event[0] = True
    try:
        ref = concordance_index_censored(event, time, risk)
    except Exception as e:  # sksurv refuses data without comparable pairs; so must we
        with pytest.raises(ValueError):
            concordance_index(time, event, risk)
        assert "comparable" in str(e)
        return
    got = concordance_index(time, event, risk)
    assert abs(got.c_index - ref[0]) <= 1e-9
    assert (got.concordant, got.discordant, got.tied_risk) == tuple(int(x) for x in ref[1:4])


def test_c_index_blocks_do_not_change_the_result():
    time, event, risk = _random_survival(3, 700, 30)
    assert concordance_index(time, event, risk, block=7).c_index == concordance_index(time, event, risk).c_index


def test_c_index_orientation_and_errors():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, True, True, False])
    assert concordance_index(time, event, [4, 3, 2, 1]).c_index == 1.0  # higher risk dies first
    assert concordance_index(time, event, [1, 2, 3, 4]).c_index == 0.0
    with pytest.raises(ValueError, match="censored"):
        concordance_index(time, [False] * 4, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="differ in length"):
        concordance_index(time, event, [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        concordance_index(time, event, [1, np.nan, 3, 4])


def _cox_direct(risk, time, event):
    """-(1/#events) sum over events of [r_i - log sum_{j: t_j >= t_i} exp(r_j)], in plain Python."""
    total, events = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            at_risk = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            total += risk[i] - math.log(at_risk)
            events += 1
    return -total / events


@pytest.mark.parametrize("seed", range(8))
def test_cox_loss_matches_the_formula_with_ties(seed):
    time, event, risk = _random_survival(seed, 40, 6)  # about 7 distinct times: heavy ties
    event[0] = True
    got = cox_ph_loss(torch.tensor(risk, dtype=torch.float64), torch.tensor(time), torch.tensor(event))
    assert got.item() == pytest.approx(_cox_direct(risk, time, event), rel=1e-12, abs=1e-12)


def test_cox_loss_gradient_and_no_events():
    risk = torch.randn(10, requires_grad=True, dtype=torch.float64)
    time = torch.arange(10.0, dtype=torch.float64)
    loss = cox_ph_loss(risk, time, torch.zeros(10, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(10, dtype=torch.float64))
    # with events, the loss is differentiable and decreases when an early death gets a higher risk
    event = torch.ones(10, dtype=torch.bool)
    base = cox_ph_loss(risk.detach(), time, event)
    better = risk.detach().clone()
    better[0] += 1.0
    assert cox_ph_loss(better, time, event) < base


def _nll_direct(logits, bins, censorship, alpha, eps=1e-7):
    """MCAT's nll_loss, one sample at a time."""
    total = 0.0
    for z, y, c in zip(logits, bins, censorship):
        h = [1 / (1 + math.exp(-v)) for v in z]
        s = [1.0]
        for hk in h:
            s.append(s[-1] * (1 - hk))  # s[k+1] = S_k
        unc = -(1 - c) * (math.log(max(s[y], eps)) + math.log(max(h[y], eps)))
        cen = -c * math.log(max(s[y + 1], eps))
        total += (1 - alpha) * (cen + unc) + alpha * unc
    return total / len(bins)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_loss_matches_the_formula(alpha):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 4)) * 2
    bins = rng.integers(0, 4, 30)
    cens = (rng.random(30) < 0.5).astype(float)
    got = nll_discrete_loss(torch.tensor(logits), torch.tensor(bins), torch.tensor(cens), alpha=alpha)
    assert got.item() == pytest.approx(_nll_direct(logits, bins, cens, alpha), rel=1e-10)


def test_time_bins_follow_mcat():
    rng = np.random.default_rng(0)
    time = rng.exponential(25, 300).round(2)
    event = rng.random(300) < 0.5
    edges = fit_time_bins(time, event, 4)
    # MCAT: pd.qcut over uncensored times, outer edges widened to all times, pd.cut(right=False)
    _, ref = pd.qcut(time[event], q=4, retbins=True, labels=False)
    ref[0], ref[-1] = time.min() - 1e-6, time.max() + 1e-6
    np.testing.assert_allclose(edges, ref)
    expected = pd.cut(time, bins=ref, labels=False, right=False, include_lowest=True)
    np.testing.assert_array_equal(assign_time_bins(time, edges), expected)
    assert assign_time_bins([time.max() + 100], edges)[0] == 3  # beyond the fitted range: last bin
