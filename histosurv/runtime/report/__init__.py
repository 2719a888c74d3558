"""Per-case reports: one self-contained HTML file (risk, S(t), QC, heatmap, top patches, gene
attributions, provenance, data quality), for ``histosurv report``.

matplotlib draws the figures (``pip install 'histosurv[report]'``); it is imported when a report is
rendered, not when this package is.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...data.atomic import atomic_path
from .case import CaseReport, GeneAttributions, SlideView, SurvivalView, TopPatch
from .explanation import explain_case
from .gather import case_report
from .html import render_html

__all__ = ["CaseReport", "GeneAttributions", "SlideView", "SurvivalView", "TopPatch", "case_report", "explain_case",
           "render_html", "write_report"]


def write_report(path: str | os.PathLike, case: CaseReport) -> Path:
    """Renders ``case`` and writes it to ``path`` atomically (never a half-written page)."""
    path = Path(path)
    text = render_html(case)
    with atomic_path(path, suffix=".html") as tmp:
        tmp.write_text(text, encoding="utf-8")  # the page declares utf-8 (µm, ×), whatever the locale
    return path
