"""The genes-only SNN trained by ``histosurv train`` on a real gene-expression cohort, against a
penalised Cox model on the same split.

scikit-survival ships the breast-cancer cohort of Desmedt et al. (198 patients, 76 microarray
probes, time to distant metastasis). The SNN must reach a held-out c-index no worse than 0.03
below ``CoxnetSurvivalAnalysis`` fitted on the same training patients, its penalty chosen on the
same validation patients, both scored on the same test patients.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sksurv")

from sksurv.datasets import load_breast_cancer  # noqa: E402
from sksurv.linear_model import CoxnetSurvivalAnalysis  # noqa: E402
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
    clinical = pd.DataFrame(
        {"case_id": ids, "survival_months": y["t.tdm"] / DAYS_PER_MONTH, "censorship": (~y["e.tdm"]).astype(int)}
    )
    clinical.to_csv(d / "clinical.csv", index=False)  # one row per case, no slide_id: a genes-only cohort
    genes.insert(0, "case_id", ids)
    genes.to_csv(d / "genes.csv", index=False)
    return d, genes.drop(columns="case_id").to_numpy(), y["t.tdm"], y["e.tdm"]


def coxnet_c_index(genes, time, event, split) -> float:
    """Coxnet on the train patients; l1_ratio and alpha chosen by validation c-index; test c-index."""
    part = {k: np.flatnonzero(split == k) for k in ("train", "val", "test")}
    mean, std = genes[part["train"]].mean(0), genes[part["train"]].std(0)
    z = (genes - mean) / std
    y = np.array(list(zip(event, time)), dtype=[("event", bool), ("time", float)])
    best = (-np.inf, None)
    for l1_ratio in (0.5, 0.9):
        model = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alpha_min_ratio=0.01, n_alphas=50)
        model.fit(z[part["train"]], y[part["train"]])
        for alpha in model.alphas_:
            val = concordance_index_censored(event[part["val"]], time[part["val"]], model.predict(z[part["val"]], alpha=alpha))[0]
            if val > best[0]:
                test_risk = model.predict(z[part["test"]], alpha=alpha)
                best = (val, concordance_index_censored(event[part["test"]], time[part["test"]], test_risk)[0])
    return best[1]


def test_snn_matches_coxnet_on_breast_cancer(cohort_csvs, tmp_path, capsys):
    d, genes, time, event = cohort_csvs
    run = tmp_path / "run"
    # Cox loss over the whole training risk set each step (batch larger than the split), as Cox models fit
    code = main([
        "train", "--architecture", "snn", "--survival-head", "cox", "--seed", "0",
        "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"), "--out", str(run),
        "--lr", "1e-3", "--batch-size", "1000", "--max-epochs", "300", "--patience", "40",
    ])  # fmt: skip
    assert code == 0
    metrics = json.loads((run / "metrics.json").read_text())
    split = pd.read_csv(run / "splits.csv")["split"].to_numpy()
    assert (pd.read_csv(run / "splits.csv")["case_id"] == [f"bc{i:03d}" for i in range(len(genes))]).all()

    # histosurv's own c-index of its held-out predictions equals scikit-survival's on the same risks
    preds = pd.read_csv(run / "test_predictions.csv")
    sk = concordance_index_censored(preds["censorship"].to_numpy() == 0, preds["survival_months"].to_numpy(), preds["risk"].to_numpy())[0]
    assert metrics["test_c_index"] == pytest.approx(sk, abs=1e-12)

    baseline = coxnet_c_index(genes, np.asarray(time, float), np.asarray(event, bool), split)
    with capsys.disabled():
        print(f"\nbreast cancer, {metrics['patients']} patients: SNN test c-index {metrics['test_c_index']:.4f}, Coxnet {baseline:.4f}")
    assert metrics["test_c_index"] >= baseline - MARGIN, (metrics["test_c_index"], baseline)


def test_genes_only_architecture_needs_no_slides_but_image_models_do(cohort_csvs, tmp_path, capsys):
    d, *_ = cohort_csvs
    code = main([
        "train", "--architecture", "abmil", "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"),
        "--out", str(tmp_path / "run"), "--max-epochs", "1",
    ])  # fmt: skip
    assert code == 2
    assert "abmil reads patch features" in capsys.readouterr().err


def test_an_option_of_another_architecture_is_refused(cohort_csvs, tmp_path, capsys):
    d, *_ = cohort_csvs
    code = main([
        "train", "--architecture", "snn", "--depth", "3", "--clinical", str(d / "clinical.csv"),
        "--genes", str(d / "genes.csv"), "--out", str(tmp_path / "run"),
    ])  # fmt: skip
    assert code == 2
    assert "--depth do not apply to --architecture snn" in capsys.readouterr().err
