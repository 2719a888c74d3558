"""Evaluating any predictions table against a clinical table, as a statistician would (``histosurv
evaluate``): Harrell's and Uno's c-index, time-dependent AUC, the Brier score, calibration, Kaplan-Meier
curves by risk group with the log-rank test, and bootstrap intervals; numpy only (no torch, no
``export/``), matplotlib for the optional figures.

    cohort = load_cohort("risks.csv", "clinical.csv")
    report = evaluate(cohort, EvaluationSettings(times=(12, 24, 36), bootstrap=1000, seed=0))
    write_evaluation(report, "evaluation/")
"""

from __future__ import annotations

from .inputs import DEFAULT_TIMES, EvaluationCohort, Outcomes, load_cohort, parse_times, read_outcomes
from .output import summary_text, to_strict_json, write_evaluation
from .report import SCHEMA, EvaluationSettings, evaluate
from .risk_groups import GROUPINGS

__all__ = [
    "DEFAULT_TIMES", "GROUPINGS", "SCHEMA", "EvaluationCohort", "EvaluationSettings", "Outcomes", "evaluate",
    "load_cohort", "parse_times", "read_outcomes", "summary_text", "to_strict_json", "write_evaluation",
]
