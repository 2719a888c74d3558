"""histosurv evaluate: each figure equal to scikit-survival's / lifelines' on synthetic cohorts, the
bootstrap intervals, the command end to end, and the refusals of bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from sksurv.metrics import (brier_score, concordance_index_censored, concordance_index_ipcw, cumulative_dynamic_auc,
                            integrated_brier_score)
from sksurv.util import Surv

from histosurv.cli import main
from histosurv.runtime.evaluation import EvaluationCohort, EvaluationSettings, Outcomes, evaluate, to_strict_json

TIMES = (12.0, 24.0, 36.0, 60.0)


def _synthetic(n: int, censor_high: float, seed: int, time_decimals: int | None = None,
               risk_decimals: int | None = None, scale: float = 30.0) -> dict:
    """Exponential deaths with a log-hazard of ``risk`` (mean ``scale`` months at risk 0), uniform
    censoring on [2, censor_high]; rounding makes ties in times and in risks. S(t) is the true model's,
    so the Brier scores and calibration are those of a good model."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    if risk_decimals is not None:
        risk = np.round(risk, risk_decimals)
    death = rng.exponential(scale * np.exp(-risk))
    censor = rng.uniform(2, censor_high, n)
    time = np.minimum(death, censor)
    if time_decimals is not None:
        time = np.round(time, time_decimals)
    time = np.maximum(time, 0.5)
    return {"case_ids": np.array([f"C{i:04d}" for i in range(n)]), "time": time, "event": death <= censor,
            "risk": risk, "survival": {t: np.exp(-t / scale * np.exp(risk)) for t in TIMES}}


# 200 patients, 22% censored, distinct risks; 70 patients, 67% censored, whole-month times
# and risks to one decimal (ties in both); 400 patients, 20% censored, whole-month times and risks on
# seven levels (nearly every time and risk tied), with a separate training cohort
DATASETS = {
    "continuous": dict(n=200, censor_high=120, seed=1),
    "censored_ties": dict(n=70, censor_high=60, seed=2, time_decimals=0, risk_decimals=1, scale=120.0),
    "risk_levels": dict(n=400, censor_high=150, seed=3, time_decimals=0, risk_decimals=0),
}


def _cohort(data: dict, groups: pd.Series | None = None) -> EvaluationCohort:
    outcomes = Outcomes(data["case_ids"], data["time"], data["event"], "clinical.csv")
    return EvaluationCohort(outcomes, data["risk"], data["survival"], groups, "predictions.csv")


def _within(data: dict, times=TIMES) -> np.ndarray:
    return np.array([t for t in times if data["time"].min() <= t < data["time"].max()])


@pytest.mark.parametrize("name", list(DATASETS))
def test_figures_equal_scikit_survival_and_lifelines(name):
    data = _synthetic(**DATASETS[name])
    # a separate training cohort for the censoring distribution on one data set, the cohort itself on the others
    train = _synthetic(n=300, censor_high=400, seed=9, time_decimals=0) if name == "risk_levels" else data
    report = evaluate(_cohort(data), EvaluationSettings(groups="tertiles", bootstrap=0),
                      Outcomes(train["case_ids"], train["time"], train["event"], "train.csv") if train is not data else None)
    f = report["figures"]
    y, y_train = Surv.from_arrays(data["event"], data["time"]), Surv.from_arrays(train["event"], train["time"])
    times = _within(data)
    assert report["times_months"] == list(times)
    assert f["harrell_c_index"]["value"] == pytest.approx(
        concordance_index_censored(data["event"], data["time"], data["risk"])[0], abs=1e-6)
    assert f["uno_c_index"]["tau_months"] == times[-1]
    assert f["uno_c_index"]["value"] == pytest.approx(
        concordance_index_ipcw(y_train, y, data["risk"], tau=times[-1])[0], abs=1e-6)
    auc, mean = cumulative_dynamic_auc(y_train, y, data["risk"], times)
    assert [r["value"] for r in f["time_dependent_auc"]["per_time"]] == pytest.approx(auc, abs=1e-6)
    assert f["time_dependent_auc"]["mean"]["value"] == pytest.approx(mean, abs=1e-6)
    s = np.stack([data["survival"][t] for t in times], axis=1)
    assert [r["value"] for r in f["brier_score"]["per_time"]] == pytest.approx(
        brier_score(y_train, y, s, times)[1], abs=1e-6)
    assert f["brier_score"]["integrated"]["value"] == pytest.approx(
        integrated_brier_score(y_train, y, s, times), abs=1e-6)
    _check_groups_against_lifelines(report["risk_groups"], data)
    _check_calibration_against_lifelines(f["calibration"], data)
    assert "NaN" not in to_strict_json(report)


def _members(data: dict, lo_hi) -> np.ndarray:
    return (data["risk"] >= lo_hi[0]) & (data["risk"] <= lo_hi[1])  # groups and bins are contiguous in risk


def _check_groups_against_lifelines(groups: dict, data: dict) -> None:
    members = [_members(data, g["risk_range"]) for g in groups["groups"]]
    assert sum(m.sum() for m in members) == data["risk"].size  # every patient in exactly one group
    code = np.argmax(np.stack(members), axis=0)
    ref = multivariate_logrank_test(data["time"], code, data["event"])
    lr = groups["logrank"]
    assert lr["dof"] == len(members) - 1
    assert lr["chi2"] == pytest.approx(ref.test_statistic, abs=1e-6)
    assert lr["p_value"] == pytest.approx(ref.p_value, abs=1e-6)
    for g, m in zip(groups["groups"], members):
        kmf = KaplanMeierFitter().fit(data["time"][m], data["event"][m])
        km = g["kaplan_meier"]
        assert km["survival"] == pytest.approx(kmf.survival_function_.loc[km["time"]].to_numpy().ravel(), abs=1e-9)
        greenwood = kmf.survival_function_.to_numpy().ravel() * np.sqrt(kmf._cumulative_sq_.to_numpy())
        assert km["se"] == pytest.approx(pd.Series(greenwood, kmf.timeline).loc[km["time"]].to_numpy(), abs=1e-9)
        median = kmf.median_survival_time_
        assert g["median_survival_months"] == (None if np.isinf(median) else pytest.approx(median))


def _check_calibration_against_lifelines(calibration: dict, data: dict) -> None:
    for panel in calibration["per_time"]:
        t = panel["time_months"]
        assert sum(b["n"] for b in panel["bins"]) == data["risk"].size
        for b in panel["bins"]:
            m = _members(data, b["risk_range"])
            assert b["n"] == m.sum()
            assert b["predicted"] == pytest.approx(data["survival"][t][m].mean(), abs=1e-12)
            if b["observed"] is None:  # the bin's follow-up ends before t
                assert data["time"][m].max() < t and "follow-up ends" in b["reason"]
                continue
            kmf = KaplanMeierFitter().fit(data["time"][m], data["event"][m])
            assert b["observed"] == pytest.approx(kmf.predict(t), abs=1e-9)


def test_two_groups_equal_logrank_test():
    data = _synthetic(**DATASETS["censored_ties"])
    report = evaluate(_cohort(data), EvaluationSettings(bootstrap=0))  # default: the median
    groups = report["risk_groups"]
    assert [g["name"] for g in groups["groups"]] == ["low", "high"] and groups["logrank"]["dof"] == 1
    high = data["risk"] > groups["cutoffs"][0]
    ref = logrank_test(data["time"][~high], data["time"][high], data["event"][~high], data["event"][high])
    assert groups["logrank"]["chi2"] == pytest.approx(ref.test_statistic, abs=1e-6)
    assert groups["logrank"]["p_value"] == pytest.approx(ref.p_value, abs=1e-6)
    assert "fitted on the evaluated patients" in " ".join(report["notes"])


def test_bootstrap_intervals_contain_the_estimate_and_follow_the_seed():
    data = _synthetic(**DATASETS["continuous"])
    run = lambda seed: evaluate(_cohort(data), EvaluationSettings(bootstrap=200, seed=seed))["figures"]  # noqa: E731
    a, b, other = run(0), run(0), run(1)
    assert a == b  # the seed fixes every replicate
    scalars = [a["harrell_c_index"], a["uno_c_index"], *a["time_dependent_auc"]["per_time"],
               a["time_dependent_auc"]["mean"], *a["brier_score"]["per_time"], a["brier_score"]["integrated"]]
    for fig in scalars:
        lo, hi = fig["ci95"]
        assert lo <= fig["value"] <= hi and hi - lo > 0
        assert fig["replicates"] == 200 and fig["replicates_used"] == 200
    assert other["harrell_c_index"]["ci95"] != a["harrell_c_index"]["ci95"]


def test_bootstrap_skips_replicates_where_a_figure_is_undefined():
    # two patients followed past 40 months: replicates drawing neither have no control at 40
    rng = np.random.default_rng(5)
    n = 40
    time = np.r_[rng.uniform(1, 39, n - 2), 45.0, 50.0]
    event = np.r_[rng.random(n - 2) < 0.7, False, False]
    risk = -time + rng.normal(0, 5, n)
    data = {"case_ids": np.array([f"P{i}" for i in range(n)]), "time": time, "event": event, "risk": risk, "survival": {}}
    report = evaluate(_cohort(data), EvaluationSettings(times=(10.0, 40.0), bootstrap=300, seed=0))
    at40 = report["figures"]["time_dependent_auc"]["per_time"][1]
    assert 0 < at40["replicates_used"] < 300 and at40["ci95"] is not None
    assert report["figures"]["time_dependent_auc"]["per_time"][0]["replicates_used"] == 300
    assert report["figures"]["brier_score"] == {
        "value": None, "reason": "the predictions have no S(t) columns (S(12), S(24), ...)"}
    json.loads(to_strict_json(report))


def test_bootstrap_survives_replicates_whose_censoring_distribution_ends_at_a_death():
    # one patient followed to 30 months; replicates without it end at 10 months with a death and a
    # censoring, where G = 0: AUC(20) is undefined there, not an error
    time = np.array([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 30])
    event = np.r_[np.ones(10, bool), False, False]
    data = {"case_ids": np.array([f"P{i}" for i in range(12)]), "time": time, "event": event,
            "risk": -time + np.linspace(0, 1, 12), "survival": {}}
    report = evaluate(_cohort(data), EvaluationSettings(times=(2.0, 20.0), bootstrap=100, seed=0))
    at20 = report["figures"]["time_dependent_auc"]["per_time"][1]
    assert at20["value"] == pytest.approx(cumulative_dynamic_auc(*[Surv.from_arrays(event, time)] * 2, data["risk"],
                                                                 [2.0, 20.0])[0][1], abs=1e-6)
    assert 20 <= at20["replicates_used"] < 100


def test_undefined_figures_are_null_with_a_reason():
    # the first death is at 5 months, a censoring at 1: AUC(2) has no case
    time = np.array([1.0, 5, 6, 7, 8, 9, 10, 11, 12, 30])
    event = np.array([False, True, True, False, True, True, False, True, False, False])
    data = {"case_ids": np.array([f"P{i}" for i in range(10)]), "time": time, "event": event,
            "risk": -time, "survival": {}}
    report = evaluate(_cohort(data), EvaluationSettings(times=(2.0, 10.0), bootstrap=50))
    auc = report["figures"]["time_dependent_auc"]
    assert auc["per_time"][0] == {"value": None, "reason": "no deaths at or before 2 months", "time_months": 2.0}
    assert auc["mean"]["over_months"] == [10.0]
    text = to_strict_json(report)
    assert "NaN" not in text and "Infinity" not in text


def test_evaluation_imports_neither_torch_nor_export():
    code = ("import sys, histosurv.cli.evaluate, histosurv.runtime.evaluation;"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('histosurv.export')];"
            "sys.exit(str(bad) if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    from histosurv.data import concordance as data_c
    from histosurv.export import concordance as export_c

    assert export_c.concordance_index is data_c.concordance_index and export_c.Concordance is data_c.Concordance


# ---------------------------------------------------------------- the command


def _write_tables(tmp_path, n: int = 80, seed: int = 4, risk_group: bool = False):
    """A predictions table as predict --out writes it (outcomes joined, S(t) columns) and a clinical
    table with two slides per case, in MCAT's columns."""
    data = _synthetic(n=n, censor_high=90, seed=seed, time_decimals=1)
    ids = data["case_ids"]
    preds = pd.DataFrame({"case_id": ids, "risk": data["risk"], "n_slides": 2, "n_patches": 100,
                          "survival_months": data["time"], "censorship": (~data["event"]).astype(int)})
    for t in TIMES:
        preds[f"S({t:g})"] = data["survival"][t]
    if risk_group:
        preds["risk_group"] = np.where(data["risk"] > 0.3, "high", "low")  # a model's stored cut-off
    clinical = pd.DataFrame({"case_id": np.repeat(ids, 2), "slide_id": [f"{c}-{k}" for c in ids for k in (1, 2)],
                             "survival_months": np.repeat(data["time"], 2),
                             "censorship": np.repeat((~data["event"]).astype(int), 2)})
    preds.to_csv(tmp_path / "risks.csv", index=False)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    return tmp_path / "risks.csv", tmp_path / "clinical.csv", data


def test_cli_end_to_end(tmp_path, capsys):
    preds, clinical, data = _write_tables(tmp_path, risk_group=True)
    extra = pd.read_csv(clinical)
    pd.concat([extra, extra.iloc[:1].assign(case_id="UNSCORED", slide_id="UNSCORED-1")]).to_csv(clinical, index=False)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--predictions", str(preds), "--clinical", str(clinical), "--times", "12,24,36,60,500",
                 "--bootstrap", "60", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert set(report) == {"schema", "sign", "inputs", "cohort", "censoring_distribution", "times_months", "bootstrap",
                           "figures", "risk_groups", "notes"}
    assert set(report["figures"]) == {"harrell_c_index", "uno_c_index", "time_dependent_auc", "brier_score", "calibration"}
    assert report["cohort"]["n_patients"] == 80 and report["cohort"]["n_events"] == int(data["event"].sum())
    assert report["times_months"] == [12.0, 24.0, 36.0, 60.0]
    assert report["censoring_distribution"] == "the evaluated cohort itself (no --train-clinical given)"
    assert report["risk_groups"]["fitted_on"] == "the model's training patients (stored cut-offs)"
    assert [g["name"] for g in report["risk_groups"]["groups"]] == ["low", "high"]
    notes = " ".join(report["notes"])
    assert "dropped 500 months: at or beyond the last follow-up" in notes
    assert "1 case(s) of" in notes and "'UNSCORED'" in notes
    assert report["figures"]["harrell_c_index"]["value"] == pytest.approx(
        concordance_index_censored(data["event"], data["time"], data["risk"])[0], abs=1e-6)
    for label in ("80 patients", "Harrell's c-index", "Uno's c-index (tau 60)", "AUC(12)", "mean AUC",
                  "integrated Brier 12-60", "log-rank chi2", "stored cut-offs", "95% "):
        assert label in printed
    assert (out / "summary.txt").read_text().strip() in printed
    if importlib.util.find_spec("matplotlib") is not None:
        for png in ("km_by_group.png", "calibration.png", "td_auc.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the folder is written whole or not at all, and not over an existing one unless asked
    assert main(["evaluate", "--predictions", str(preds), "--clinical", str(clinical), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_training_cohort_mapped_columns_and_no_matplotlib(tmp_path, capsys, monkeypatch):
    preds, clinical, data = _write_tables(tmp_path)
    # the same patients in TCGA's words: days, vital status
    tcga = pd.read_csv(clinical).rename(columns={"case_id": "submitter_id"})
    tcga["OS.time"] = tcga.pop("survival_months") * 30.4375
    tcga["vital_status"] = np.where(tcga.pop("censorship") == 1, "Alive", "Dead")
    tcga.to_csv(tmp_path / "tcga.csv", index=False)
    train = _synthetic(n=150, censor_high=200, seed=8, time_decimals=1)
    pd.DataFrame({"submitter_id": train["case_ids"], "OS.time": train["time"] * 30.4375,
                  "vital_status": np.where(train["event"], "Dead", "Alive")}).to_csv(tmp_path / "train.csv", index=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    out = tmp_path / "ev"
    flags = ["--case-column", "submitter_id", "--time-column", "OS.time", "--time-unit", "days",
             "--event-column", "vital_status"]
    assert main(["evaluate", "--predictions", str(preds), "--clinical", str(tmp_path / "tcga.csv"), "--train-clinical",
                 str(tmp_path / "train.csv"), "--bootstrap", "0", "--groups", "quartiles", "--out", str(out), *flags]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["censoring_distribution"].startswith(f"the training cohort ({tmp_path / 'train.csv'}, 150 patients)")
    assert [g["name"] for g in report["risk_groups"]["groups"]] == ["Q1", "Q2", "Q3", "Q4"]
    times = _within(data)
    y, y_train = Surv.from_arrays(data["event"], data["time"]), Surv.from_arrays(train["event"], train["time"])
    assert report["figures"]["uno_c_index"]["value"] == pytest.approx(
        concordance_index_ipcw(y_train, y, data["risk"], tau=times[-1])[0], abs=1e-6)
    assert report["figures"]["harrell_c_index"]["ci95"] is None
    assert any("figures skipped: matplotlib is not installed" in n for n in report["notes"])
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "summary.txt"]


def _refused(capsys, *argv) -> str:
    assert main(["evaluate", *map(str, argv)]) == 2
    return capsys.readouterr().err


def _edit(path, **columns):
    frame = pd.read_csv(path, dtype={"case_id": str})
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)


def test_bad_input_is_refused_with_its_reason(tmp_path, capsys):
    preds, clinical, data = _write_tables(tmp_path, n=30)
    base = ["--predictions", preds, "--clinical", clinical, "--bootstrap", "0", "--out", tmp_path / "out"]

    censored = tmp_path / "censored.csv"
    pd.read_csv(clinical).assign(censorship=1).to_csv(censored, index=False)
    err = _refused(capsys, "--predictions", preds, "--clinical", censored, "--out", tmp_path / "out")
    assert f"{censored}: no events: all 30 evaluated patients are censored" in err

    alive = tmp_path / "alive.csv"
    pd.read_csv(clinical).drop(columns="censorship").assign(vital_status="Alive").to_csv(alive, index=False)
    err = _refused(capsys, "--predictions", preds, "--clinical", alive, "--event-column", "vital_status",
                   "--out", tmp_path / "out")
    assert "no events: all 30 evaluated patients are censored" in err

    err = _refused(capsys, *base, "--times", "200,300")
    assert "none of the reported times (200, 300 months) lies within the follow-up" in err

    risks = pd.read_csv(preds)["risk"].to_numpy()
    _edit(preds, risk=np.r_[risks[:3], np.nan, risks[4:]])
    err = _refused(capsys, *base)
    assert f"{preds}: 'risk' must be a finite number; line 5 (case 'C0003') has nan" in err
    _edit(preds, risk=np.r_[risks[:3], np.inf, risks[4:]])
    assert "line 5 (case 'C0003') has inf" in _refused(capsys, *base)
    _edit(preds, risk=risks)

    ids = pd.read_csv(preds)["case_id"].to_numpy()
    _edit(preds, case_id=[*ids[:5], ids[0], *ids[6:]])
    assert f"{preds}: case_id 'C0000' appears more than once (lines 2, 7)" in _refused(capsys, *base)
    _edit(preds, case_id=[*ids[:5], "NOBODY", *ids[6:]])
    assert f"{preds}: 1 case(s) have no row in the clinical table {clinical}: 'NOBODY'" in _refused(capsys, *base)
    _edit(preds, case_id=ids)

    _edit(preds, risk_group="high")
    err = _refused(capsys, *base)
    assert f"{preds}: fewer than 2 risk groups" in err and "'risk_group' holds one group only ('high')" in err
    frame = pd.read_csv(preds).drop(columns="risk_group").assign(risk=1.5)
    frame.to_csv(preds, index=False)
    err = _refused(capsys, *base, "--groups", "tertiles")
    assert "fewer than 2 risk groups" in err and "every patient falls into one group" in err

    _edit(preds, risk=risks, **{"S(12)": 1.2})
    assert f"{preds}: 'S(12)' must be a probability in [0, 1]; line 2" in _refused(capsys, *base)
    assert not (tmp_path / "out").exists()  # nothing half-written
