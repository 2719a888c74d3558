"""S(t) and risk groups (issue 21, items 1-2): the Breslow baseline against scikit-survival's, the graph's
outputs identical across ONNX Runtime, the FP32 opset-23 graph, the torch package and eager torch, and
the stored cut-offs used for every later patient."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from histosurv.cli import main
from histosurv.errors import InputError
from histosurv.export.onnx_export import SingleBag, example_inputs
from histosurv.export.repository_writer import export_run
from histosurv.export.run import save_run
from histosurv.export.survival_reference import (breslow_cumulative_hazard, fit_survival_reference, reported_times,
                                                 risk_cutoffs)
from histosurv.export.training import train
from histosurv.export.verify import reference_model
from histosurv.runtime.engines import load_engine
from histosurv.runtime.manifest import SurvivalHead
from histosurv.runtime.repository import ModelRepository
from histosurv.runtime.survival import cox_survival, risk_group

from .conftest import TINY_TRAIN, tiny_model_config


def _outcomes(n: int, seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    risk = rng.normal(0, 1.5, n)
    time = rng.exponential(30 * np.exp(-0.7 * risk))
    time = np.round(time) + 1 if ties else time + 0.1  # whole months: many tied times
    event = rng.random(n) < 0.65
    return risk, time, event


@pytest.mark.parametrize("ties", [False, True])
def test_breslow_baseline_equals_scikit_survival(ties):
    from sksurv.linear_model.coxph import BreslowEstimator

    risk, time, event = _outcomes(300, seed=int(ties), ties=ties)
    reference = BreslowEstimator().fit(risk, event, time)
    uniq = np.unique(time)
    at = np.concatenate([uniq[:: 7], [uniq[-1]]])  # sksurv's step function is defined on the observed range
    ours = breslow_cumulative_hazard(risk, time, event, at)
    np.testing.assert_allclose(ours, reference.cum_baseline_hazard_(at), rtol=1e-9, atol=1e-12)
    # large log-hazards do not overflow: H0 * exp(risk) is what counts, and it is shift-invariant
    shifted = breslow_cumulative_hazard(risk + 700, time, event, at) * np.exp(700.0)
    np.testing.assert_allclose(shifted, ours, rtol=1e-9)


def test_times_cut_offs_and_refusals():
    risk, time, event = _outcomes(90, seed=3, ties=False)
    times, note = reported_times(time, event, (12, 24, 36, 60, 10_000))
    assert times == (12.0, 24.0, 36.0, 60.0) and "10000 months dropped" in note
    short, note = reported_times(time / 100, event)
    assert len(short) >= 1 and all(t < (time / 100).max() for t in short) and "quartiles" in note
    lo, hi = risk_cutoffs(risk, "tertiles")
    assert np.mean(risk <= lo) == pytest.approx(1 / 3, abs=0.02) and np.mean(risk > hi) == pytest.approx(1 / 3, abs=0.02)
    with pytest.raises(InputError, match="no events"):
        fit_survival_reference(SurvivalHead("cox"), risk, time, np.zeros_like(event))
    with pytest.raises(InputError, match="quartiles|choose one of"):
        risk_cutoffs(risk, "quartiles")
    head, _ = fit_survival_reference(SurvivalHead("cox"), risk, time, event)
    # a risk exactly on the cut-off is in the lower group; the curve falls with time and with risk
    assert risk_group(head, head.cutoffs[0]) == 0 and risk_group(head, head.cutoffs[0] + 1e-3) == 1
    low, high = cox_survival(head, -1.0), cox_survival(head, 1.0)
    assert np.all(np.diff(low) <= 0) and np.all(high < low)


def test_every_engine_returns_the_same_curve_and_group(tiny_repo):
    """ONNX Runtime, the FP32 opset-23 graph, the torch package and eager torch: S(t) within 1e-5, the
    same group, and the curve equal to exp(-H0 exp(risk)) from the manifest."""
    mv = ModelRepository(tiny_repo).version("ammasurv")
    head = mv.info.survival
    model = reference_model(mv)
    wrapper = SingleBag(model)
    engines = {key: load_engine(mv, key) for key in ("onnxruntime", "torch")}
    from histosurv.runtime.engines.ort import OnnxRuntimeEngine
    engines["onnx_opset23"] = OnnxRuntimeEngine(mv, key="onnx_opset23", providers=["CPUExecutionProvider"])
    groups = set()
    for n in (1, 17, 250):
        inputs = example_inputs(model, n=n, seed=n)
        with torch.inference_mode():
            expected = dict(zip(wrapper.output_names(), (t.numpy() for t in wrapper(**inputs))))
        np.testing.assert_allclose(expected["survival"], cox_survival(head, float(expected["risk"][0])), atol=1e-6)
        assert expected["risk_group"].dtype == np.int64 and int(expected["risk_group"][0]) == risk_group(head, expected["risk"][0])
        for key, engine in engines.items():
            out = engine.run({k: v.numpy() for k, v in inputs.items()})
            np.testing.assert_allclose(out["survival"], expected["survival"], atol=1e-5, err_msg=key)
            assert out["risk_group"].tolist() == expected["risk_group"].tolist(), key
        groups.add(int(expected["risk_group"][0]))
    fp16 = load_engine(mv, "onnxruntime_fp16").run({k: v.numpy() for k, v in example_inputs(model, n=17, seed=17).items()})
    assert fp16["survival"].dtype == np.float32 and np.all((fp16["survival"] > 0) & (fp16["survival"] <= 1))


@pytest.fixture(scope="module")
def discrete_repo(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("discrete")
    result = train(tiny_cohort, "ammasurv", tiny_model_config(survival_head="discrete"), dataclasses.replace(TINY_TRAIN, epochs=1))
    run = save_run(root / "run", result, tiny_cohort)
    export_run(run, root / "repo", "ammasurv", artifacts=(), risk_groups="tertiles", survival_times=(6, 24, 48))
    return root / "repo", run


def test_discrete_head_curve_is_the_product_of_its_hazards(discrete_repo):
    repo, run = discrete_repo
    mv = ModelRepository(repo).version("ammasurv")
    head = mv.info.survival
    assert head.kind == "discrete" and head.times == (6.0, 24.0, 48.0) and head.groups == ("low", "intermediate", "high")
    train_risks = pd.read_csv(run / "train_predictions.csv")["risk"]
    np.testing.assert_allclose(head.cutoffs, np.quantile(train_risks, [1 / 3, 2 / 3]))
    model = reference_model(mv)
    inputs = example_inputs(model, n=40, seed=1)
    with torch.inference_mode():
        logits = model(**{k: v[None] for k, v in inputs.items()})[0].double().numpy()
    through = np.cumprod(1 / (1 + np.exp(logits)))  # S after each bin: prod (1 - sigmoid(logit))
    upper = np.asarray(head.time_bins)[1:]
    expected = [1.0 if not (upper <= t).any() else through[np.flatnonzero(upper <= t)[-1]] for t in head.times]
    out = load_engine(mv, "onnxruntime").run({k: v.numpy() for k, v in inputs.items()})
    np.testing.assert_allclose(out["survival"], expected, atol=1e-6)
    assert np.all(np.diff(out["survival"]) <= 0)
    # the risk of a discrete head is minus the summed survival over the bins; its group from the stored cut-offs
    assert float(out["risk"][0]) == pytest.approx(-through.sum(), abs=1e-5)
    assert int(out["risk_group"][0]) == int(np.sum(np.float32(out["risk"][0]) > np.float32(head.cutoffs)))


def test_predict_writes_curves_and_groups_placed_with_the_stored_cut_offs(tiny_repo, tiny_cohort_dir, tmp_path):
    """Every patient, training or not, is grouped by the cut-offs stored at export; evaluate reads the S(t) columns."""
    d = tiny_cohort_dir
    out = tmp_path / "risks.csv"
    assert main(["predict", "--repo", str(tiny_repo), "--clinical", str(d / "clinical.csv"), "--genes", str(d / "genes.csv"),
                 "--features-dir", str(d / "features"), "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    head = ModelRepository(tiny_repo).version("ammasurv").info.survival
    assert list(frame.columns[:8]) == ["case_id", "risk", "risk_scale", "S(12)", "S(24)", "S(36)", "S(60)", "risk_group"]
    expected_group = np.where(frame["risk"].astype(np.float32) > np.float32(head.cutoffs[0]), "high", "low")
    assert (frame["risk_group"] == expected_group).all()
    for i in range(0, len(frame), 11):
        np.testing.assert_allclose(frame.loc[i, ["S(12)", "S(24)", "S(36)", "S(60)"]].to_numpy(float),
                                   cox_survival(head, frame.loc[i, "risk"]), atol=2e-6)
    train = frame[frame["training_split"] == "train"]
    assert (train["risk_group"] == "high").mean() == pytest.approx(0.5, abs=0.03)  # median of these very risks
    report = tmp_path / "evaluation"
    assert main(["evaluate", "--predictions", str(out), "--clinical", str(d / "clinical.csv"), "--out", str(report),
                 "--bootstrap", "0"]) == 0
    figures = json.loads((report / "evaluation.json").read_text())["figures"]
    assert 0 < figures["brier_score"]["integrated"]["value"] < 0.5  # the predicted S(t) columns were read

