"""The genes-only SNN trained by ``histosurv train`` on a real gene-expression cohort, against a
penalised Cox model on the same folds.

scikit-survival ships the breast-cancer cohort of Desmedt et al. (198 patients, 51 events, 76
microarray probes, time to distant metastasis). ``histosurv train`` with its defaults cross-validates
5 folds and fits coxnet (elastic-net Cox, penalty by inner cross-validation) on the same folds. The
SNN's mean c-index must be no worse than 0.03 below coxnet's, and histosurv's c-index of every fold's
held-out risks must equal scikit-survival's on the same risks.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sksurv")

from sksurv.datasets import load_breast_cancer  # noqa: E402
from sksurv.metrics import concordance_index_censored  # noqa: E402

from histosurv.cli import main  # noqa: E402

DAYS_PER_MONTH = 30.4375
MARGIN = 0.03


@pytest.fixture(scope="module")
def cohort_csvs(tmp_path_factory):
    X, y = load_breast_cancer()
    genes = X[[c for c in X.columns if c.startswith("X")]].astype(float)  # the probes; not age, er, grade, size
    ids = [f"bc{i:03d}" for i in range(len(X))]
    d = tmp_path_factory.mktemp("breast_cancer")
    # as people have it: time in days and an event column, read through the column mapping
    clinical = pd.DataFrame({"case_id": ids, "t.tdm": y["t.tdm"], "e.tdm": y["e.tdm"].astype(int)})
    clinical.to_csv(d / "clinical.csv", index=False)  # one row per case, no slide_id: a genes-only cohort
    genes.insert(0, "case_id", ids)
    genes.to_csv(d / "genes.csv", index=False)
    return d, genes.drop(columns="case_id").to_numpy(), y["t.tdm"], y["e.tdm"]


COLUMNS = ["--time-column", "t.tdm", "--time-unit", "days", "--event-column", "e.tdm"]


def test_snn_matches_coxnet_on_breast_cancer(cohort_csvs, tmp_path, capsys):
    d, genes, time, event = cohort_csvs
    run = tmp_path / "run"
    code = main(["train", "--architecture", "snn", "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"),
                 "--out", str(run), *COLUMNS])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "5-fold cross-validation: snn" in out and "vs coxnet" in out
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert config["clinical_columns"]["time_unit"] == "days" and config["clinical_columns"]["event"] == "e.tdm"

    # histosurv's c-index of each fold's held-out risks equals scikit-survival's on the same risks
    preds = pd.read_csv(run / "test_predictions.csv")
    assert (preds["case_id"] == [f"bc{i:03d}" for i in range(len(genes))]).all()
    np.testing.assert_allclose(preds["survival_months"], np.asarray(time) / DAYS_PER_MONTH, rtol=1e-12)
    assert ((preds["censorship"] == 0) == np.asarray(event)).all()
    for k, c in enumerate(metrics["model"]["c_index_folds"]):
        fold = preds[preds["fold"] == k]
        sk = concordance_index_censored(fold["censorship"].to_numpy() == 0, fold["survival_months"].to_numpy(),
                                        fold["risk"].to_numpy())[0]
        assert c == pytest.approx(sk, abs=1e-12)

    snn, coxnet = metrics["model"]["c_index_mean"], metrics["coxnet"]["c_index_mean"]
    with capsys.disabled():
        print(f"\nbreast cancer, 198 patients, 5 folds: SNN {snn:.4f} ± {metrics['model']['c_index_sd']:.4f}, "
              f"coxnet {coxnet:.4f} ± {metrics['coxnet']['c_index_sd']:.4f}")
    assert snn >= coxnet - MARGIN, (snn, coxnet)
    assert coxnet > 0.58  # the probes carry signal; a broken baseline would sit at 0.5


def test_genes_only_architecture_needs_no_slides_but_image_models_do(cohort_csvs, tmp_path, capsys):
    d, *_ = cohort_csvs
    code = main([
        "train", "--architecture", "abmil", "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"),
        "--out", str(tmp_path / "run"), "--epochs", "1", *COLUMNS,
    ])  # fmt: skip
    assert code == 2
    assert "abmil reads patch features" in capsys.readouterr().err


def test_an_option_of_another_architecture_is_refused(cohort_csvs, tmp_path, capsys):
    d, *_ = cohort_csvs
    code = main([
        "train", "--architecture", "snn", "--depth", "3", "--clinical", str(d / "clinical.csv"),
        "--genes", str(d / "genes.csv"), "--out", str(tmp_path / "run"), *COLUMNS,
    ])  # fmt: skip
    assert code == 2
    assert "--depth do not apply to --architecture snn" in capsys.readouterr().err
