"""Clinical covariates as a third input: reading them, encoding them in the graph, coxnet on them,
train -> export -> verify -> predict with them, and whether they add what they carry."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from histosurv.data.cohort import load_cohort
from histosurv.data.covariates import (
    ClinicalSpec,
    Covariate,
    CovariateRequest,
    check_wire_values,
    encode_table,
    fit_covariates,
)
from histosurv.data.features import bag_path
from histosurv.data.synth import write_synthetic_cohort
from histosurv.errors import InputError
from histosurv.export.cross_validation import assign_folds, cross_validate
from histosurv.export.models.clinical import ClinicalEncoder, WithClinical
from histosurv.export.models.coxnet import CoxNetConfig, fit_coxnet, fit_coxnet_model, patient_design
from histosurv.export.models.snn import SNN, SNNConfig
from histosurv.export.training import predict_patients, recipe

from .conftest import TINY_SYNTH, run_cli

TABLE = pd.DataFrame({
    "case_id": ["a", "b", "c", "d", "e"],
    "age": [50, 60, "NA", 70, 80],
    "sex": ["F", "M", "F", " M ", ""],
    "stage": ["II", "I", "IV", "II", "III"],
    "grade": [1, 2, 3, 2, 1],
})
REQUEST = CovariateRequest(("age", "sex", "stage", "grade"), categorical=("grade",))


def test_fit_reads_numbers_categories_and_missing_cells():
    spec = fit_covariates(TABLE, REQUEST, train_rows=[0, 1, 2, 3])
    age, sex, stage, grade = spec.covariates
    # numeric: scaler from the training rows with a value (50, 60, 70), not from row 4 (80)
    assert age.kind == "numeric" and age.mean == pytest.approx(60.0) and age.scale == pytest.approx(np.std([50, 60, 70]))
    # categories from every row (III is only in row 4), stripped, in natural order
    assert sex.categories == ("F", "M") and stage.categories == ("I", "II", "III", "IV")
    assert grade.kind == "categorical" and grade.categories == ("1", "2", "3")  # numbers, but asked as categories
    values = encode_table(spec, TABLE, ["c", "e", "a"])
    assert np.isnan(values[0, 0]) and np.isnan(values[1, 1])  # "NA" age, empty sex
    np.testing.assert_array_equal(values[2], [50.0, 0.0, 1.0, 0.0])  # a: 50, F, II, grade 1


def test_encoding_refuses_what_the_model_never_saw():
    spec = fit_covariates(TABLE, REQUEST, train_rows=range(5))
    bad_stage = TABLE.assign(stage=["II", "I", "IV", "V", "III"])
    with pytest.raises(InputError, match=r"case 'd'.*'stage' is 'V'.*never saw.*'I', 'II', 'III', 'IV'"):
        encode_table(spec, bad_stage, ["a", "d"])
    with pytest.raises(InputError, match=r"case 'b'.*'age' must be a number, got 'sixty'"):
        encode_table(spec, TABLE.assign(age=[50, "sixty", 1, 2, 3]), ["b"])
    with pytest.raises(InputError, match=r"no column 'grade'"):
        encode_table(spec, TABLE.drop(columns="grade"), ["a"])
    with pytest.raises(InputError, match="--categorical names stage"):
        CovariateRequest(("age",), categorical=("stage",))
    with pytest.raises(InputError, match=r"no column 'weight' for --covariates"):
        fit_covariates(TABLE, CovariateRequest(("weight",)), [0, 1])


def test_wire_values_are_checked_by_covariate():
    spec = fit_covariates(TABLE, REQUEST, train_rows=range(5))
    ok = check_wire_values(spec, np.array([63.0, np.nan, 3.0, 0.0]))
    assert ok.dtype == np.float32 and ok.shape == (4,)
    for values, message in [
        ([63.0, 0.0, 4.0, 0.0], r"'stage' must be a category index 0..3 \(0=I, 1=II, 2=III, 3=IV\)"),
        ([63.0, 0.5, 0.0, 0.0], r"'sex' must be a category index"),
        ([np.inf, 0.0, 0.0, 0.0], r"'age' is infinite"),
        ([63.0, 0.0, 0.0], r"'clinical' has 3 values; the model reads 4: age, sex, stage, grade"),
    ]:
        with pytest.raises(InputError, match=message):
            check_wire_values(spec, np.array(values))


def test_encoder_standardises_one_hot_encodes_and_ignores_missing():
    spec = ClinicalSpec((Covariate("age", "numeric", 60.0, 10.0), Covariate("stage", "categorical", categories=("I", "II", "III")),
                         Covariate("bmi", "numeric", 25.0, 5.0)))
    enc = ClinicalEncoder(spec)
    x = torch.tensor([[70.0, 2.0, 20.0], [np.nan, np.nan, 25.0], [50.0, 0.0, np.nan]])
    expected = torch.tensor([[1.0, -1.0, 0, 0, 1], [0.0, 0.0, 0, 0, 0], [-1.0, 0.0, 1, 0, 0]])  # numeric first, then one-hot
    torch.testing.assert_close(enc(x), expected)
    model = WithClinical(SNN(SNNConfig(n_genes=3, survival_head="cox")), spec).eval()
    genes = torch.randn(3, 3)
    with torch.no_grad():
        model.clinical_head.weight.copy_(torch.arange(1.0, 6.0)[None])
        model.clinical_head.bias.fill_(0.5)
        shift = model(genes=genes, clinical=x) - model.base(genes=genes)
    torch.testing.assert_close(shift[:, 0], torch.tensor([1 - 2 + 5 + 0.5, 0.5, -1 + 3 + 0.5]))
    assert model.input_names == ("genes", "clinical") and "clinical" in model.optional_inputs


@pytest.fixture(scope="module")
def clinical_cohort_dir(tmp_path_factory):
    # no image or gene signal (beta 0): age and stage carry the whole hazard, an oracle c-index of 0.63
    cfg = dataclasses.replace(TINY_SYNTH, n_patients=240, clinical=True, beta=0.0, seed=5, biology_seed=5)
    return write_synthetic_cohort(tmp_path_factory.mktemp("clinical") / "cohort", cfg)


def _load(d, covariates: bool):
    request = CovariateRequest(("age", "sex", "stage")) if covariates else None
    return load_cohort(d / "clinical.csv", d / "genes.csv", d / "features", covariates=request)


def test_coxnet_with_covariates_is_the_linear_model_of_the_joint_design(clinical_cohort_dir):
    cohort = _load(clinical_cohort_dir, covariates=True)
    idx = list(range(0, 240, 2))
    spec = cohort.covariate_spec(idx)
    cfg = CoxNetConfig(n_genes=len(cohort.gene_names), feature_dim=cohort.feature_dim, modality="genes", fixed_alpha=0.02)
    model = fit_coxnet_model(cohort, idx, cfg, clinical=spec)
    # by hand: [genes ; the graph's encoding of the covariates], standardised on the training patients
    encoded = ClinicalEncoder(spec)(torch.from_numpy(cohort.clinical_values(spec))).double().numpy()
    X = np.concatenate([patient_design(cohort, range(240), cfg), encoded], axis=1)
    mean, scale = X[idx].mean(0), X[idx].std(0)
    scale[scale < 1e-8] = 1.0
    coef = fit_coxnet((X[idx] - mean) / scale, *cohort.times_events(idx), alpha=0.02, l1_ratio=cfg.l1_ratio)
    expected = (X - mean) / scale @ coef
    got = predict_patients(model, cohort, range(240))
    np.testing.assert_allclose(got - got.mean(), expected - expected.mean(), atol=2e-5)
    assert np.abs(coef[-encoded.shape[1]:]).max() > 0.1  # the covariates were used, not penalised away


def test_covariates_add_what_they_carry(clinical_cohort_dir):
    """On a cohort where age and stage carry the hazard (oracle 0.63, 0.5 without them), cross-validated
    c-index with them beats the same models without them on the same folds (coxnet and SNN, the fast ones)."""
    gains = {}
    for arch in ("coxnet", "snn"):
        scores = {}
        for covariates in (False, True):
            cohort = _load(clinical_cohort_dir, covariates)
            cfg = recipe(arch, seed=0, baseline=False)
            model_cfg = (CoxNetConfig(n_genes=len(cohort.gene_names), feature_dim=cohort.feature_dim, modality="genes")
                         if arch == "coxnet" else SNNConfig(n_genes=len(cohort.gene_names)))
            cv = cross_validate(cohort, arch, model_cfg, cfg, k=3, refit=False)
            scores[covariates] = cv.c_indices().mean()
        gains[arch] = scores[True] - scores[False]
    assert gains["coxnet"] > 0.05 and gains["snn"] > 0.03, gains  # measured: +0.069 and +0.053


def test_folds_do_not_depend_on_covariates(clinical_cohort_dir):
    np.testing.assert_array_equal(assign_folds(_load(clinical_cohort_dir, True), 3, 0),
                                  assign_folds(_load(clinical_cohort_dir, False), 3, 0))


@pytest.fixture(scope="module")
def clinical_repo(clinical_cohort_dir, tmp_path_factory):
    d = clinical_cohort_dir
    root = tmp_path_factory.mktemp("clinical_run")
    trained = run_cli("train", "--clinical", d / "clinical.csv", "--genes", d / "genes.csv", "--features-dir",
                      d / "features", "--out", root / "run", "--architecture", "abmil", "--folds", "1", "--epochs", "2",
                      "--batch-size", "16", "--patches-per-slide", "8", "--covariates", "age,sex,stage", "--threads", "2")
    assert trained.returncode == 0, trained.stderr
    assert "clinical covariates: age (numeric), sex (F/M), stage (I/II/III/IV)" in trained.stdout
    exported = run_cli("export", "--run", root / "run", "--repo", root / "repo", "--artifacts", "none")
    assert exported.returncode == 0, exported.stderr
    return root


def test_exported_graph_takes_covariates_and_matches_torch(clinical_repo, clinical_cohort_dir):
    d = clinical_cohort_dir
    manifest = json.loads((clinical_repo / "repo" / "abmil" / "histosurv.json").read_text())
    assert {"name": "clinical", "datatype": "FP32", "shape": [3]} in manifest["inputs"]
    info = manifest["versions"]["1"]
    assert [c["name"] for c in info["clinical"]["covariates"]] == ["age", "sex", "stage"]
    assert info["modalities"]["clinical"] == "optional"
    verified = run_cli("verify", "--repo", clinical_repo / "repo")
    assert verified.returncode == 0 and "PASS onnxruntime" in verified.stdout, verified.stdout + verified.stderr

    out = clinical_repo / "with.csv"
    predicted = run_cli("predict", "--repo", clinical_repo / "repo", "--clinical", d / "clinical.csv",
                        "--features-dir", d / "features", "--out", out)
    assert predicted.returncode == 0, predicted.stderr
    from histosurv.export.run import load_run

    model, _ = load_run(clinical_repo / "run")
    cohort = _load(d, covariates=True)
    expected = predict_patients(model, cohort, range(len(cohort.patients)))
    got = pd.read_csv(out).set_index("case_id").loc[[p.case_id for p in cohort.patients], "risk"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # one case, its covariates as flags: the same risk as from the table
    case = cohort.patients[0]
    row = pd.read_csv(d / "clinical.csv").set_index("case_id").loc[case.case_id]
    row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
    one = run_cli("predict", "--repo", clinical_repo / "repo", "--case-id", case.case_id, "--features",
                  *[bag_path(d / "features", s) for s in case.slide_ids],
                  "--covariate", f"age={row['age']}", "--covariate", f"sex={row['sex']}", "--covariate", f"stage={row['stage']}",
                  "--out", clinical_repo / "one.csv")
    assert one.returncode == 0, one.stderr
    assert pd.read_csv(clinical_repo / "one.csv")["risk"][0] == pytest.approx(expected[0], rel=1e-4, abs=1e-5)


def test_predict_refuses_unseen_categories_and_runs_without_covariates(clinical_repo, clinical_cohort_dir, tmp_path):
    d = clinical_cohort_dir
    table = pd.read_csv(d / "clinical.csv")
    bad = table.assign(stage=table["stage"].where(table.index != 3, "IIIC"))
    bad.to_csv(tmp_path / "bad.csv", index=False)
    refused = run_cli("predict", "--repo", clinical_repo / "repo", "--clinical", tmp_path / "bad.csv",
                      "--features-dir", d / "features")
    assert refused.returncode != 0
    assert f"bad.csv: case '{table['case_id'][3]}': clinical covariate 'stage' is 'IIIC'" in refused.stderr, refused.stderr

    table.drop(columns=["age", "sex", "stage"]).to_csv(tmp_path / "plain.csv", index=False)
    plain = run_cli("predict", "--repo", clinical_repo / "repo", "--clinical", tmp_path / "plain.csv",
                    "--features-dir", d / "features", "--out", tmp_path / "plain_risks.csv")
    assert plain.returncode == 0, plain.stderr
    assert "has no age, sex, stage: model 'abmil' scores without them" in plain.stdout + plain.stderr
    with_cov = pd.read_csv(clinical_repo / "with.csv")["risk"].to_numpy()
    without = pd.read_csv(tmp_path / "plain_risks.csv")["risk"].to_numpy()
    assert np.isfinite(without).all() and np.abs(with_cov - without).max() > 1e-3  # the covariates moved the risks


ZOO_SPEC = ClinicalSpec((Covariate("age", "numeric", 60.0, 10.0), Covariate("stage", "categorical", categories=("I", "II", "III"))))


@pytest.mark.parametrize("name", ["mcat", "ghanet", "porpoise", "snn", "coxnet"])
def test_every_kind_of_architecture_exports_with_covariates(name, tmp_path):
    """The wrapper around architectures unlike AMMASurv and ABMIL: co-attention (MCAT), genes only in
    training (G-HANet), genes optional (PORPOISE), genes only (SNN), the linear baseline. (MoME passes
    too, in 150 s of export on 2 cores: the term is outside its routing subgraphs.)"""
    from histosurv.export.models import build_model
    from histosurv.export.onnx_export import example_inputs
    from histosurv.export.repository_writer import export_model
    from histosurv.export.verify import verify_version
    from histosurv.runtime.engines import load_engine
    from histosurv.runtime.repository import ModelRepository

    from .test_zoo import CONFIGS

    torch.manual_seed(0)
    model = build_model(name, CONFIGS[name], clinical=ZOO_SPEC).eval()
    with torch.no_grad():
        model.clinical_head.weight.copy_(torch.tensor([[0.7, -0.5, 0.1, 0.9]]))
    genes = [f"g{i}" for i in range(model.cfg.n_genes)] if "genes" in model.input_names else []
    export_model(model, {"architecture": name, "model": model.cfg.to_dict(), "genes": genes}, tmp_path, name, artifacts=())
    (report,) = verify_version(tmp_path, name, sizes=(1, 17), engines=["onnxruntime"])
    assert report.passed and report.max_risk_rel <= 1e-4, report.rows
    engine = load_engine(ModelRepository(tmp_path).version(name), "onnxruntime")
    inputs = {k: v.numpy() for k, v in example_inputs(model, n=9).items()}
    stage_iii = engine.run({**inputs, "clinical": np.array([70.0, 2.0], np.float32)})["risk"][0]
    missing = engine.run({**inputs, "clinical": np.full(2, np.nan, np.float32)})["risk"][0]
    with torch.no_grad():
        batched = {k: torch.from_numpy(v)[None] for k, v in inputs.items() if k != "clinical"}
        base = model.base.risk(**batched).item()
    assert np.isfinite(missing) and abs(stage_iii - missing) > 1e-3
    if model.cfg.survival_head == "cox":  # a Cox risk is the logit: the shift is exactly the term
        assert stage_iii - missing == pytest.approx(0.7 * 1.0 + 0.9, abs=1e-4)
        assert missing == pytest.approx(base, abs=1e-4)
