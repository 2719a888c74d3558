"""The one place the report meets ``histosurv.runtime.explain``: its results become plain data.

The report depends only on what this adapter returns ((name, value) lists, a baseline sentence and
uint8 crops), so the explanation classes can change without touching the page. For a model without
genes, or a case scored without them, the gene chart says why it is missing.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .. import explain
from .case import GeneAttributions, TopPatch

__all__ = ["explain_case", "top_patches_of", "pairs", "CROP"]

CROP = 160  # px a side: shown at 112 CSS px, sharp on a high-density screen, small in the file


def explain_case(predictor, bag, genes, clinical) -> tuple[GeneAttributions | None, str | None]:
    """(gene attributions of the case on the predictor's engine, or None and the reason shown instead).

    ``bag``: the first slide's (occlusion reruns the fusion model with the same features; a case of
    several slides is explained on its first)."""
    if "genes" not in predictor.specs:
        return None, f"model {predictor.version.name!r} takes no genes"
    if genes is None:
        return None, "the case was scored without genes"
    return _attributions(explain.explain_genes(predictor, predictor.inputs_for(bag, genes, clinical))), None


def _attributions(result: Any) -> GeneAttributions:
    """``explain.genes.GeneAttributions`` (groups of GroupAttribution(name, genes, attribution), genes as a
    dict or None, baseline and grouping in words) as plain (name, value) lists."""
    groups = [(g.name, g.attribution) for g in _first(result, "groups") or ()]
    genes = _first(result, "genes") or {}
    return GeneAttributions(pairs(groups), pairs(genes), str(_first(result, "baseline") or "not stated"),
                            str(_first(result, "grouping") or ""))


def _first(obj: Any, *names: str):
    for name in names:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def pairs(values: Any) -> list[tuple[str, float]]:
    """(name, value) pairs from a mapping, a sequence of pairs, or objects with name and value."""
    if isinstance(values, dict):
        items: Iterable = values.items()
    else:
        items = ((getattr(v, "name", None), getattr(v, "value", None)) if not isinstance(v, (tuple, list)) else v
                 for v in values)
    return [(str(name), float(value)) for name, value in items]


def top_patches_of(reader, grid, attention: np.ndarray, k: int, slide: str = "") -> tuple[list[TopPatch], str | None]:
    """(the ``k`` most attended patches of a slide with their crops, or [] and the reason shown instead)."""
    if k < 1:
        return [], "none asked for (--top-k 0)"
    found = explain.top_patches(attention, grid.coords, k, slide=reader, patch_size=grid.size_level0, crop_size=CROP)
    return [TopPatch(np.asarray(p.crop, np.uint8), float(p.attention), int(p.rank), (int(p.x), int(p.y)), slide)
            for p in found], None
