"""The most attended patches of a bag, with their image crops read from the slide.

The heatmap (``runtime/batch/heatmap.py``) shows where the model looked over the whole slide; a reader
checking a prediction wants the few patches that weighed most, at full resolution. ``top_patches`` ranks
a bag's attention (the graph's ``attention`` output, or one row of an architecture's own attention such
as MCAT's per-gene-group co-attention) and, given the slide, reads each patch's square at level 0 from
its level-0 coordinates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...errors import InputError

__all__ = ["TopPatch", "top_patches", "DEFAULT_K", "DEFAULT_CROP"]

DEFAULT_K = 8
DEFAULT_CROP = 256  # px: crops larger than this are shrunk (a 40x slide's 512 px patch of a 20x encoder)


@dataclass
class TopPatch:
    rank: int  # 1 = the most attended
    index: int  # row of the patch in the bag
    x: int  # level-0 pixel coordinates of the patch's top-left corner
    y: int
    attention: float
    crop: np.ndarray | None = None  # (S, S, 3) uint8 where a slide was given

    def to_dict(self) -> dict:
        """Plain JSON; the crop is described by its shape, not inlined."""
        d = {"rank": self.rank, "index": self.index, "x": self.x, "y": self.y, "attention": self.attention}
        if self.crop is not None:
            d["crop_shape"] = list(self.crop.shape)
        return d


def top_patches(
    attention: np.ndarray,
    coords: np.ndarray,
    k: int = DEFAULT_K,
    slide=None,
    patch_size: int | None = None,
    crop_size: int | None = DEFAULT_CROP,
    reader: str = "auto",
) -> list[TopPatch]:
    """The ``k`` patches of highest ``attention`` (N,), most attended first (ties: the lower row first).

    Args:
        coords: (N, 2) level-0 (x, y) of each patch's top-left corner.
        slide: a path or an open ``SlideReader``; with it, each patch's crop is read (needs ``patch_size``).
        patch_size: a patch's side in level-0 pixels (a bag's ``patch_size_level0`` attribute).
        crop_size: the side crops are shrunk to when larger (None: as read).
    """
    attention = np.asarray(attention, np.float64).reshape(-1)
    coords = np.asarray(coords).reshape(-1, 2) if coords is not None else None
    if coords is None or len(coords) != len(attention):
        got = "none" if coords is None else len(coords)
        raise InputError(f"top patches: {len(attention)} attention weights but {got} coordinates")
    if k < 1:
        raise InputError(f"top patches: k must be at least 1, got {k}")
    order = np.argsort(-attention, kind="stable")[:k]
    patches = [TopPatch(r + 1, int(i), int(coords[i, 0]), int(coords[i, 1]), float(attention[i])) for r, i in enumerate(order)]
    if slide is not None:
        _read_crops(patches, slide, patch_size, crop_size, reader)
    return patches


def _read_crops(patches: list[TopPatch], slide, patch_size, crop_size, reader: str) -> None:
    from ..slides import SlideReader, open_slide

    if not patch_size or patch_size < 1:
        raise InputError(f"top patches: crops need the patch side in level-0 pixels (patch_size), got {patch_size}")
    side = int(round(patch_size))
    opened = slide if isinstance(slide, SlideReader) else open_slide(os.fspath(slide), reader)
    try:
        for p in patches:
            p.crop = _shrink(opened.read_region((p.x, p.y), (side, side), 0), crop_size)
    finally:
        if opened is not slide:
            opened.close()


def _shrink(crop: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or crop.shape[0] <= size:
        return crop
    from PIL import Image

    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BOX), np.uint8)
