"""A training run on disk: everything ``histosurv export`` needs, and the record of how it was made.

    run/
      config.json          architecture + hyper-parameters, training settings, gene list, encoder facts
      model.safetensors    weights at the best validation epoch (gene scaler included, as buffers)
      metrics.json         best epoch, validation and test c-index, split sizes, seconds
      history.csv          one row per epoch
      splits.csv           case_id -> train / val / test
      test_predictions.csv held-out risks with outcomes
      train_predictions.csv the training patients' risks with outcomes (export fits S(t) and risk groups on them)
      baseline.json        coxnet's c-index on the same patients (when the baseline was fitted)

A cross-validated run (``histosurv train --folds K``) has the same files for the model refitted on
every patient (its ``test_predictions.csv`` are the out-of-fold risks, its ``splits.csv`` the folds,
its ``metrics.json`` the cross-validated summary), and one complete run per fold in ``folds/<k>/``,
each exportable on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..data.atomic import atomic_dir
from ..data.cohort import Cohort, training_encoder
from ..data.typed_json import to_json_dict
from ..errors import InputError, MissingInputError
from .models import build_model
from .models.clinical import clinical_spec_of
from .survival_reference import TRAIN_PREDICTIONS
from .training import TrainResult, predict_patients

__all__ = ["save_run", "save_cv_run", "run_to_export", "load_run", "load_weights", "RUN_CONFIG", "RUN_WEIGHTS"]

RUN_CONFIG, RUN_WEIGHTS = "config.json", "model.safetensors"


def save_run(
    out_dir: str | os.PathLike,
    result: TrainResult,
    cohort: Cohort,
    overwrite: bool = False,
    extra_config: dict | None = None,
    baseline: TrainResult | None = None,
) -> Path:
    """``extra_config``: more facts of how the run was made (the clinical column mapping), kept in config.json."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_run(tmp, _config(result, cohort, extra_config), result, cohort, baseline)
    return Path(out_dir)


def _config(result: TrainResult, cohort: Cohort, extra_config: dict | None) -> dict:
    encoder = cohort.encoder
    if encoder is None and cohort.bags is not None:  # a cohort loaded without checking its bags
        encoder, _ = training_encoder(cohort.bags, [s for p in cohort.patients for s in p.slide_ids])
    return {
        "histosurv_version": __version__,
        "architecture": result.architecture,
        "model": asdict(result.model_config),
        "train": asdict(result.train_config),
        "genes": cohort.gene_names,
        # the encoder the training bags came from: export copies it into the manifest (trained_on)
        "trained_on": to_json_dict(encoder) if encoder is not None else None,
        "time_bins": None if result.time_bins is None else result.time_bins.tolist(),
        # the clinical covariates the model takes, their encoding fitted on its training patients
        "clinical": to_json_dict(spec) if (spec := clinical_spec_of(result.model)) is not None else None,
        **(extra_config or {}),
    }


def _write_run(tmp: Path, config: dict, result: TrainResult, cohort: Cohort, baseline: TrainResult | None) -> None:
    names = result.splits.name_of()
    (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(tmp / RUN_WEIGHTS))
    (tmp / "metrics.json").write_text(json.dumps(_metrics(result), indent=1))
    pd.DataFrame(result.history).to_csv(tmp / "history.csv", index=False)
    pd.DataFrame(
        {"case_id": [p.case_id for p in cohort.patients], "split": [names[i] for i in range(len(cohort.patients))]}
    ).to_csv(tmp / "splits.csv", index=False)
    if result.test_risks is not None:
        t, e = cohort.times_events(result.splits.test)
        pd.DataFrame(
            {
                "case_id": [cohort.patients[i].case_id for i in result.splits.test],
                "risk": result.test_risks,
                "survival_months": t,
                "censorship": (~e).astype(int),
            }
        ).to_csv(tmp / "test_predictions.csv", index=False)
    # the training patients' risks: export fits the survival curves' baseline and the risk-group cut-offs on them
    train = list(result.splits.train)
    t, e = cohort.times_events(train)
    pd.DataFrame(
        {
            "case_id": [cohort.patients[i].case_id for i in train],
            "risk": predict_patients(result.model, cohort, train),
            "survival_months": t,
            "censorship": (~e).astype(int),
        }
    ).to_csv(tmp / TRAIN_PREDICTIONS, index=False)
    if baseline is not None:
        (tmp / "baseline.json").write_text(json.dumps(_metrics(baseline) | {"architecture": "coxnet",
                                                                           "model": asdict(baseline.model_config)}, indent=1))


def save_cv_run(
    out_dir: str | os.PathLike,
    cv,
    cohort: Cohort,
    overwrite: bool = False,
    extra_config: dict | None = None,
) -> Path:
    """A cross-validated run: the refit model at the top (when there is one), each fold in folds/<k>."""
    folds_of = cv.folds_of
    summary = cv.summary(cohort)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for fold in cv.folds:
            fold_dir = tmp / "folds" / str(fold.fold)
            fold_dir.mkdir(parents=True)
            _write_run(fold_dir, _config(fold.result, cohort, extra_config), fold.result, cohort, fold.baseline)
        head = cv.refit or cv.folds[0].result
        config = _config(head, cohort, extra_config) | {"cross_validation": {"folds": cv.k, "refit": cv.refit is not None}}
        if cv.refit is not None:
            _write_run(tmp, config, cv.refit, cohort, None)
        else:  # no model at the top: export names a fold
            (tmp / RUN_CONFIG).write_text(json.dumps(config, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(summary | ({"refit": _metrics(cv.refit)} if cv.refit else {}), indent=1))
        pd.DataFrame({"case_id": [p.case_id for p in cohort.patients], "fold": folds_of}).to_csv(tmp / "splits.csv", index=False)
        t, e = cohort.times_events(range(len(cohort.patients)))
        oof = {"case_id": [p.case_id for p in cohort.patients], "fold": folds_of, "risk": cv.oof_risks}
        if cv.oof_baseline is not None:
            oof["coxnet_risk"] = cv.oof_baseline
        pd.DataFrame(oof | {"survival_months": t, "censorship": (~e).astype(int)}).to_csv(
            tmp / "test_predictions.csv", index=False
        )
    return Path(out_dir)


def _metrics(result: TrainResult) -> dict:
    penalty = getattr(result.model, "chosen_alpha", None)  # coxnet: its penalty, and how it was chosen
    inner = getattr(result.model, "inner_cv", None)
    extra = {"penalty": penalty, "inner_cv": inner.to_dict() if inner is not None else None} if penalty is not None else {}
    return extra | {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "val_c_index": result.val_c_index,
        "test_c_index": result.test_c_index,
        "patients": {k: len(getattr(result.splits, k)) for k in ("train", "val", "test")},
        "seconds": round(result.seconds, 2),
    }


def run_to_export(run_dir: str | os.PathLike, fold: int | None = None) -> Path:
    """The directory holding the model to export: the run itself, or one fold of a cross-validated run."""
    run_dir = Path(run_dir)
    folds = sorted(int(p.name) for p in (run_dir / "folds").glob("*") if p.name.isdigit())
    if fold is not None:
        if not folds:
            raise InputError(f"{run_dir}: --fold {fold} given, but this run was not cross-validated")
        if fold not in folds:
            raise InputError(f"{run_dir}: no fold {fold}; the run has folds {', '.join(map(str, folds))}")
        return run_dir / "folds" / str(fold)
    if folds and not (run_dir / RUN_WEIGHTS).is_file():
        raise InputError(
            f"{run_dir}: this cross-validated run has no model refitted on every patient (trained with --no-refit); "
            f"export one of its folds: --fold {folds[0]} .. {folds[-1]}"
        )
    return run_dir


def load_run(run_dir: str | os.PathLike, attention_impl: str = "sdpa") -> tuple[torch.nn.Module, dict]:
    """Rebuilds the trained model (eval mode) and returns it with the run's config."""
    run_dir = Path(run_dir)
    for name in (RUN_CONFIG, RUN_WEIGHTS):
        if not (run_dir / name).is_file():
            raise MissingInputError(f"{run_dir}: no {name}; is this the output directory of 'histosurv train'?")
    try:
        config = json.loads((run_dir / RUN_CONFIG).read_text())
        model = build_model(config["architecture"], config["model"], attention_impl=attention_impl,
                            clinical=config.get("clinical"))
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise InputError(f"{run_dir / RUN_CONFIG}: unusable run configuration ({e})") from e
    load_weights(model, run_dir / RUN_WEIGHTS)
    return model.eval(), config


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Loads a safetensors state_dict, refusing missing, unexpected or mis-shaped tensors by name."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise InputError(f"{path}: unreadable weights file ({e})") from e
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise InputError(
            f"{path}: weights do not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict(state)
