"""histosurv score on a small archive: failures recorded as data, a SIGKILL resumed to the same tables,
a changed configuration refused, and Ray Data giving the local backend's risks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from histosurv.data.tables import GeneTable
from histosurv.runtime.pipeline import PatchEncoder, SlideConfig, featurize_slide
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.survival import cox_survival, risk_group

from .conftest import run_cli


@pytest.fixture(scope="module")
def archive(slide_repo, cmu_svs, tmp_path_factory):
    """Six copies of the real SVS for three patients, a missing file, a file that is not a slide and a
    slide without tissue."""
    from histosurv.data.synthetic_slide import write_blank_slide

    repo, cohort_dir, _ = slide_repo
    root = tmp_path_factory.mktemp("archive")
    cases = pd.read_csv(cohort_dir / "genes.csv")["case_id"].astype(str).tolist()[:3]
    rows = []
    for i in range(6):
        shutil.copy(cmu_svs, root / f"slide-{i}.svs")
        rows.append({"path": f"slide-{i}.svs", "slide_id": f"S{i}", "case_id": cases[i // 2]})
    (root / "notes.svs").write_text("this is not a slide\n")
    write_blank_slide(root / "blank.tiff", 2048, 2048)
    good = pd.DataFrame(rows)
    bad = pd.DataFrame([
        {"path": "gone.svs", "slide_id": "missing", "case_id": cases[0]},
        {"path": "notes.svs", "slide_id": "not-a-slide", "case_id": cases[1]},
        {"path": "blank.tiff", "slide_id": "no-tissue", "case_id": cases[2]},
    ])
    good.to_csv(root / "good.csv", index=False)
    pd.concat([good.iloc[:2], bad]).to_csv(root / "mixed.csv", index=False)
    return root, cohort_dir / "genes.csv"


def _score(repo, manifest, out, genes, *extra):
    return run_cli("score", manifest, "--repo", repo, "--out", out, "--genes", genes, "--batch-size", 8, *extra)


def test_failures_are_recorded_with_reasons_and_the_run_completes(slide_repo, archive, tmp_path):
    repo = slide_repo[0]
    root, genes = archive
    done = _score(repo, root / "mixed.csv", tmp_path / "run", genes, "--heatmaps")
    assert done.returncode == 1, done.stderr  # finished, but not everything scored
    slides = pd.read_parquet(tmp_path / "run" / "slides.parquet").set_index("slide_id")
    assert list(slides.index) == ["S0", "S1", "missing", "not-a-slide", "no-tissue"]
    assert (slides.loc[["S0", "S1"], "status"] == "scored").all()
    assert (slides.loc[["missing", "not-a-slide", "no-tissue"], "status"] == "failed").all()
    assert "gone.svs" in slides.loc["missing", "error"] and "not found" in slides.loc["missing", "error"].lower()
    assert "notes.svs" in slides.loc["not-a-slide", "error"]
    assert "no tissue patches" in slides.loc["no-tissue", "error"]
    assert "3 failed" in done.stdout and "failed: no-tissue" in done.stderr

    # the risk is the one the slide pipeline and the predictor give for that slide and case
    predictor = FusionPredictor.from_repository(repo, "ammasurv")
    encoder = PatchEncoder.from_repository(repo, "resnet18_encoder")
    features = featurize_slide(root / "slide-0.svs", encoder, SlideConfig(batch_size=8))
    case = slides.loc["S0", "case_id"]
    expected = predictor.slide(features.bag, predictor.genes_for(GeneTable.read(genes), case)).risk
    assert slides.loc["S0", "risk"] == pytest.approx(expected, rel=1e-6)
    assert slides.loc["S0", "n_patches"] == len(features.bag)

    patients = pd.read_parquet(tmp_path / "run" / "patients.parquet").set_index("case_id")
    assert patients.loc[case, "risk"] == pytest.approx(slides.loc[["S0", "S1"], "risk"].mean())
    assert patients.loc[case, "n_failed"] == 1  # its missing slide
    # the risk's unit, S(t) and the group beside the risk, for slides and patients; NaN/None where a slide failed
    head = predictor.version.info.survival
    columns = ["risk", "risk_scale", *(f"S({t:g})" for t in head.times), "risk_group"]
    assert list(slides.columns[slides.columns.get_loc("risk"):][:len(columns)]) == columns
    np.testing.assert_allclose(slides.loc["S0", [f"S({t:g})" for t in head.times]].to_numpy(float),
                               cox_survival(head, slides.loc["S0", "risk"]), atol=2e-6)
    assert np.isnan(slides.loc["missing", f"S({head.times[0]:g})"]) and pd.isna(slides.loc["missing", "risk_group"])
    patient_risk = patients.loc[case, "risk"]
    assert patients.loc[case, "risk_group"] == head.groups[risk_group(head, patient_risk)]
    np.testing.assert_allclose(patients.loc[case, [f"S({t:g})" for t in head.times]].to_numpy(float),
                               cox_survival(head, patient_risk), atol=1e-6)
    assert (tmp_path / "run" / "features" / "S0.h5").is_file()
    assert (tmp_path / "run" / "heatmaps" / "S0.png").is_file() and not (tmp_path / "run" / "heatmaps" / "missing.png").exists()


def test_a_killed_run_resumes_to_the_tables_of_an_uninterrupted_one(slide_repo, archive, tmp_path):
    repo = slide_repo[0]
    root, genes = archive
    whole = _score(repo, root / "good.csv", tmp_path / "whole", genes)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "histosurv", "score", str(root / "good.csv"), "--repo", str(repo), "--out", str(out),
           "--genes", str(genes), "--batch-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list((out / "results").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    committed = len(list((out / "results").glob("*.json")))
    assert 2 <= committed < 6, "the kill must land mid-run for this test to mean anything"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"{6 - committed} this run ({committed} done before)" in again.stdout
    for name in ("slides.parquet", "patients.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(tmp_path / "whole" / name))
    events = [json.loads(line) for line in (out / "journal.log").read_text().splitlines()]
    assert Counter(e["slide_id"] for e in events if e["event"] == "scored") == Counter(f"S{i}" for i in range(6))
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_changed_configuration_is_refused_not_mixed(slide_repo, archive, tmp_path):
    repo = slide_repo[0]
    root, genes = archive
    manifest = tmp_path / "two.csv"
    pd.read_csv(root / "good.csv").iloc[:2].assign(path=lambda d: [str(root / p) for p in d["path"]]).to_csv(manifest, index=False)
    assert _score(repo, manifest, tmp_path / "run", genes).returncode == 0
    before = pd.read_parquet(tmp_path / "run" / "slides.parquet")

    refused = _score(repo, manifest, tmp_path / "run", genes, "--min-tissue", "0.75")
    assert refused.returncode == 2 and "holds a run made with other inputs" in refused.stderr and "slide_settings" in refused.stderr
    refused = _score(repo, manifest, tmp_path / "run", genes, "--mpp", "1.0")  # an override is part of a run's identity
    assert refused.returncode == 2 and 'overrides: was {"allow_encoder_mismatch": false, "mpp": null}' in refused.stderr
    pd.read_csv(manifest).iloc[:1].to_csv(manifest, index=False)
    refused = _score(repo, manifest, tmp_path / "run", genes)
    assert refused.returncode == 2 and "manifest_sha256" in refused.stderr and "--restart" in refused.stderr
    assert "cached features in features/ are kept and reused" in refused.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "slides.parquet"), before)  # untouched

    restarted = _score(repo, manifest, tmp_path / "run", genes, "--restart")
    assert restarted.returncode == 0 and len(pd.read_parquet(tmp_path / "run" / "slides.parquet")) == 1


def test_ray_gives_the_risks_of_the_local_backend(slide_repo, archive, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional 'ray' extra (installed with dev)")
    repo = slide_repo[0]
    root, genes = archive
    manifest = tmp_path / "mixed.csv"
    pd.read_csv(root / "mixed.csv").assign(path=lambda d: [str(root / p) for p in d["path"]]).to_csv(manifest, index=False)
    local = _score(repo, manifest, tmp_path / "local", genes)
    on_ray = run_cli("score", manifest, "--repo", repo, "--out", tmp_path / "ray", "--genes", genes, "--batch-size", 8,
                     "--ray", "local", "--ray-workers", "2", env_extra={"RAY_AUTH_MODE": "disabled"})
    assert local.returncode == on_ray.returncode == 1, on_ray.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "local" / "slides.parquet")
    b = pd.read_parquet(tmp_path / "ray" / "slides.parquet")
    pd.testing.assert_frame_equal(a.drop(columns=["risk", "error"]), b.drop(columns=["risk", "error"]))
    np.testing.assert_allclose(b["risk"], a["risk"], rtol=1e-6)  # NaN for the failed ones on both sides
    assert (a["error"] != "").sum() == (b["error"] != "").sum() == 3
    records = [json.loads((tmp_path / "ray" / "results" / f"{s}.json").read_text()) for s in ("S0", "S1")]
    workers, tilers = {r.get("worker") for r in records}, {r.get("tiler") for r in records}
    assert None not in workers and os.getpid() not in workers  # encoded in Ray actors, not in this process
    assert None not in tilers and not tilers & workers  # tiled in CPU tasks, not in the encoder actors


def test_arguments_are_checked_before_the_run_folder_is_written(slide_repo, archive, tmp_path):
    """Without --genes for a model that needs them the run fails, and writes nothing: the rerun with
    --genes is a first run, not a changed configuration (issue 22)."""
    repo = slide_repo[0]
    root, genes = archive
    refused = run_cli("score", root / "good.csv", "--repo", repo, "--out", tmp_path / "run")
    assert refused.returncode == 2 and "needs a gene table (--genes)" in refused.stderr
    assert not (tmp_path / "run").exists()
    manifest = tmp_path / "one.csv"
    pd.read_csv(root / "good.csv").iloc[:1].assign(path=lambda d: [str(root / p) for p in d["path"]]).to_csv(manifest, index=False)
    assert _score(repo, manifest, tmp_path / "run", genes).returncode == 0
