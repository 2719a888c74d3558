"""What a served risk is (its unit, in the manifest and every table) and which patients a printed
c-index covers (issue 21, item 3)."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from histosurv.data.concordance import concordance_index
from histosurv.runtime.manifest import risk_definition, risk_scale

from .conftest import run_cli


def test_risk_is_defined_per_survival_head():
    assert risk_scale("cox") == "log_hazard_ratio"
    assert risk_scale("discrete", 4) == "minus_summed_survival_4_bins"
    assert "log hazard ratio" in risk_definition("cox") and "higher = worse" in risk_definition("cox")
    assert "between -4 and 0" in risk_definition("discrete", 4)


@pytest.fixture(scope="module")
def predicted(tiny_repo, tiny_cohort_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predicted") / "risks.csv"
    d = tiny_cohort_dir
    done = run_cli("predict", "--repo", tiny_repo, "--clinical", d / "clinical.csv", "--features-dir", d / "features",
                   "--genes", d / "genes.csv", "--out", out)
    assert done.returncode == 0, done.stderr
    return done.stdout, pd.read_csv(out)


def test_manifest_and_table_say_what_the_risk_is(tiny_repo, predicted):
    stdout, frame = predicted
    survival = json.loads((tiny_repo / "ammasurv" / "histosurv.json").read_text())["versions"]["1"]["survival"]
    assert survival["kind"] == "cox" and survival["risk"] == risk_definition("cox")
    assert (frame["risk_scale"] == "log_hazard_ratio").all()
    assert f"risk: {risk_definition('cox')}" in stdout


def test_c_index_is_reported_per_training_split(tiny_run, predicted):
    stdout, frame = predicted
    splits = pd.read_csv(tiny_run / "splits.csv", dtype={"case_id": str}).set_index("case_id")["split"]
    assert frame["training_split"].tolist() == splits.loc[frame["case_id"].astype(str)].tolist()
    for split, words in (("test", "held-out test patients"), ("train", "patients it was trained on (optimistic)")):
        part = frame[frame["training_split"] == split]
        c = concordance_index(part["survival_months"], part["censorship"] == 0, part["risk"])
        assert f"c-index {c.c_index:.4f} over {len(part)} {words}" in stdout
    assert "all of the table's" not in stdout
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    test_c = [line for line in stdout.splitlines() if "held-out test patients" in line][0]
    assert f"{metrics['test_c_index']:.4f}" in test_c  # the same figure training printed for those patients


def test_without_the_run_folder_the_c_index_says_it_may_include_training_patients(tiny_repo, tiny_cohort_dir, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    manifest = repo / "ammasurv" / "histosurv.json"
    data = json.loads(manifest.read_text())
    data["versions"]["1"]["training"]["run"] = str(tmp_path / "gone")
    manifest.write_text(json.dumps(data))
    d = tiny_cohort_dir
    done = run_cli("predict", "--repo", repo, "--clinical", d / "clinical.csv", "--features-dir", d / "features",
                   "--genes", d / "genes.csv")
    assert done.returncode == 0, done.stderr
    assert "all of the table's: which of them trained the model is unknown" in done.stdout
    assert "splits.csv is not on this machine" in done.stdout
