"""coxnet, the zoo's linear baseline: the elastic-net Cox solver against scikit-survival, the alpha path,
the inner cross-validation, the module against the linear model it stands for, and its ONNX graph."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from histosurv.data.cohort import BagStore, Cohort
from histosurv.data.features import Bag, bag_path, write_bag
from histosurv.data.tables import Patient
from histosurv.export.concordance import concordance_index
from histosurv.export.models import MODELS, build_model
from histosurv.export.models.coxnet import (
    CoxNet,
    CoxNetConfig,
    alpha_path,
    choose_alpha,
    coxnet_path,
    fit_coxnet,
    fit_coxnet_model,
    log_partial_likelihood,
    patient_design,
)


def _survival(rng, X, beta, censor_scale=3.0, grid=0.25):
    """Exponential times with hazard exp(X beta), rounded to a grid (ties), censored at random."""
    t = rng.exponential(np.exp(-(X @ beta)))
    c = rng.exponential(censor_scale, size=len(t))
    event = t <= c
    time = np.ceil(np.minimum(t, c) / grid) * grid
    return time, event


def _standardise(X):
    return (X - X.mean(0)) / X.std(0)


def _objective(X, time, event, b, alpha, l1_ratio):
    return -log_partial_likelihood(X, time, event, b)[0] / len(time) + alpha * (
        l1_ratio * np.abs(b).sum() + 0.5 * (1 - l1_ratio) * b @ b
    )


@pytest.fixture(scope="module")
def tied_data():
    rng = np.random.default_rng(3)
    n, p = 160, 15
    X = rng.standard_normal((n, p))
    X[:, 1] += 0.7 * X[:, 0]  # some correlation
    X = _standardise(X)
    beta = np.zeros(p)
    beta[:5] = [0.9, -0.7, 0.5, 0.3, -0.3]
    time, event = _survival(rng, X, beta)
    assert len(np.unique(time)) < 0.5 * n  # many ties
    assert 0.2 < 1 - event.mean() < 0.45  # about 30% censored
    return X, time, event


def test_agrees_with_scikit_survival(tied_data):
    sksurv_linear = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    X, time, event = tied_data
    top = alpha_path(X, time, event, 1.0, 1)[0]  # alpha_max of the lasso
    for alpha, l1_ratio in ((0.6 * top, 1.0), (0.05 * top, 0.5), (0.01 * top, 0.2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = sksurv_linear.CoxnetSurvivalAnalysis(
                alphas=[alpha], l1_ratio=l1_ratio, normalize=False, tol=1e-12, max_iter=1_000_000
            ).fit(X, Surv.from_arrays(event, time))
        expected = ref.coef_[:, 0]
        got = fit_coxnet(X, time, event, alpha, l1_ratio)
        # scikit-survival stops when its coordinate updates fall below tol; its coefficients are ~1e-6 from
        # the optimum, ours ~1e-12 (its objective is never lower than ours)
        assert np.abs(got - expected).max() < 1e-4, (alpha, l1_ratio)
        assert set(np.flatnonzero(got)) == set(np.flatnonzero(expected)), (alpha, l1_ratio)
        assert _objective(X, time, event, got, alpha, l1_ratio) <= _objective(X, time, event, expected, alpha, l1_ratio) + 1e-12
        if l1_ratio == 1.0:
            assert 1 <= np.count_nonzero(got) <= 5  # the sparse case: most of the 15 coefficients are zero


def test_alpha_path_starts_at_the_first_non_zero_solution(tied_data):
    X, time, event = tied_data
    alphas = alpha_path(X, time, event, l1_ratio=0.5, n_alphas=10, alpha_min_ratio=0.01)
    assert alphas.shape == (10,) and np.all(np.diff(alphas) < 0)
    assert alphas[-1] / alphas[0] == pytest.approx(0.01)
    coefs = coxnet_path(X, time, event, alphas, l1_ratio=0.5)
    assert coefs.shape == (X.shape[1], 10)
    assert not coefs[:, 0].any() and coefs[:, 1].any()
    assert not fit_coxnet(X, time, event, alphas[0], 0.5).any()
    assert fit_coxnet(X, time, event, alphas[0] * 0.999, 0.5).any()
    # warm-started path = cold fits
    assert np.abs(coefs[:, 6] - fit_coxnet(X, time, event, alphas[6], 0.5)).max() < 1e-7

    sksurv_linear = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    ref = sksurv_linear.CoxnetSurvivalAnalysis(n_alphas=10, alpha_min_ratio=0.01, l1_ratio=0.5).fit(
        X, Surv.from_arrays(event, time)
    )
    k = len(ref.alphas_)  # scikit-survival may stop the path early
    np.testing.assert_allclose(alphas[:k], ref.alphas_, rtol=1e-10)


@pytest.fixture(scope="module")
def linear_signal():
    rng = np.random.default_rng(11)
    n, p = 600, 40
    X = _standardise(rng.standard_normal((n, p)))
    beta = np.zeros(p)
    beta[:6] = [0.8, -0.6, 0.5, 0.4, -0.4, 0.3]
    time, event = _survival(rng, X, beta, censor_scale=2.0, grid=0.05)
    return X, time, event


def test_inner_cross_validation_chooses_a_useful_penalty_deterministically(linear_signal):
    X, time, event = linear_signal
    fit, test = slice(0, 300), slice(300, None)
    cv = choose_alpha(X[fit], time[fit], event[fit], l1_ratio=0.5, n_alphas=20, inner_folds=5, seed=4)
    assert cv.fold_scores.shape == (5, 20) and np.isfinite(cv.fold_scores).all()
    assert 0 < cv.best < 19  # neither the null model nor the least penalised one
    coef = fit_coxnet(X[fit], time[fit], event[fit], cv.alpha, 0.5)
    c = concordance_index(time[test], event[test], X[test] @ coef).c_index
    assert c > 0.65
    again = choose_alpha(X[fit], time[fit], event[fit], l1_ratio=0.5, n_alphas=20, inner_folds=5, seed=4)
    np.testing.assert_array_equal(again.fold_scores, cv.fold_scores)
    other = choose_alpha(X[fit], time[fit], event[fit], l1_ratio=0.5, n_alphas=20, inner_folds=5, seed=5)
    assert not np.array_equal(other.fold_scores, cv.fold_scores)  # the seed draws the folds


def test_config_is_checked():
    with pytest.raises(ValueError, match="survival_head must be 'cox'"):
        CoxNetConfig(n_genes=3, survival_head="discrete")
    with pytest.raises(ValueError, match="modality"):
        CoxNetConfig(n_genes=3, modality="slides")
    with pytest.raises(ValueError, match="l1_ratio"):
        CoxNetConfig(n_genes=3, l1_ratio=0.0)
    with pytest.raises(ValueError, match="n_genes"):
        CoxNetConfig(n_genes=0, modality="both")
    with pytest.raises(ValueError, match="inner_folds"):
        CoxNetConfig(n_genes=3, inner_folds=1)
    assert CoxNetConfig(n_genes=0, modality="image").n_inputs == 512
    assert MODELS["coxnet"].model_cls is CoxNet


@pytest.mark.parametrize("modality, names", [("both", ("features", "genes")), ("image", ("features",)), ("genes", ("genes",))])
def test_input_names_follow_the_modality(modality, names):
    model = build_model("coxnet", dict(n_genes=4, feature_dim=8, modality=modality))
    assert model.input_names == names
    assert (model.genes is not None) == ("genes" in names)


D, G = 16, 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """120 patients, one or two slides each, whose slide features and genes carry a linear risk."""
    root = tmp_path_factory.mktemp("coxnet_bags")
    rng = np.random.default_rng(7)
    patients, genes = [], []
    w_img, w_gene = rng.standard_normal(D) * 0.3, np.array([0.8, -0.5, 0.0, 0.0, 0.3])
    for i in range(120):
        level = rng.standard_normal(D)  # the patient's tissue
        g = rng.standard_normal(G) * 2 + 1
        slides = []
        for s in range(1 + i % 2):
            n = int(rng.integers(20, 60))
            feats = (np.abs(level + 0.5 * rng.standard_normal((n, D))) + 0.1).astype(np.float32)
            coords = np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64) * 256
            write_bag(bag_path(root, f"s{i}_{s}"), Bag(feats, coords))
            slides.append(f"s{i}_{s}")
        risk = level @ w_img + (g - 1) / 2 @ w_gene
        t, c = rng.exponential(np.exp(-risk)), rng.exponential(2.0)
        patients.append(Patient(f"p{i}", tuple(slides), float(min(t, c)), bool(t <= c)))
        genes.append(g)
    return Cohort(patients, np.asarray(genes, np.float32), [f"g{j}" for j in range(G)], BagStore(root))


def _numpy_logit(model, features, genes):
    w = model.classifier.weight.detach().double().numpy()[0]
    parts = []
    if model.uses_image:
        mean, scale = model.feature_mean.double().numpy(), model.feature_scale.double().numpy()
        parts.append((features.astype(np.float64).mean(0) - mean) / scale)
    if model.uses_genes:
        parts.append((genes.astype(np.float64) - model.genes.mean.double().numpy()) / model.genes.scale.double().numpy())
    return float(np.concatenate(parts) @ w)


def test_fitted_model_is_the_linear_model_on_the_mean(cohort):
    from histosurv.export.training import predict_patients

    cfg = CoxNetConfig(n_genes=G, feature_dim=D, n_alphas=12, inner_folds=4)
    train = list(range(90))
    model = fit_coxnet_model(cohort, train, cfg, seed=1)
    assert not model.training and model.classifier.weight.abs().sum() > 0
    assert model.inner_cv.fold_scores.shape == (4, 12) and model.chosen_alpha == model.inner_cv.alpha
    # deterministic by seed (and the slide means come from the cache the second time)
    again = fit_coxnet_model(cohort, train, cfg, seed=1)
    assert torch.equal(again.classifier.weight, model.classifier.weight) and again.chosen_alpha == model.chosen_alpha

    two = next(i for i in range(90, 120) if len(cohort.patients[i].slide_ids) == 2)
    genes = cohort.genes[two]
    slide_risks = []
    for s in cohort.patients[two].slide_ids:
        feats = cohort.bags.get(s).features
        with torch.no_grad():
            logit = model(torch.from_numpy(feats)[None], None, torch.from_numpy(genes)[None])
        assert logit.shape == (1, 1)
        assert float(logit) == pytest.approx(_numpy_logit(model, feats, genes), abs=1e-5)
        slide_risks.append(float(logit))
    # the patient's risk (mean of its slides' risks) = the linear model on the patient's design row
    row = patient_design(cohort, [two], cfg)[0]
    mean = patient_design(cohort, train, cfg).mean(0)
    scale = patient_design(cohort, train, cfg).std(0)
    linear = float((row - mean) / scale @ model.classifier.weight.detach().double().numpy()[0])
    (patient_risk,) = predict_patients(model, cohort, [two])
    assert patient_risk == pytest.approx(np.mean(slide_risks), abs=1e-6)
    assert patient_risk == pytest.approx(linear, abs=1e-5)

    held_out = list(range(90, 120))
    risks = predict_patients(model, cohort, held_out)
    assert concordance_index(*cohort.times_events(held_out), risks).c_index > 0.6


def test_fixed_alpha_and_genes_only(cohort):
    fixed = CoxNetConfig(n_genes=G, feature_dim=D, modality="genes", fixed_alpha=0.05, l1_ratio=0.7)
    genes_only = Cohort(cohort.patients, cohort.genes, cohort.gene_names, None)
    model = fit_coxnet_model(genes_only, range(100), fixed, seed=0)
    assert model.chosen_alpha == 0.05 and model.inner_cv is None
    X = cohort.genes[:100].astype(np.float64)
    Xs = (X - X.mean(0)) / X.std(0)
    expected = fit_coxnet(Xs, *cohort.times_events(range(100)), 0.05, 0.7)
    np.testing.assert_allclose(model.classifier.weight.detach().numpy()[0], expected, atol=1e-6)
    with torch.no_grad():
        out = model(genes=torch.from_numpy(cohort.genes[:3]), return_attention=True)  # ignored: no patches
    assert out.shape == (3, 1)
    with pytest.raises(ValueError, match="reads patch features"):
        fit_coxnet_model(genes_only, range(100), CoxNetConfig(n_genes=G, feature_dim=D), seed=0)


def test_onnx_runtime_matches_torch_at_two_bag_sizes(cohort, tmp_path):
    import onnxruntime as ort

    from histosurv.export.onnx_export import SingleBag, export_onnx

    cfg = CoxNetConfig(n_genes=G, feature_dim=D, fixed_alpha=0.02)
    model = fit_coxnet_model(cohort, range(100), cfg, seed=0)
    path = tmp_path / "coxnet.onnx"
    export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features", "genes"]
    rng = np.random.default_rng(0)
    for n in (1, 2000):
        x = {"features": np.abs(rng.standard_normal((n, D))).astype(np.float32), "genes": cohort.genes[5]}
        with torch.no_grad():
            risk, attention = SingleBag(model)(**{k: torch.from_numpy(v) for k, v in x.items()})
        got_risk, got_attention = session.run(None, x)
        assert abs(float(got_risk[0]) - float(risk)) <= 1e-5 * max(1.0, abs(float(risk))), n
        assert got_attention.shape == (n,) and np.allclose(got_attention, 1.0 / n, rtol=1e-6)
