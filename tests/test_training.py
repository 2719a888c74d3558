"""The trainer: reproducible, patient-level splits, model selection on validation only."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from histosurv.export.concordance import concordance_index
from histosurv.export.run import load_run
from histosurv.export.training import TrainConfig, predict_patients, split_patients, train

from .conftest import TINY_TRAIN, tiny_model_config


def test_same_seed_gives_identical_weights_and_history(tiny_cohort):
    a = train(tiny_cohort, "ammasurv", tiny_model_config(), TINY_TRAIN)
    b = train(tiny_cohort, "ammasurv", tiny_model_config(), TINY_TRAIN)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train(tiny_cohort, "ammasurv", tiny_model_config(), dataclasses.replace(TINY_TRAIN, seed=1))
    assert not torch.equal(a.model.head[0].weight, c.model.head[0].weight)


def test_splits_are_disjoint_patient_level_and_stratified(tiny_cohort):
    splits = split_patients(tiny_cohort, TrainConfig(seed=3, val_fraction=0.2, test_fraction=0.2))
    train_idx, val, test = map(set, (splits.train, splits.val, splits.test))
    assert not (train_idx & val or train_idx & test or val & test)
    assert train_idx | val | test == set(range(len(tiny_cohort.patients)))
    _, events = tiny_cohort.times_events(range(len(tiny_cohort.patients)))
    for part in (val, test):
        share = events[list(part)].mean()
        assert abs(share - events.mean()) < 0.15
    assert split_patients(tiny_cohort, TrainConfig(seed=3, val_fraction=0.2, test_fraction=0.2)) == splits


def test_best_epoch_is_chosen_on_validation_and_test_is_scored_once(tiny_cohort):
    cfg = dataclasses.replace(TINY_TRAIN, max_epochs=5, patience=5)
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), cfg)
    val = [h["val_c_index"] for h in result.history]
    assert result.best_epoch == int(np.argmax(val))  # first maximum: ties keep the earlier epoch
    assert result.val_c_index == max(val)
    assert all("test" not in key for h in result.history for key in h)  # the test split never steers training
    # the returned model is the best epoch's: its validation c-index reproduces
    again = predict_patients(result.model, tiny_cohort, result.splits.val)
    assert concordance_index(*tiny_cohort.times_events(result.splits.val), again).c_index == pytest.approx(
        result.val_c_index, abs=1e-12
    )


def test_early_stopping_stops(tiny_cohort):
    cfg = dataclasses.replace(TINY_TRAIN, max_epochs=30, patience=1, lr=0.0)  # lr 0: nothing can improve
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), cfg)
    assert len(result.history) == 2 and result.best_epoch == 0


def test_discrete_time_head_trains(tiny_cohort):
    cfg = tiny_model_config(survival_head="discrete", n_bins=4)
    result = train(tiny_cohort, "ammasurv", cfg, TINY_TRAIN)
    assert result.time_bins is not None and len(result.time_bins) == 5
    assert np.isfinite([h["train_loss"] for h in result.history]).all()


def test_run_directory_round_trips(tiny_run, tiny_cohort):
    model, config = load_run(tiny_run)
    assert config["architecture"] == "ammasurv" and config["genes"] == tiny_cohort.gene_names
    assert config["trained_on"]["feature_dim"] == 32 and config["trained_on"]["architecture"] == "synthetic"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    splits = pd.read_csv(tiny_run / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert metrics["patients"]["test"] == (splits["split"] == "test").sum()
    preds = pd.read_csv(tiny_run / "test_predictions.csv")
    held_out = [i for i, p in enumerate(tiny_cohort.patients) if p.case_id in set(preds["case_id"])]
    np.testing.assert_allclose(predict_patients(model, tiny_cohort, held_out), preds["risk"], rtol=1e-6)
    c = concordance_index(preds["survival_months"], preds["censorship"] == 0, preds["risk"]).c_index
    assert c == pytest.approx(metrics["test_c_index"], abs=1e-12)


def test_bad_training_settings_are_refused():
    with pytest.raises(ValueError, match="at least 10%"):
        TrainConfig(val_fraction=0.5, test_fraction=0.45)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
