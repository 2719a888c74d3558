"""CoxNet: an elastic-net Cox model on mean-pooled patch features and/or genes, the zoo's linear baseline.

A slide's bag of patch features (N, D) is averaged over its N patches, standardised with the training
patients' mean and scale (buffers), joined to the standardised genes, and one ``Linear(in, 1)`` without
bias gives the log relative hazard (``survival_head="cox"``). The weights are not learnt by gradient
descent: :func:`fit_coxnet_model` solves scikit-survival's ``CoxnetSurvivalAnalysis`` objective
(Simon, Friedman, Hastie and Tibshirani 2011, as in glmnet) on the training patients,

    (1/n) * -log PL(b) + alpha * (l1_ratio * ||b||_1 + (1 - l1_ratio) / 2 * ||b||_2^2),

log PL the Breslow log partial likelihood, with the penalty ``alpha`` chosen by an inner,
patient-level cross-validation over a path of alphas (or fixed by the configuration).

The solver (:func:`fit_coxnet`, :func:`coxnet_path`) is numpy and scipy only: proximal Newton steps
with the exact Hessian of the partial likelihood, on a working set of columns grown until the full KKT
conditions hold; each step's penalised quadratic is solved exactly by a primal active-set method. Along
a path each fit is warm-started from the previous alpha's. Solutions agree with scikit-survival's
coordinate descent to its tolerance and satisfy the KKT conditions to ~1e-9 (tests/test_coxnet.py); a
path of 30 alphas on 1000 patients x 572 columns takes about 0.4 s on one core.

Inference reads every patch, as the other models do; ``return_attention`` gives the pooling weights,
1/N for every patch (the mean weighs the patches alike, so a heatmap of this model is flat).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .base import GeneScaler, SurvivalModel, check_attention_impl, check_features, check_genes

__all__ = [
    "CoxNetConfig",
    "CoxNet",
    "CoxNetCV",
    "fit_coxnet",
    "coxnet_path",
    "alpha_path",
    "choose_alpha",
    "fit_coxnet_model",
    "patient_design",
    "log_partial_likelihood",
]

MODALITIES = ("both", "image", "genes")
MAX_NEWTON = 200  # proximal Newton steps per working set (a handful are used along a path)
ETA_STEP = 20.0  # the largest change of any patient's linear predictor one Newton step tries


@dataclass(frozen=True)
class CoxNetConfig:
    n_genes: int  # G, the length of the gene list in the manifest (0 with modality image)
    feature_dim: int = 512  # D, the width of the patch features
    modality: str = "both"  # both, image (mean-pooled features only) or genes
    l1_ratio: float = 0.5  # elastic-net mixing, 0 < l1_ratio <= 1 (1: lasso)
    # NOTE: not "alpha": `histosurv train` has one flag per field of every model config and of
    # TrainConfig, whose `alpha` (the discrete-time NLL weight) would collide with it.
    fixed_alpha: float = 0.0  # the elastic-net penalty; 0 chooses it by inner cross-validation
    n_alphas: int = 30  # alphas on the path searched by the inner cross-validation
    alpha_min_ratio: float = 0.01  # the path's smallest alpha over its largest
    inner_folds: int = 5  # folds of the inner cross-validation (patients, stratified by event)
    survival_head: str = "cox"  # cox only: the model is a Cox regression
    n_bins: int = 4  # not read (the zoo's configs all carry it)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.survival_head != "cox":
            raise ValueError(
                f"coxnet is a Cox regression: survival_head must be 'cox', got {self.survival_head!r} "
                "(a discrete-time head has no elastic-net Cox fit)"
            )
        if self.n_genes < 0 or (self.uses_genes and self.n_genes < 1):
            raise ValueError(f"coxnet with modality {self.modality!r} needs n_genes >= 1, got {self.n_genes}")
        if self.feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if not 0.0 < self.l1_ratio <= 1.0:
            raise ValueError(f"l1_ratio must be in (0, 1], got {self.l1_ratio} (a pure ridge has no largest alpha)")
        if not (math.isfinite(self.fixed_alpha) and self.fixed_alpha >= 0.0):
            raise ValueError(f"fixed_alpha must be >= 0 (0: chosen by inner cross-validation), got {self.fixed_alpha}")
        if self.n_alphas < 1:
            raise ValueError(f"n_alphas must be at least 1, got {self.n_alphas}")
        if not 0.0 < self.alpha_min_ratio < 1.0:
            raise ValueError(f"alpha_min_ratio must be in (0, 1), got {self.alpha_min_ratio}")
        if self.inner_folds < 2:
            raise ValueError(f"inner_folds must be at least 2, got {self.inner_folds}")

    @property
    def uses_image(self) -> bool:
        return self.modality in ("both", "image")

    @property
    def uses_genes(self) -> bool:
        return self.modality in ("both", "genes")

    @property
    def n_inputs(self) -> int:
        return self.feature_dim * self.uses_image + self.n_genes * self.uses_genes

    def to_dict(self) -> dict:
        return asdict(self)


class CoxNet(SurvivalModel):
    """features (B, N, D) and/or genes (B, G) raw values -> log relative hazard (B, 1).

    logit = w . [ (mean_n features - feature_mean) / feature_scale ; (genes - mean) / scale ]
    """

    def __init__(self, cfg: CoxNetConfig, attention_impl: str = "sdpa"):
        super().__init__()
        check_attention_impl(attention_impl)  # no attention here; accepted for the zoo contract
        self.cfg = cfg
        self.genes = GeneScaler(cfg.n_genes) if cfg.uses_genes else None
        d = cfg.feature_dim if cfg.uses_image else 0
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))
        # nn.Linear's random initialisation, as the zoo's other models: fit_coxnet_model sets the weights
        self.classifier = nn.Linear(cfg.n_inputs, 1, bias=False)
        self.chosen_alpha: float = float("nan")  # set by fit_coxnet_model
        self.inner_cv: CoxNetCV | None = None  # the inner cross-validation, when the penalty was chosen by one

    @property
    def uses_image(self) -> bool:
        return self.cfg.uses_image

    @property
    def uses_genes(self) -> bool:
        return self.cfg.uses_genes

    def forward(self, features=None, coords=None, genes=None, return_attention: bool = False):
        parts = []
        if self.cfg.uses_image:
            check_features(features, self.cfg.feature_dim, "CoxNet")
            parts.append((features.mean(dim=1) - self.feature_mean) / self.feature_scale)  # (B, D)
        if self.cfg.uses_genes:
            check_genes(genes, self.cfg.n_genes, "CoxNet")
            parts.append(self.genes(genes))  # (B, G)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        logits = self.classifier(x)  # (B, 1)
        if return_attention and self.cfg.uses_image:
            # The mean's pooling weights, 1/N for every patch: the serving signature (onnx_export.SingleBag)
            # has an attention output for every model that reads patches; this one favours none.
            weights = torch.ones_like(features[:, :, 0]) / features.shape[1]
            return logits, weights
        return logits  # return_attention without patches is ignored, as in SNN

    def set_feature_scaler(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if self.cfg.uses_image:
            self.feature_mean.copy_(mean)
            self.feature_scale.copy_(scale)


# ----------------------------------------------------------------------------------------------------
# The elastic-net Cox solver


class _CoxData:
    """Times sorted in decreasing order (stable), with Breslow's tie groups: the risk set of a patient
    is everyone up to the end of its tie group in this order."""

    def __init__(self, X: np.ndarray, time: np.ndarray, event: np.ndarray):
        X = np.asarray(X, dtype=np.float64)
        time = np.asarray(time, dtype=np.float64).ravel()
        event = np.asarray(event).ravel()
        if X.ndim != 2 or X.shape[0] != time.size or time.size != event.size:
            raise ValueError(f"X {X.shape}, time ({time.size},) and event ({event.size},) do not match")
        if event.dtype != np.bool_:
            if not np.isin(event, (0, 1)).all():
                raise ValueError("event must be boolean (True = event observed)")
            event = event.astype(bool)
        if not (np.isfinite(X).all() and np.isfinite(time).all()):
            raise ValueError("X and time must be finite")
        if X.shape[0] < 2 or not event.any():
            raise ValueError("a Cox fit needs at least two patients and one event")
        self.order = np.argsort(-time, kind="mergesort")
        self.X = np.ascontiguousarray(X[self.order])
        self.time = time[self.order]
        self.event = event[self.order].astype(np.float64)
        self.n, self.p = self.X.shape
        new_group = np.r_[True, self.time[1:] != self.time[:-1]]
        self.group = np.cumsum(new_group) - 1  # tie group of each sorted row
        starts = np.flatnonzero(new_group)
        self.ends = np.r_[starts[1:], self.n] - 1  # last row of each group
        deaths = np.bincount(self.group, weights=self.event, minlength=starts.size)
        keep = deaths > 0  # groups without events add nothing to the likelihood
        self.event_ends, self.deaths = self.ends[keep], deaths[keep]
        self.event_group = np.flatnonzero(keep)
        self.n_groups = starts.size

    def state(self, eta: np.ndarray):
        """-log PL, its gradient in eta, and (w, S, wc) for the Hessian: w = exp(eta - shift), S the risk
        sets' sums of w at the event times, wc_j = exp(eta_j) * sum_k d_k / S_k over event times <= t_j."""
        log_s = np.logaddexp.accumulate(eta)[self.event_ends]  # log of the risk sets' sums of exp(eta)
        neg_loglik = float(np.dot(self.deaths, log_s) - np.dot(self.event, eta))
        per_group = np.full(self.n_groups, -np.inf)
        per_group[self.event_group] = np.log(self.deaths) - log_s
        log_c = np.logaddexp.accumulate(per_group[::-1])[::-1][self.group]  # log sum_k d_k / S_k, t_k <= t_j
        wc = np.exp(eta + log_c)  # each term exp(eta_j - log S_k) <= 1: no overflow
        shift = eta.max()
        w = np.exp(eta - shift)
        # Rescaled sums for the Hessian's risk-set means; a sum that underflows (eta spread over > 700)
        # drops its mean's term, which leaves a larger positive definite metric, not a wrong gradient.
        S = np.maximum(np.exp(log_s - shift), 1e-300)
        return neg_loglik, wc - self.event, (w, S, wc)

    def neg_loglik(self, eta: np.ndarray) -> float:
        log_s = np.logaddexp.accumulate(eta)[self.event_ends]
        return float(np.dot(self.deaths, log_s) - np.dot(self.event, eta))


class _HessianColumns:
    """Columns of Q = (1/n) * Hessian of -log PL + lam2 * I over the working set's columns, computed
    when first asked for: the active-set solver reads the columns of its active set only, so a step
    costs n * m * |active| rather than n * m^2.

    The Hessian of -log PL is X' diag(w c) X - sum_k d_k m_k m_k' (m_k the risk set's weighted mean of
    X at event time k, w = exp(eta), c_j = sum of d_k / S_k over event times up to t_j)."""

    def __init__(self, data: _CoxData, XW: np.ndarray, w: np.ndarray, S: np.ndarray, wc: np.ndarray, lam2: float):
        self.n, self.lam2 = data.n, lam2
        self.XW = XW
        self.Xwc = XW * wc[:, None]
        self.M = np.cumsum(XW * w[:, None], axis=0)[data.event_ends] / S[:, None]
        self.MD = self.M * data.deaths[:, None]
        m = XW.shape[1]
        self.Q = np.empty((m, m))
        self.have = np.zeros(m, dtype=bool)

    def columns(self, J: np.ndarray) -> np.ndarray:
        need = J[~self.have[J]]
        if need.size:
            block = (self.XW.T @ self.Xwc[:, need] - self.M.T @ self.MD[:, need]) / self.n
            block[need, np.arange(need.size)] += self.lam2
            self.Q[:, need] = block
            self.have[need] = True
        return self.Q[:, J]


def _cholesky(Q_AA: np.ndarray) -> np.ndarray:
    return scipy.linalg.cholesky(Q_AA, lower=True, check_finite=False)


def _lasso_qp(Q: _HessianColumns, b: np.ndarray, lam: float, u0: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin_u 1/2 u'Qu - b'u + lam ||u||_1, Q positive (semi)definite, from ``u0``.

    A primal active-set method (the feature-sign search of Lee et al. 2007): solve the equality-
    constrained quadratic on the active set with its signs fixed; if a coefficient would change sign,
    stop where the first one reaches zero and drop it; once the active set is optimal, add the inactive
    coefficient violating |z_j| <= lam the most (z = b - Qu), with the sign of z_j. The objective never
    increases and each addition decreases it, so it ends at the exact minimiser. Variables join one at
    a time: with correlated columns, adding every violator at once (primal-dual active set) makes most of
    them flip sign and can cycle. The Cholesky factor of Q_AA grows by one row per addition.
    """
    m = b.size
    u = u0.copy()
    A = [int(j) for j in np.flatnonzero(u)]
    theta = np.sign(u[A])
    try:
        L = _cholesky(Q.columns(np.asarray(A))[A]) if A else np.zeros((0, 0))
    except np.linalg.LinAlgError:  # a singular start (lasso, collinear columns): start from zero instead
        u[:], A, theta, L = 0.0, [], np.zeros(0), np.zeros((0, 0))
    stuck: set[int] = set()
    for _ in range(max_iter or 20 * m + 100):
        if A:
            Aa = np.asarray(A)
            uA = u[Aa]
            y = scipy.linalg.solve_triangular(L, b[Aa] - lam * theta, lower=True, check_finite=False)
            target = scipy.linalg.solve_triangular(L, y, lower=True, trans="T", check_finite=False)
            wrong = np.sign(target) != theta
            if wrong.any():
                # the first coefficient to reach zero on the way from uA to target leaves the active set
                idx = np.flatnonzero(wrong)
                gap = uA[idx] - target[idx]
                t = np.divide(uA[idx], gap, out=np.zeros(idx.size), where=gap != 0)
                first = idx[int(np.argmin(t))]
                step = float(np.clip(t.min(), 0.0, 1.0))
                u[Aa] = uA + step * (target - uA)
                drop = {first} | {int(i) for i in np.flatnonzero(np.sign(u[Aa]) != theta)}
                if step == 0.0 and len(A) - 1 in drop and len(drop) == 1:
                    stuck.add(A[-1])  # the newest variable cannot move the objective: a numerical tie
                for i in drop:
                    u[A[i]] = 0.0
                keep = [i for i in range(len(A)) if i not in drop]
                A = [A[i] for i in keep]
                theta = theta[keep]
                L = _cholesky(Q.columns(np.asarray(A))[A]) if A else np.zeros((0, 0))
                continue
            u[Aa] = target
            z = b - Q.columns(Aa) @ target
        else:
            z = b.copy()
        excess = np.abs(z) - lam
        excess[A] = -np.inf
        if stuck:
            excess[list(stuck)] = -np.inf
        j = int(np.argmax(excess))
        if excess[j] <= 1e-12 * max(lam, 1e-300) + 1e-15:
            return u
        q = Q.columns(np.array([j]))[:, 0]
        if A:
            l = scipy.linalg.solve_triangular(L, q[A], lower=True, check_finite=False)
            d2 = q[j] - float(l @ l)
        else:
            l, d2 = np.zeros(0), q[j]
        if d2 <= 1e-14 * max(q[j], 1e-300):
            stuck.add(j)  # collinear with the active set (possible with l1_ratio = 1 only)
            continue
        k = len(A)
        grown = np.zeros((k + 1, k + 1))
        grown[:k, :k], grown[k, :k], grown[k, k] = L, l, math.sqrt(d2)
        L = grown
        A.append(j)
        theta = np.append(theta, np.sign(z[j]))
    return u


def _objective(data: _CoxData, eta, beta, lam1, lam2) -> float:
    return data.neg_loglik(eta) / data.n + 0.5 * lam2 * float(beta @ beta) + lam1 * float(np.abs(beta).sum())


def _solve(data: _CoxData, lam1: float, lam2: float, beta: np.ndarray, candidates: np.ndarray | None,
           tol: float, max_newton: int) -> tuple[np.ndarray, int]:
    """Minimises the objective from ``beta`` (changed in place and returned); also the Newton steps taken.

    Working set: the non-zero coefficients, ``candidates`` and every KKT violator; the problem on those
    columns is solved to ``tol``, then the full KKT conditions are checked and violators join."""
    n = data.n
    eta = data.X @ beta
    _, g_eta, _ = data.state(eta)
    grad = data.X.T @ g_eta / n + lam2 * beta
    working = (beta != 0) | (np.abs(grad) > lam1)
    if candidates is not None:
        working |= candidates
    steps = 0
    while True:
        W = np.flatnonzero(working)
        if W.size:
            steps += _newton_on(data, W, beta, lam1, lam2, tol, max_newton)
        eta = data.X @ beta
        _, g_eta, _ = data.state(eta)
        grad = data.X.T @ g_eta / n + lam2 * beta
        violators = ~working & (np.abs(grad) > lam1 * (1 + 1e-9) + 1e-12)
        if not violators.any():
            return beta, steps
        working |= violators


def _newton_on(data: _CoxData, W: np.ndarray, beta: np.ndarray, lam1, lam2, tol, max_newton) -> int:
    """Proximal Newton with the exact Hessian on columns W (beta outside W is zero and stays so): each
    step solves the penalised quadratic model exactly, then backtracks on the objective (Lee, Sun and
    Saunders 2014)."""
    n = data.n
    XW = np.ascontiguousarray(data.X[:, W])
    b = beta[W].copy()
    eta = XW @ b
    value = None
    step = 0
    for step in range(1, max_newton + 1):
        neg_loglik, g_eta, (w, S, wc) = data.state(eta)
        if value is None:
            value = neg_loglik / n + 0.5 * lam2 * float(b @ b) + lam1 * float(np.abs(b).sum())
        g = XW.T @ g_eta / n + lam2 * b
        Q = _HessianColumns(data, XW, w, S, wc, lam2)
        support = np.flatnonzero(b)
        rhs = (Q.columns(support) @ b[support] if support.size else 0.0) - g
        u = _lasso_qp(Q, rhs, lam1, b)
        d = u - b
        largest = float(np.max(np.abs(d)))
        if largest <= tol:
            b = u
            break
        decrease = float(g @ d) + lam1 * (np.abs(u).sum() - np.abs(b).sum())  # < 0: a descent direction
        Xd = XW @ d
        # Start the backtracking where no linear predictor moves by more than ETA_STEP: a Newton step of a
        # nearly flat likelihood (lasso with more columns than patients) can be enormous.
        t = min(1.0, ETA_STEP / max(float(np.max(np.abs(Xd))), 1e-300))
        first_t = t
        while True:
            trial_b = b + t * d
            trial_eta = eta + t * Xd
            trial = _objective(data, trial_eta, trial_b, lam1, lam2)
            if trial <= value + 1e-4 * t * decrease or t < 1e-10:
                break
            t *= 0.5
        if trial > value:  # no progress possible at machine precision
            break
        b, eta, value = trial_b, trial_eta, trial
        if t == first_t == 1.0 and largest <= 1e3 * tol:  # Newton converges quadratically: the next step is ~tol^2
            break
    beta[W] = b
    return step


@contextlib.contextmanager
def _blas_threads(n: int = 1):
    """BLAS on ``n`` threads for the fit: its matrices are at most (patients x columns), too small for
    threads to pay, and OpenBLAS's spinning threads slow it several-fold on a loaded machine.
    threadpoolctl is optional (scikit-learn's dependency); without it BLAS keeps its own setting."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _penalties(alpha: float, l1_ratio: float) -> tuple[float, float]:
    if not 0.0 < l1_ratio <= 1.0:
        raise ValueError(f"l1_ratio must be in (0, 1], got {l1_ratio}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return alpha * l1_ratio, alpha * (1.0 - l1_ratio)


def _fit(data: _CoxData, alpha: float, l1_ratio: float, beta: np.ndarray, tol: float) -> np.ndarray:
    lam1, lam2 = _penalties(float(alpha), float(l1_ratio))
    return _solve(data, lam1, lam2, beta, None, tol, MAX_NEWTON)[0]


def _path(data: _CoxData, alphas: np.ndarray, l1_ratio: float, tol: float) -> np.ndarray:
    coefs = np.zeros((data.p, alphas.size))
    beta = np.zeros(data.p)
    previous = None
    for k, alpha in enumerate(alphas):
        lam1, lam2 = _penalties(float(alpha), float(l1_ratio))
        candidates = None
        if previous is not None:  # the sequential strong rule: |grad_j| > 2 lam1 - previous lam1
            _, g_eta, _ = data.state(data.X @ beta)
            grad = data.X.T @ g_eta / data.n + lam2 * beta
            candidates = np.abs(grad) > 2 * lam1 - previous
        beta = _solve(data, lam1, lam2, beta.copy(), candidates, tol, MAX_NEWTON)[0]
        coefs[:, k] = beta
        previous = lam1
    return coefs


def _alpha_path(data: _CoxData, l1_ratio: float, n_alphas: int, alpha_min_ratio: float) -> np.ndarray:
    _penalties(1.0, l1_ratio)
    if n_alphas < 1 or not 0.0 < alpha_min_ratio < 1.0:
        raise ValueError(f"n_alphas must be >= 1 and alpha_min_ratio in (0, 1), got {n_alphas}, {alpha_min_ratio}")
    _, g_eta, _ = data.state(np.zeros(data.n))
    # at b = 0 the KKT conditions hold while |d/db_j (1/n) log PL(0)| <= alpha * l1_ratio for every j
    top = float(np.max(np.abs(data.X.T @ g_eta)) / data.n / l1_ratio)
    if top <= 0:
        raise ValueError("the gradient at zero vanishes: every alpha gives all-zero coefficients")
    return top * np.power(alpha_min_ratio, np.linspace(0.0, 1.0, n_alphas)) if n_alphas > 1 else np.array([top])


def fit_coxnet(X, time, event, alpha: float, l1_ratio: float = 0.5, coef0=None, tol: float = 1e-9) -> np.ndarray:
    """Coefficients (p,) minimising scikit-survival's ``CoxnetSurvivalAnalysis`` objective (with
    ``normalize=False``) on X as given,

        (1/n) * -log PL(b) + alpha * (l1_ratio * ||b||_1 + (1 - l1_ratio) / 2 * ||b||_2^2),

    log PL Breslow's log partial likelihood, n the number of patients. X is neither centred nor scaled
    here: the partial likelihood ignores a shift of X, but the penalty sees its scale, so standardise it
    beforehand. ``coef0`` warm-starts the solver; ``tol`` bounds the last Newton step's largest change of
    a coefficient (the KKT conditions then hold to about tol squared)."""
    with _blas_threads():
        data = _CoxData(X, time, event)
        beta = np.zeros(data.p) if coef0 is None else np.array(coef0, dtype=np.float64).ravel()
        if beta.size != data.p:
            raise ValueError(f"coef0 has {beta.size} values for {data.p} columns")
        return _fit(data, alpha, l1_ratio, beta, tol)


def alpha_path(X, time, event, l1_ratio: float = 0.5, n_alphas: int = 30, alpha_min_ratio: float = 0.01) -> np.ndarray:
    """``n_alphas`` alphas, decreasing and evenly spaced on a log scale from alpha_max, the smallest alpha
    whose solution is all zeros, down to ``alpha_min_ratio * alpha_max``: scikit-survival's path."""
    return _alpha_path(_CoxData(X, time, event), l1_ratio, n_alphas, alpha_min_ratio)


def coxnet_path(X, time, event, alphas: Sequence[float], l1_ratio: float = 0.5, tol: float = 1e-9) -> np.ndarray:
    """Coefficients (p, len(alphas)) along decreasing ``alphas``, each fit warm-started from the previous
    one and its working set seeded by the sequential strong rule (Tibshirani et al. 2012)."""
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if np.any(np.diff(alphas) > 0):
        raise ValueError("alphas must be decreasing (each fit is warm-started from the larger alpha's)")
    with _blas_threads():
        return _path(_CoxData(X, time, event), alphas, l1_ratio, tol)


def log_partial_likelihood(X, time, event, coefs) -> np.ndarray:
    """Breslow's log partial likelihood at each column of ``coefs``, (p,) or (p, k) -> (k,)."""
    data = _CoxData(X, time, event)
    B = np.asarray(coefs, dtype=np.float64).reshape(data.p, -1)
    return _log_pl(data, B)


def _log_pl(data: _CoxData, B: np.ndarray) -> np.ndarray:
    return np.array([-data.neg_loglik(data.X @ B[:, k]) for k in range(B.shape[1])])


@dataclass
class CoxNetCV:
    """The inner cross-validation: per fold and alpha, Verweij and van Houwelingen's cross-validated
    partial likelihood l(b_-k) - l_-k(b_-k) (higher is better)."""

    alphas: np.ndarray  # (A,) decreasing
    fold_scores: np.ndarray  # (K, A)
    l1_ratio: float
    seed: int
    best: int = field(init=False)

    def __post_init__(self):
        self.best = int(np.argmax(self.mean))  # the first of equal maxima: the larger alpha, the sparser model

    @property
    def mean(self) -> np.ndarray:
        return self.fold_scores.mean(axis=0)

    @property
    def se(self) -> np.ndarray:
        k = self.fold_scores.shape[0]
        return self.fold_scores.std(axis=0, ddof=1) / math.sqrt(k)

    @property
    def alpha(self) -> float:
        return float(self.alphas[self.best])

    def to_dict(self) -> dict:
        return dict(alphas=self.alphas.tolist(), mean=self.mean.tolist(), se=self.se.tolist(),
                    chosen_alpha=self.alpha, l1_ratio=self.l1_ratio, seed=self.seed, criterion="cv partial likelihood")


def stratified_folds(event, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each patient: events and censored patients each shuffled by ``seed`` and dealt in
    turn, so every fold gets its share of events."""
    event = np.asarray(event, dtype=bool)
    rng = np.random.default_rng(seed)
    folds = np.empty(event.size, dtype=np.int64)
    offset = 0
    for stratum in (np.flatnonzero(event), np.flatnonzero(~event)):
        stratum = rng.permutation(stratum)
        folds[stratum] = (np.arange(stratum.size) + offset) % k
        offset += stratum.size
    return folds


def choose_alpha(X, time, event, l1_ratio: float = 0.5, alphas=None, n_alphas: int = 30,
                 alpha_min_ratio: float = 0.01, inner_folds: int = 5, seed: int = 0, tol: float = 1e-7) -> CoxNetCV:
    """The alpha of ``alphas`` (default: :func:`alpha_path` on all of X) with the best inner K-fold
    cross-validated partial likelihood; the result holds every fold's score along the path.

    The criterion is Verweij and van Houwelingen's (1993), glmnet's for ``cv.glmnet(family="cox")``: for
    fold k, l(b_-k) - l_-k(b_-k), the log partial likelihood of all patients minus that of the patients
    outside fold k, both at the coefficients fitted without fold k: the fold's patients are scored within
    the full risk sets. We prefer it to a held-out c-index because small folds (40 patients, a handful of
    events) give the c-index few comparable pairs, making it a noisy step function of alpha, and the
    c-index is blind to the scale of the linear predictor, which is what the penalty shrinks. Folds are
    patient-level, stratified by event and fixed by ``seed``. The maximum is taken as is (no
    one-standard-error rule); ties go to the larger alpha.
    """
    X = np.asarray(X, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64).ravel()
    event = np.asarray(event).ravel().astype(bool)
    with _blas_threads():
        data = _CoxData(X, time, event)
        if alphas is None:
            alphas = _alpha_path(data, l1_ratio, n_alphas, alpha_min_ratio)
        alphas = np.asarray(alphas, dtype=np.float64).ravel()
        if np.any(np.diff(alphas) > 0):
            raise ValueError("alphas must be decreasing (each fit is warm-started from the larger alpha's)")
        if inner_folds < 2 or event.sum() < inner_folds:
            raise ValueError(f"{int(event.sum())} events cannot be spread over {inner_folds} inner folds (>= 2)")
        folds = stratified_folds(event, inner_folds, seed)
        scores = np.zeros((inner_folds, alphas.size))
        for k in range(inner_folds):
            inside = folds != k
            fold_data = _CoxData(X[inside], time[inside], event[inside])
            coefs = _path(fold_data, alphas, l1_ratio, tol)
            scores[k] = _log_pl(data, coefs) - _log_pl(fold_data, coefs)
    return CoxNetCV(alphas, scores, float(l1_ratio), int(seed))


# ----------------------------------------------------------------------------------------------------
# The cohort side

# slide_id -> the slide's mean patch feature (float64), per bag store: computed once, reused by every fold
_SLIDE_MEANS: "weakref.WeakKeyDictionary[object, dict[str, np.ndarray]]" = weakref.WeakKeyDictionary()


def _slide_mean(bags, slide_id: str) -> np.ndarray:
    cache = _SLIDE_MEANS.setdefault(bags, {})
    if slide_id not in cache:
        features = bags.get(slide_id).features
        if len(features) == 0:
            raise ValueError(f"slide {slide_id} has no patches")
        cache[slide_id] = np.asarray(features).mean(axis=0, dtype=np.float64)
    return cache[slide_id]


def patient_design(cohort, idx: Sequence[int], cfg: CoxNetConfig) -> np.ndarray:
    """Raw (unstandardised) design rows for patients ``idx``: [image part ; genes] as ``cfg.modality`` says.

    A patient's image part is the mean over its slides of each slide's mean patch feature. At inference a
    patient's risk is the mean of its slides' risks (training.predict_patients), and a slide's risk is
    affine in its mean feature, so that mean of risks is exactly the linear model on this patient mean:
    the fit sees each patient as inference scores it.
    """
    idx = list(idx)
    parts = []
    if cfg.uses_image:
        if cohort.bags is None:
            raise ValueError("coxnet with modality image or both reads patch features, and this cohort has none")
        rows = []
        for i in idx:
            slides = cohort.patients[i].slide_ids
            rows.append(np.mean([_slide_mean(cohort.bags, s) for s in slides], axis=0))
        image = np.stack(rows)
        if image.shape[1] != cfg.feature_dim:
            raise ValueError(f"the bags hold {image.shape[1]}-d features, the configuration says {cfg.feature_dim}")
        parts.append(image)
    if cfg.uses_genes:
        genes = np.asarray(cohort.genes, dtype=np.float64)[idx]
        if genes.shape[1] != cfg.n_genes:
            raise ValueError(f"the cohort has {genes.shape[1]} genes, the configuration says {cfg.n_genes}")
        parts.append(genes)
    return np.concatenate(parts, axis=1)


def _scaler(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation, as training's gene scaler (constant columns: scale 1)."""
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale < 1e-8] = 1.0
    return mean, scale


def fit_coxnet_model(cohort, train_idx: Sequence[int], cfg: CoxNetConfig, seed: int = 0, clinical=None):
    """A fitted :class:`CoxNet` (eval mode) on the patients ``train_idx`` of ``cohort``.

    With ``clinical`` (a :class:`~histosurv.data.covariates.ClinicalSpec`) the covariates, encoded as the
    graph encodes them, are columns of the same design, penalised like the others; the result is then a
    :class:`~.clinical.WithClinical` whose linear term holds their coefficients.

    Standardises the design on those patients (the scalers become the model's buffers), takes
    ``cfg.fixed_alpha`` or chooses alpha by inner cross-validation on those patients only (folds fixed by
    ``seed``), and fits the path on all of them. ``model.chosen_alpha`` records the penalty and
    ``model.inner_cv`` the cross-validation (None with a fixed alpha).
    """
    from .clinical import WithClinical

    train_idx = list(train_idx)
    X = patient_design(cohort, train_idx, cfg)
    encoded = None
    if clinical is not None:
        wrapped = WithClinical(CoxNet(cfg), clinical)
        values = torch.from_numpy(cohort.clinical_values(clinical)[train_idx])
        with torch.no_grad():
            encoded = wrapped.clinical(values).double().numpy()
        X = np.concatenate([X, encoded], axis=1)
    if not np.isfinite(X).all():
        raise ValueError("coxnet needs finite features and genes for every training patient")
    time, event = cohort.times_events(train_idx)
    mean, scale = _scaler(X)
    Xs = (X - mean) / scale
    if cfg.fixed_alpha > 0:
        cv = None
        alpha = cfg.fixed_alpha
        coef = fit_coxnet(Xs, time, event, alpha, cfg.l1_ratio)
    else:
        # NOTE: the inner folds reuse the scaling fitted on all training patients, as glmnet standardises
        # once before cv.glmnet; the outer validation and test patients take no part in either.
        cv = choose_alpha(Xs, time, event, cfg.l1_ratio, n_alphas=cfg.n_alphas, alpha_min_ratio=cfg.alpha_min_ratio,
                          inner_folds=cfg.inner_folds, seed=seed)
        alpha = cv.alpha
        # the path down to the chosen alpha: warm starts make this faster than one cold fit
        coef = coxnet_path(Xs, time, event, cv.alphas[: cv.best + 1], cfg.l1_ratio)[:, -1]
    model = CoxNet(cfg)
    d = cfg.feature_dim if cfg.uses_image else 0
    n = cfg.n_inputs
    with torch.no_grad():
        if cfg.uses_image:
            model.set_feature_scaler(torch.from_numpy(mean[:d]).float(), torch.from_numpy(scale[:d]).float())
        if cfg.uses_genes:
            model.set_gene_scaler(torch.from_numpy(mean[d:n]).float(), torch.from_numpy(scale[d:n]).float())
        model.classifier.weight.copy_(torch.from_numpy(coef[:n]).float()[None])
        if encoded is not None:
            # w . (e - mean) / scale as the clinical term's weight and bias on the encoded covariates
            w = coef[n:] / scale[n:]
            wrapped.base = model
            wrapped.clinical_head.weight.copy_(torch.from_numpy(w).float()[None])
            wrapped.clinical_head.bias.fill_(float(-(w * mean[n:]).sum()))
            model = wrapped
    model.chosen_alpha = float(alpha)
    model.inner_cv = cv
    return model.eval()
