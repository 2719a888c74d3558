"""PNG figures of an evaluation, drawn from its JSON alone: Kaplan-Meier curves by risk group,
calibration at each reported time, and the time-dependent AUC.

matplotlib is optional (``pip install 'histosurv[report]'``): it is imported here only, and
:func:`write_figures` raises :class:`FiguresUnavailable` where it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["FIGURES", "FiguresUnavailable", "write_figures"]

FIGURES = ("km_by_group.png", "calibration.png", "td_auc.png")
INSTALL_REPORT = "pip install 'histosurv[report]'"


class FiguresUnavailable(ImportError):
    """matplotlib cannot be imported."""


def write_figures(report: dict, folder: Path) -> list[str]:
    """Writes the figures the report has data for into ``folder``; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never a display, even where one is set
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FiguresUnavailable(f"matplotlib is not installed ({INSTALL_REPORT})") from e
    written = []
    for name, draw in (("km_by_group.png", _km_by_group), ("calibration.png", _calibration), ("td_auc.png", _td_auc)):
        fig = draw(plt, report)
        if fig is None:
            continue
        fig.savefig(folder / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written


def _km_by_group(plt, report: dict):
    groups = report["risk_groups"]
    fig, (ax, table) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    from matplotlib.ticker import MaxNLocator

    end = max(max(g["kaplan_meier"]["time"]) for g in groups["groups"])
    ticks = [x for x in MaxNLocator(6).tick_values(0, end) if 0 <= x <= end]
    for row, g in enumerate(groups["groups"]):
        km = g["kaplan_meier"]
        t, s = np.r_[0.0, km["time"]], np.r_[1.0, km["survival"]]
        line, = ax.step(t, s, where="post", label=f"{g['name']} (n={g['n']}, deaths {g['deaths']})")
        cens = np.asarray(km["censored"]) > 0
        ax.plot(np.asarray(km["time"])[cens], np.asarray(km["survival"])[cens], "|", color=line.get_color(), ms=8)
        at_risk = [_at_risk(km, x) for x in ticks]
        for x, n in zip(ticks, at_risk):
            table.text(x, row, str(n), ha="center", va="center", color=line.get_color(), fontsize=8)
    lr = groups["logrank"]
    p = f"log-rank p = {lr['p_value']:.3g} (chi2 {lr['chi2']:.2f}, {lr['dof']} dof)" if lr.get("p_value") is not None \
        else f"log-rank undefined: {lr['reason']}"
    ax.set_title(f"Kaplan-Meier by risk group: {p}", fontsize=10)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8, title=groups["source"], title_fontsize=7)
    table.set_ylim(len(groups["groups"]) - 0.5, -0.5)
    table.set_yticks(range(len(groups["groups"])), [g["name"] for g in groups["groups"]], fontsize=8)
    table.set_xticks(ticks)
    table.set_xlabel("months")
    table.set_title("number at risk", fontsize=8, loc="left")
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    table.tick_params(axis="y", length=0)
    return fig


def _at_risk(km: dict, t: float) -> int:
    times = np.asarray(km["time"])
    k = int(np.searchsorted(times, t, side="left"))
    return int(km["at_risk"][k]) if k < times.size else 0


def _calibration(plt, report: dict):
    cal = report["figures"]["calibration"]
    if cal.get("per_time") is None:
        return None
    panels = cal["per_time"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        bins = [b for b in panel["bins"] if b["observed"] is not None]
        pred = [b["predicted"] for b in bins]
        obs = [b["observed"] for b in bins]
        err = [1.96 * b["observed_se"] for b in bins]
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.errorbar(pred, obs, yerr=err, fmt="o", ms=4, capsize=2)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"S({panel['time_months']:g})", fontsize=10)
        ax.set_xlabel("predicted (mean of bin)")
    axes[0][0].set_ylabel("observed (Kaplan-Meier, 95%)")
    fig.suptitle(f"Calibration by {cal['bins']}", fontsize=10)
    return fig


def _td_auc(plt, report: dict):
    auc = report["figures"]["time_dependent_auc"]
    rows = [r for r in auc["per_time"] if r["value"] is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    t = [r["time_months"] for r in rows]
    v = [r["value"] for r in rows]
    lo = [r["value"] - r["ci95"][0] if r.get("ci95") else 0 for r in rows]
    hi = [r["ci95"][1] - r["value"] if r.get("ci95") else 0 for r in rows]
    ax.errorbar(t, v, yerr=[lo, hi], fmt="o-", capsize=3, label="AUC(t), 95% bootstrap")
    if auc["mean"]["value"] is not None:
        ax.axhline(auc["mean"]["value"], ls="--", lw=1, label=f"mean AUC {auc['mean']['value']:.3f}")
    ax.axhline(0.5, color="grey", lw=1, ls=":", label="chance")
    ax.set_ylim(0, 1)
    ax.set_xlabel("months")
    ax.set_ylabel("cumulative/dynamic AUC")
    ax.set_title("Time-dependent AUC (deaths by t vs alive after t)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return fig
