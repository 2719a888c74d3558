"""ScoreSlide's explanation: occlusion gene attributions and top patch crops as ``histosurv.v1`` messages."""

from __future__ import annotations

import io

import numpy as np

from ..explain import Explanation, TopPatch
from ._proto import slide_service_pb2 as spb

__all__ = ["explanation_message", "MAX_CROPS"]

MAX_CROPS = 8  # PNG crops of <= 256 px: about 100-200 kB each, well under gRPC's 4 MiB message limit


def explanation_message(explanation: Explanation, crops: list[TopPatch]) -> spb.Explanation:
    message = spb.Explanation(unavailable=explanation.unavailable)
    for a in explanation.gene_attributions:
        message.gene_attributions.add(
            method=a.method, baseline=a.baseline, grouping=a.grouping, risk=a.risk, baseline_risk=a.baseline_risk,
            passes=a.passes, seconds=a.seconds,
            groups=[spb.GeneGroupAttribution(name=g.name, genes=g.genes, attribution=g.attribution,
                                             risk_at_baseline=g.risk_at_baseline or 0.0) for g in a.groups],
        )
    for patch in crops:
        if patch.crop is not None:
            message.crops.add(index=patch.index, png=_png(patch.crop))
    return message


def _png(crop: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
