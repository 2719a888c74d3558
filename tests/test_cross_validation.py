"""K-fold cross-validation: patient-level folds stratified by event and time, deterministic, the
coxnet baseline on the same folds, a run directory whose folds and refit export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from histosurv.cli import main
from histosurv.data.cohort import Cohort
from histosurv.data.tables import Patient
from histosurv.export.concordance import concordance_index
from histosurv.export.cross_validation import assign_folds, cross_validate

from .conftest import TINY_TRAIN, tiny_model_config


def _cohort(n: int, seed: int, event_rate: float = 0.7) -> Cohort:
    """Outcomes only (fold assignment reads nothing else), with tied times and patients of two slides."""
    rng = np.random.default_rng(seed)
    times = np.round(rng.exponential(30, n), 0)
    events = rng.random(n) < event_rate
    patients = [Patient(f"c{i}", (f"c{i}-1",) + ((f"c{i}-2",) if i % 4 == 0 else ()), float(t), bool(e))
                for i, (t, e) in enumerate(zip(times, events))]
    return Cohort(patients, np.zeros((n, 1), np.float32), ["g"], None)


@pytest.mark.parametrize("n,k,seed", [(60, 5, 0), (157, 5, 1), (1000, 5, 2), (41, 3, 3), (240, 10, 4)])
def test_folds_are_patient_level_balanced_and_stratified_by_event_and_time(n, k, seed):
    cohort = _cohort(n, seed)
    folds = assign_folds(cohort, k, seed)
    assert folds.shape == (n,) and set(folds) == set(range(k))  # every patient in exactly one fold
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    t, e = cohort.times_events(range(n))
    per_fold_events = np.bincount(folds[e], minlength=k)
    assert per_fold_events.max() - per_fold_events.min() <= 1
    # within each stratum, patients sorted by time: every run of k spreads over k different folds
    for stratum in (np.flatnonzero(e), np.flatnonzero(~e)):
        ordered = folds[stratum[np.argsort(t[stratum], kind="stable")]]
        for start in range(0, ordered.size - ordered.size % k, k):
            assert len(set(ordered[start : start + k])) == k
    np.testing.assert_array_equal(assign_folds(cohort, k, seed), folds)  # deterministic from the seed
    assert not np.array_equal(assign_folds(cohort, k, seed + 1), folds)


def test_too_few_events_for_the_folds_is_refused():
    cohort = _cohort(30, 0, event_rate=0.2)
    n_events = int(cohort.times_events(range(30))[1].sum())
    with pytest.raises(ValueError, match=f"need at least 10 events.*{n_events} events in 30 patients"):
        assign_folds(cohort, 5, 0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(cohort, 1, 0)


@pytest.fixture(scope="module")
def tiny_cv(tiny_cohort):
    cfg = dataclasses.replace(TINY_TRAIN, epochs=1, baseline=True)
    return cross_validate(tiny_cohort, "ammasurv", tiny_model_config(), cfg, k=3, refit=True)


def test_each_fold_trains_without_its_test_patients_and_scores_them_once(tiny_cv, tiny_cohort):
    cv, n = tiny_cv, len(tiny_cohort.patients)
    seen = []
    for fold in cv.folds:
        s = fold.result.splits
        test = set(s.test)
        assert test == set(np.flatnonzero(cv.folds_of == fold.fold))
        assert not test & (set(s.train) | set(s.val))
        assert fold.baseline.splits == s  # coxnet on exactly the same patients
        # the fold's c-index is the c-index of its out-of-fold risks
        idx = np.flatnonzero(cv.folds_of == fold.fold)
        c = concordance_index(*tiny_cohort.times_events(idx), cv.oof_risks[idx]).c_index
        assert c == pytest.approx(fold.result.test_c_index, abs=1e-12)
        seen += list(test)
    assert sorted(seen) == list(range(n))
    assert np.isfinite(cv.oof_risks).all() and np.isfinite(cv.oof_baseline).all()
    summary = cv.summary(tiny_cohort)
    c = [f.result.test_c_index for f in cv.folds]
    assert summary["model"]["c_index_mean"] == pytest.approx(np.mean(c))
    assert summary["model"]["c_index_sd"] == pytest.approx(np.std(c, ddof=1))
    assert summary["coxnet"]["c_index_folds"] == pytest.approx([f.baseline.test_c_index for f in cv.folds])
    assert cv.refit is not None and set(cv.refit.splits.train) == set(range(n)) and not cv.refit.splits.test


def test_cli_cross_validates_writes_folds_and_exports_a_fold_or_the_refit(tiny_cohort_dir, tmp_path, capsys):
    from .test_cli import TINY_MODEL_FLAGS

    d = tiny_cohort_dir
    run, repo = tmp_path / "run", tmp_path / "repo"
    data = ["--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"), "--features-dir", str(d / "features")]
    flags = ["--epochs", "1", "--batch-size", "16", "--patches-per-slide", "8", *TINY_MODEL_FLAGS]
    assert main(["train", *data, "--out", str(run), "--folds", "3", *flags]) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation: ammasurv" in out and "vs coxnet" in out and "on the same folds" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["folds"] == 3 and len(metrics["model"]["c_index_folds"]) == 3 and "coxnet" in metrics
    preds = pd.read_csv(run / "test_predictions.csv")
    assert len(preds) == 60 and set(preds["fold"]) == {0, 1, 2} and preds["risk"].notna().all()
    assert (pd.read_csv(run / "splits.csv")["fold"].to_numpy() == preds["fold"].to_numpy()).all()
    for k in range(3):
        fold_metrics = json.loads((run / "folds" / str(k) / "metrics.json").read_text())
        assert fold_metrics["test_c_index"] == pytest.approx(metrics["model"]["c_index_folds"][k])
        assert json.loads((run / "folds" / str(k) / "baseline.json").read_text())["architecture"] == "coxnet"
    config = json.loads((run / "config.json").read_text())
    assert config["cross_validation"] == {"folds": 3, "refit": True}
    assert config["clinical_columns"]["time"] == "survival_months"

    assert main(["export", "--run", str(run), "--repo", str(repo), "--name", "refit", "--artifacts", "none"]) == 0
    assert main(["export", "--run", str(run), "--fold", "2", "--repo", str(repo), "--name", "fold2", "--artifacts", "none"]) == 0
    manifest = json.loads((repo / "fold2" / "histosurv.json").read_text())
    assert manifest["versions"]["1"]["training"]["run"].endswith("folds/2")
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--fold", "7", "--repo", str(repo), "--artifacts", "none"]) == 2
    assert "no fold 7; the run has folds 0, 1, 2" in capsys.readouterr().err

    # without a refit there is no model at the top: export says to name a fold
    bare = tmp_path / "bare"
    assert main(["train", *data, "--out", str(bare), "--folds", "3", "--no-refit", "--no-baseline", *flags]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(bare), "--repo", str(repo), "--artifacts", "none"]) == 2
    assert "no model refitted on every patient" in capsys.readouterr().err


def test_too_many_folds_for_the_cohort_is_a_clear_cli_error(tiny_cohort_dir, tmp_path, capsys):
    d = tiny_cohort_dir
    args = ["train", "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"),
            "--features-dir", str(d / "features"), "--out", str(tmp_path / "r"), "--folds", "30"]
    assert main(args) == 2
    assert "--folds 30:" in capsys.readouterr().err
