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
from histosurv.export.training import (
    TrainConfig,
    evaluate,
    predict_patients,
    split_patients,
    train,
    warmup_cosine,
)

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
    cfg = TrainConfig(seed=3, val_fraction=0.2, test_fraction=0.2, stop="val_loss")
    splits = split_patients(tiny_cohort, cfg)
    train_idx, val, test = map(set, (splits.train, splits.val, splits.test))
    assert not (train_idx & val or train_idx & test or val & test)
    assert train_idx | val | test == set(range(len(tiny_cohort.patients)))
    _, events = tiny_cohort.times_events(range(len(tiny_cohort.patients)))
    for part in (val, test):
        share = events[list(part)].mean()
        assert abs(share - events.mean()) < 0.15
    assert split_patients(tiny_cohort, cfg) == splits
    # a fixed schedule needs no validation patients: they train
    fixed = split_patients(tiny_cohort, dataclasses.replace(cfg, stop="fixed"))
    assert fixed.val == () and fixed.test == splits.test


def test_val_loss_rule_keeps_the_epoch_with_the_lowest_smoothed_validation_loss(tiny_cohort):
    cfg = dataclasses.replace(TINY_TRAIN, epochs=5, patience=5, stop="val_loss", smoothing=0.5)
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), cfg)
    raw = [h["val_loss"] for h in result.history]
    smoothed = [raw[0]]
    for x in raw[1:]:
        smoothed.append(0.5 * smoothed[-1] + 0.5 * x)
    np.testing.assert_allclose([h["val_loss_smoothed"] for h in result.history], smoothed, rtol=1e-12)
    assert result.best_epoch == int(np.argmin(smoothed))  # first minimum: ties keep the earlier epoch
    assert all("test" not in key for h in result.history for key in h)  # the test split never steers training
    # the returned model is the chosen epoch's: its validation loss reproduces
    loss, c = evaluate(result.model, tiny_cohort, result.splits.val, result.time_bins)
    assert loss == pytest.approx(raw[result.best_epoch], rel=1e-6)
    assert c == pytest.approx(result.val_c_index, abs=1e-12)


def test_fixed_schedule_keeps_the_last_epoch_and_decays_the_learning_rate_to_zero(tiny_cohort):
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), dataclasses.replace(TINY_TRAIN, epochs=4))
    assert result.best_epoch == 3 and len(result.history) == 4
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert result.history[1]["lr"] > result.history[2]["lr"] > 0


def test_warmup_then_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine(opt, total_steps=20, warmup=0.2)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # four warm-up steps, rising to the peak
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then only down
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # zero after the last step


def test_gradient_accumulation_counts_optimiser_steps(tiny_cohort):
    """Accumulating two batches per step halves the optimiser steps of an epoch: the schedule, counted
    in steps, still ends at zero on the last one."""
    cfg = dataclasses.replace(TINY_TRAIN, epochs=2, accumulate=2)
    result = train(tiny_cohort, "ammasurv", tiny_model_config(), cfg)
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite([h["train_loss"] for h in result.history]).all()


def test_early_stopping_stops(tiny_cohort):
    cfg = dataclasses.replace(TINY_TRAIN, epochs=30, patience=1, lr=0.0, stop="val_loss")  # lr 0: nothing can improve
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
    assert set(splits["split"]) == {"train", "test"}  # the fixed schedule needs no validation patients
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
    with pytest.raises(ValueError, match="stop must be one of"):
        TrainConfig(stop="c_index")
