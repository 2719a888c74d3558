"""What one case's report shows, as plain data: numbers, strings and uint8 images, no model objects.

:func:`~histosurv.runtime.report.gather.case_report` fills it from a scored case;
:func:`~histosurv.runtime.report.html.render_html` draws it. Anything a model version cannot give
(S(t) before survival outputs, gene attributions without the explanation package) is None, and the
report says "not available for this model version" instead of leaving a hole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CaseReport", "SlideView", "TopPatch", "GeneAttributions", "SurvivalView"]


@dataclass
class TopPatch:
    """One of the patches the model attended to most, as the encoder saw it."""

    crop: np.ndarray  # uint8 (h, w, 3)
    weight: float  # its attention weight (a softmax over the slide's patches)
    rank: int  # 1 = most attended
    coords: tuple[int, int]  # level-0 top-left corner
    slide: str = ""


@dataclass
class GeneAttributions:
    """Signed effect on the risk of occluding each gene group and gene (positive: the case's values
    raise the risk), and what they were occluded with."""

    groups: list[tuple[str, float]]
    genes: list[tuple[str, float]]
    baseline: str  # what a gene was replaced with, in words
    grouping: str = ""  # where the groups come from, in words


@dataclass
class SurvivalView:
    """S(t) of the case at the version's reported times, with the training cohort's Kaplan-Meier curve."""

    times: tuple[float, ...] | None = None  # months
    survival: np.ndarray | None = None  # (T,) S at ``times``
    reference: dict | None = None  # {"time": [...months], "survival": [...]}: training cohort's KM
    fitted_on: str = ""  # which patients the reference and the cut-offs come from, in words

    @property
    def available(self) -> bool:
        return self.times is not None and self.survival is not None and len(self.times) == len(self.survival)


@dataclass
class SlideView:
    """One slide of the case: its QC picture, its heatmap and its data-quality facts."""

    name: str
    risk: float
    thumbnail: np.ndarray  # uint8 (h, w, 3)
    scale: tuple[float, float]  # thumbnail pixels per level-0 pixel (x, y)
    mask: np.ndarray  # bool (mh, mw) tissue mask
    mask_downsample: float  # level-0 pixels per mask pixel
    coords: np.ndarray  # (N, 2) level-0 top-left corners of the patches
    patch_size_level0: int
    tissue_fraction: float
    mpp: float  # µm/px of the patches as encoded
    slide_mpp: float | None
    level: int  # pyramid level the patches were read from
    dimensions: tuple[int, int]  # level-0 (w, h)
    reader: str
    heatmap: np.ndarray | None = None  # uint8 (h, w, 3): attention painted over the thumbnail (by rank)
    attention: np.ndarray | None = None  # (N,)
    top_patches: list[TopPatch] = field(default_factory=list)
    top_patches_missing: str | None = None  # why there are none, where there are none

    @property
    def n_patches(self) -> int:
        return int(len(self.coords))


@dataclass
class CaseReport:
    case_id: str
    risk: float
    risk_definition: str
    risk_scale: str = ""
    risk_group: str | None = None  # its label, e.g. "high"
    group_labels: tuple[str, ...] | None = None
    cutoffs: tuple[float, ...] | None = None
    survival: SurvivalView = field(default_factory=SurvivalView)
    slides: list[SlideView] = field(default_factory=list)
    genes: GeneAttributions | None = None
    provenance: dict[str, str] = field(default_factory=dict)  # label -> value, in display order
    notes: list[str] = field(default_factory=list)  # warnings and facts that could not be checked
    created: str = ""  # ISO timestamp
