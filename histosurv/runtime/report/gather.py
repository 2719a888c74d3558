"""A scored case (the pipeline's slide features and the predictor's risk) -> :class:`CaseReport`.

Nothing here scores anything: ``featurize_slide`` and ``FusionPredictor.patient`` have done that, as
for ``histosurv predict --slide``. This module re-opens each slide only for pictures: the thumbnail
the heatmap module paints on (``batch.heatmap``), and the crops of the most attended patches.

Survival outputs (S(t), risk group, the training cohort's Kaplan-Meier curve) are read with
``getattr``: model versions exported before they existed have none, and the report says so.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ... import __version__
from ..batch.heatmap import COLORBAR_HEIGHT, attention_image, heatmap_thumbnail
from ..slides import open_slide
from .case import CaseReport, GeneAttributions, SlideView, SurvivalView
from .explanation import top_patches_of

__all__ = ["case_report", "MAX_SIDE"]

MAX_SIDE = 1024  # thumbnail pixels on the long side: sharp in the page, small in the file


def case_report(predictor, encoder, slides, result, config, top_k: int = 8,
                genes: GeneAttributions | None = None, notes=()) -> CaseReport:
    """Args:
        predictor: the ``FusionPredictor`` that scored the case; encoder: the ``PatchEncoder``.
        slides: one ``SlideFeatures`` per slide, in ``result.slides``' order; result: the ``PatientRisk``.
        config: the ``SlideConfig`` the slides were read with (same reader, same µm/px override).
        genes: gene attributions (see ``explanation.explain_case``); notes: warnings for the reader.
    """
    head = predictor.version.info.survival
    labels = _tuple(getattr(head, "groups", None))  # None: a version without risk groups (or without a head)
    group = getattr(result, "risk_group", None)
    return CaseReport(
        case_id=result.case_id,
        risk=float(result.risk),
        risk_definition=head.risk_definition if head is not None else "not defined by this model version's manifest",
        risk_scale=head.risk_scale if head is not None else "",
        risk_group=_group_label(labels, group),
        group_labels=labels,
        cutoffs=_tuple(getattr(head, "cutoffs", None)),
        survival=SurvivalView(
            times=_tuple(getattr(head, "times", None)),
            survival=_array(getattr(result, "survival", None)),
            reference=getattr(head, "reference_curve", None),
            fitted_on=str(getattr(head, "fitted_on", "") or ""),
        ),
        slides=[_slide_view(f, r, config, top_k) for f, r in zip(slides, result.slides)],
        genes=genes,
        provenance=_provenance(predictor, encoder),
        notes=list(dict.fromkeys([*notes, *predictor.notes])),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _slide_view(features, risk, config, top_k: int) -> SlideView:
    grid, mask = features.grid, features.mask
    attention = _attention(risk.attention, len(grid))
    with open_slide(features.bag.source, config.reader, "cpu") as reader:
        if config.slide_mpp is not None:
            reader.mpp = float(config.slide_mpp)
        thumbnail, scale = heatmap_thumbnail(reader, MAX_SIDE)
        heatmap, top, why_not = None, [], "the model gives no patch attention"
        if attention is not None:
            painted = attention_image(reader, grid.coords, attention, grid.size_level0, MAX_SIDE)
            heatmap = painted[:-COLORBAR_HEIGHT]  # the report draws its own, labelled colour bar
            top, why_not = top_patches_of(reader, grid, attention, top_k, Path(features.bag.source).name)
    return SlideView(
        name=Path(features.bag.source).name, risk=float(risk.risk), thumbnail=thumbnail, scale=scale,
        mask=mask.mask, mask_downsample=mask.downsample, coords=grid.coords, patch_size_level0=grid.size_level0,
        tissue_fraction=mask.tissue_fraction, mpp=grid.mpp, slide_mpp=grid.slide_mpp, level=grid.level,
        dimensions=tuple(features.slide["dimensions"]), reader=features.slide["backend"],
        heatmap=heatmap, attention=attention, top_patches=top, top_patches_missing=why_not,
    )


def _attention(attention, n: int) -> np.ndarray | None:
    """One weight per patch, or None where the model gives none (or not one per patch)."""
    if attention is None:
        return None
    a = np.asarray(attention, dtype=np.float64)
    if a.size == n:
        return a.reshape(-1)
    if a.ndim == 2 and n in a.shape:  # (heads, N) or (N, heads): the heads' mean
        return a.mean(axis=0 if a.shape[1] == n else 1)
    return None


def _provenance(predictor, encoder) -> dict[str, str]:
    info = predictor.version.info
    facts = {
        "Model": f"{predictor.version.label} ({info.architecture})",
        "Model created": info.created or "not recorded",
        "Fusion engine": _engine(predictor.engine.describe()),
        "Patch encoder": encoder.record.describe(),
        "Encoder engine": _engine(encoder.engine.describe()),
        "Training bags made by": info.trained_on.describe() if info.trained_on is not None else "not recorded",
        "histosurv": __version__,
    }
    overrides = {**encoder.overrides, **predictor.overrides}
    if overrides:
        facts["Overrides"] = json.dumps(overrides, sort_keys=True)
    return facts


def _engine(d: dict) -> str:
    return f"{d.get('engine')} ({d.get('backend')}, {d.get('device')}, {d.get('precision')})"


def _group_label(labels, group) -> str | None:
    if group is None:
        return None
    index = int(np.asarray(group).reshape(-1)[0])
    if labels and 0 <= index < len(labels):
        return str(labels[index])
    return f"group {index}"


def _tuple(values) -> tuple | None:
    return tuple(values) if values is not None else None


def _array(values) -> np.ndarray | None:
    return np.asarray(values, dtype=np.float64).reshape(-1) if values is not None else None
