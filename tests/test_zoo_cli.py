"""Each architecture of the zoo the way a user runs it: ``histosurv train`` on a cohort, ``export``,
``verify`` and ``predict`` from the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from histosurv.cli import main

GROUPS = "4,4,4,4,4,4"  # the tiny cohort's 24 genes as six signature groups
OPTIONS = {
    "abmil": [],
    "snn": ["--hidden", "32,32"],
    "mcat": [],  # no --omic-sizes: the plain gene table's default grouping, six groups in table order
    "coxnet": [],
    "porpoise": ["--modality-dropout", "0.25"],
    "early_fusion": [],
    "ghanet": ["--dim", "32", "--heads", "4", "--gate-hidden", "16", "--compress-dim", "16", "--recon-sizes", GROUPS],
    "mome": ["--omic-sizes", GROUPS, "--dim", "32", "--num-landmarks", "16"],
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_train_export_verify_predict(name, tiny_cohort_dir, tmp_path, capsys):
    d = tiny_cohort_dir
    run, repo = tmp_path / "run", tmp_path / "repo"
    data = ["--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"), "--features-dir", str(d / "features")]
    train = ["train", "--architecture", name, *data, "--out", str(run), *OPTIONS[name]]
    assert main(train + ["--epochs", "2", "--stop", "val_loss", "--batch-size", "16", "--patches-per-slide", "8"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    if name == "coxnet":  # no epochs: its penalty is chosen by inner cross-validation, on the validation patients too
        assert np.isfinite(metrics["test_c_index"])
    else:
        assert np.isfinite(metrics["val_c_index"])
        history = pd.read_csv(run / "history.csv")
        assert np.isfinite(history["train_loss"]).all()
        baseline = json.loads((run / "baseline.json").read_text())
        assert baseline["architecture"] == "coxnet" and baseline["patients"] == metrics["patients"]
    if name == "mcat":
        assert json.loads((run / "config.json").read_text())["model"]["omic_sizes"] == [4] * 6
        assert "the 24 genes are split in table order into 6 groups of 4, 4, 4, 4, 4, 4" in capsys.readouterr().out

    assert main(["export", "--run", str(run), "--repo", str(repo), "--name", name, "--artifacts", "none"]) == 0
    assert main(["verify", "--repo", str(repo), "--model", name, "--sizes", "1,17,1000"]) == 0
    manifest = json.loads((repo / name / "histosurv.json").read_text())
    parity = manifest["versions"]["1"]["parity"]["onnxruntime"]
    assert parity["passed"] and [r["n"] for r in parity["rows"]] == [1, 17, 1000]

    out = tmp_path / "risks.csv"
    predict = ["predict", "--repo", str(repo), "--model", name, "--clinical", str(d / "clinical.csv"),
               "--features-dir", str(d / "features"), "--genes", str(d / "genes.csv"), "--out", str(out)]  # fmt: skip
    assert main(predict) == 0
    risks = pd.read_csv(out)
    assert len(risks) == 60 and np.isfinite(risks["risk"]).all() and risks["risk"].nunique() > 1
