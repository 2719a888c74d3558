"""K-fold cross-validation at the patient level, with the linear Cox baseline on the same folds.

The survival papers this project serves (MCAT, PORPOISE, MoME, G-HANet, and AMMASurv's own
follow-ups) report the c-index of 5-fold cross-validation as mean and standard deviation, because a
single split of 150-1,000 patients moves by several hundredths from one seed to the next. Here:

* folds are assigned per patient (a patient's slides never straddle two folds), stratified by event
  status and by time (patients sorted by time within each stratum, each run of K consecutive
  patients spread over the K folds), deterministic from the seed;
* every fold trains on the other K-1 folds with the same recipe and scores its own patients once;
  the coxnet baseline is fitted on exactly the same patients, so "model vs coxnet" is paired;
* the summary is the folds' mean +- sample standard deviation, and the pooled c-index of the
  out-of-fold risks (one c-index over every patient; it mixes the folds' risk scales, so it is a
  companion to the mean, not a substitute);
* the model to export is a refit on every patient with the recipe's schedule, or any one fold's
  model (``<run>/folds/<k>``), whose test patients were never seen.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..data.cohort import Cohort
from .concordance import concordance_index
from .models import build_model
from .training import Splits, TrainConfig, TrainResult, inner_validation, reads_patches, train

__all__ = ["assign_folds", "cross_validate", "CVResult", "FoldResult", "baseline_config", "min_events_per_fold"]

min_events_per_fold = 2  # a test fold needs comparable pairs, and each needs an event


@dataclass
class FoldResult:
    fold: int
    result: TrainResult
    baseline: TrainResult | None = None


@dataclass
class CVResult:
    architecture: str
    k: int
    folds_of: np.ndarray  # (P,) fold of each patient
    folds: list[FoldResult] = field(default_factory=list)
    oof_risks: np.ndarray | None = None  # (P,) each patient's risk from the fold model that never saw it
    oof_baseline: np.ndarray | None = None
    refit: TrainResult | None = None
    seconds: float = 0.0

    def c_indices(self, baseline: bool = False) -> np.ndarray:
        return np.array([(f.baseline if baseline else f.result).test_c_index for f in self.folds])

    def summary(self, cohort: Cohort) -> dict:
        t, e = cohort.times_events(range(len(cohort.patients)))
        out = {"folds": self.k, "architecture": self.architecture}
        for name, risks, base in (("model", self.oof_risks, False), ("coxnet", self.oof_baseline, True)):
            if risks is None:
                continue
            c = self.c_indices(base)
            out[name] = {
                "c_index_mean": float(c.mean()),
                "c_index_sd": float(c.std(ddof=1)) if c.size > 1 else 0.0,
                "c_index_pooled": concordance_index(t, e, risks).c_index,
                "c_index_folds": [float(x) for x in c],
            }
        out["seconds"] = round(self.seconds, 2)
        return out


def assign_folds(cohort: Cohort, k: int, seed: int) -> np.ndarray:
    """(P,) fold index of each patient, stratified by event and time, the same for the same seed."""
    n = len(cohort.patients)
    t, e = cohort.times_events(range(n))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if e.sum() < min_events_per_fold * k or n < 3 * k:
        raise ValueError(
            f"{k} folds need at least {min_events_per_fold * k} events and {3 * k} patients; the cohort has "
            f"{int(e.sum())} events in {n} patients: use fewer folds or the single split"
        )
    rng = np.random.default_rng([seed, 11])
    folds = np.full(n, -1)
    counts = np.zeros(k, int)
    for stratum in (np.flatnonzero(e), np.flatnonzero(~e)):
        order = stratum[np.argsort(t[stratum], kind="stable")]
        for start in range(0, order.size, k):
            block = order[start : start + k]
            if block.size == k:
                labels = rng.permutation(k)
            else:  # the remainder goes to the smallest folds, ties broken at random
                labels = np.lexsort((rng.random(k), counts))[: block.size]
            folds[block] = labels
            np.add.at(counts, labels, 1)
    return folds


def baseline_config(architecture: str, model_config, cohort: Cohort):
    """coxnet on the same inputs as the deep model: image-only models get an image-only baseline."""
    from .models.coxnet import CoxNetConfig

    model = build_model(architecture, model_config)
    image, genes = reads_patches(model), "genes" in model.input_names
    if architecture == "ghanet":  # learns from genes in training, reads only the slide at inference
        genes = False
    modality = "both" if image and genes else ("image" if image else "genes")
    return CoxNetConfig(n_genes=len(cohort.gene_names), feature_dim=cohort.feature_dim or 1, modality=modality)


def cross_validate(
    cohort: Cohort,
    architecture: str,
    model_config,
    cfg: TrainConfig,
    k: int = 5,
    refit: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> CVResult:
    started = time.perf_counter()
    folds_of = assign_folds(cohort, k, cfg.seed)
    n = len(cohort.patients)
    cv = CVResult(architecture, k, folds_of, oof_risks=np.full(n, np.nan))
    base_cfg = None
    if cfg.baseline and architecture != "coxnet":
        base_cfg = baseline_config(architecture, model_config, cohort)
        cv.oof_baseline = np.full(n, np.nan)
    quiet = lambda _: None  # noqa: E731 -- per-epoch lines of K trainings drown the summary
    for f in range(k):
        test = tuple(np.flatnonzero(folds_of == f).tolist())
        fit, val = inner_validation(cohort, np.flatnonzero(folds_of != f), cfg)
        splits = Splits(fit, val, test)
        result = train(cohort, architecture, model_config, cfg, log=quiet, splits=splits)
        cv.oof_risks[list(test)] = result.test_risks
        fold = FoldResult(f, result)
        line = f"fold {f + 1}/{k}: {len(fit)} train / {len(val)} val / {len(test)} test patients, " \
               f"{architecture} c-index {result.test_c_index:.4f}"
        if base_cfg is not None:
            fold.baseline = train(cohort, "coxnet", base_cfg, cfg, log=quiet, splits=splits)
            cv.oof_baseline[list(test)] = fold.baseline.test_risks
            line += f", coxnet {fold.baseline.test_c_index:.4f}"
        cv.folds.append(fold)
        log(line + f" ({result.seconds:.1f} s)")
    if refit:
        cv.refit = refit_all(cohort, architecture, model_config, cfg, cv, log)
    cv.seconds = time.perf_counter() - started
    return cv


def refit_epochs(cfg: TrainConfig, cv: CVResult) -> int:
    """The schedule of the refit: the recipe's epochs, or with val_loss the median of the folds' chosen
    epochs, so that the refit needs no validation patients of its own."""
    if not cfg.uses_validation:
        return cfg.epochs
    return int(np.median([f.result.best_epoch for f in cv.folds])) + 1


def refit_all(cohort: Cohort, architecture: str, model_config, cfg: TrainConfig, cv: CVResult, log) -> TrainResult:
    epochs = refit_epochs(cfg, cv)
    refit_cfg = dataclasses.replace(cfg, epochs=epochs, stop="fixed")
    everyone = tuple(range(len(cohort.patients)))
    log(f"refit on all {len(everyone)} patients for {epochs} epochs")
    return train(cohort, architecture, model_config, refit_cfg, log=lambda _: None, splits=Splits(everyone, (), ()))
