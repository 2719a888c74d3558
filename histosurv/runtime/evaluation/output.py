"""Writing an evaluation: ``evaluation.json`` (strict JSON), the PNG figures where matplotlib imports,
and the short summary a person reads first; all into a temporary folder renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...data.atomic import atomic_dir
from .figures import FiguresUnavailable, write_figures

__all__ = ["summary_text", "to_strict_json", "write_evaluation"]


def write_evaluation(report: dict, out: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """Writes ``out/evaluation.json``, ``out/summary.txt`` and the figures; returns the file names.

    A figure that matplotlib's absence skips is a note in the JSON itself, so the file says what is missing.
    """
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            written = write_figures(report, tmp)
        except FiguresUnavailable as e:
            written = []
            report["notes"].append(f"figures skipped: {e}")
        (tmp / "evaluation.json").write_text(to_strict_json(report) + "\n", encoding="utf-8")
        (tmp / "summary.txt").write_text(summary_text(report) + "\n", encoding="utf-8")
    return ["evaluation.json", "summary.txt", *written]


def to_strict_json(report: dict) -> str:
    """JSON without NaN or Infinity (``allow_nan=False``): one would mean a figure escaped its reason."""
    return json.dumps(report, indent=1, allow_nan=False, default=_plain)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


def summary_text(report: dict) -> str:
    c, f = report["cohort"], report["figures"]
    fu = c["follow_up_months"]
    b = report["bootstrap"]
    lines = [
        f"{c['n_patients']} patients, {c['n_events']} deaths, follow-up {fu['min']:g} to {fu['max']:g} months "
        f"(median {_num(fu['median_reverse_km'], 'not reached')} by reverse Kaplan-Meier)",
        f"risk: {report['sign']}",
        f"95% intervals: percentile bootstrap, {b['replicates']} replicates (seed {b['seed']})" if b["replicates"]
        else "no bootstrap intervals (--bootstrap 0)",
        f"IPCW censoring distribution (Uno, AUC, Brier): {report['censoring_distribution']}",
        _line("Harrell's c-index", f["harrell_c_index"]),
        _line(f"Uno's c-index (tau {f['uno_c_index']['tau_months']:g})", f["uno_c_index"]),
    ]
    lines += [_line(f"AUC({r['time_months']:g})", r) for r in f["time_dependent_auc"]["per_time"]]
    lines.append(_line("mean AUC", f["time_dependent_auc"]["mean"]))
    brier = f["brier_score"]
    if brier.get("per_time") is None:
        lines.append(f"  {'Brier score':<28} - ({brier['reason']})")
    else:
        lines += [_line(f"Brier({r['time_months']:g})", r) for r in brier["per_time"]]
        lo, hi = brier["integrated"].get("over_months", [0, 0])
        lines.append(_line(f"integrated Brier {lo:g}-{hi:g}", brier["integrated"]))
        cal = f["calibration"]
        at = ", ".join(f"{p['time_months']:g}" for p in cal["per_time"])
        lines.append(f"  calibration at {at} months by {cal['bins']}: evaluation.json, calibration.png")
    g = report["risk_groups"]
    lines.append(f"risk groups: {g['source']}; fitted on {g['fitted_on']}")
    for grp in g["groups"]:
        lines.append(f"  {grp['name']:<14} n={grp['n']:<5} deaths={grp['deaths']:<5} "
                     f"median survival {_num(grp['median_survival_months'], 'not reached')} months")
    lr = g["logrank"]
    lines.append(f"  log-rank chi2 {lr['chi2']:.3f}, dof {lr['dof']}, p {lr['p_value']:.3g}" if lr.get("p_value") is not None
                 else f"  log-rank: undefined ({lr['reason']})")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _line(label: str, figure: dict) -> str:
    if figure["value"] is None:
        return f"  {label:<28} - ({figure['reason']})"
    ci = figure.get("ci95")
    interval = f" (95% {ci[0]:.3f} to {ci[1]:.3f}, {figure['replicates_used']} of {figure['replicates']} replicates)" \
        if ci else ""
    return f"  {label:<28} {figure['value']:.3f}{interval}"


def _num(value, missing: str) -> str:
    return missing if value is None else f"{value:.1f}"
