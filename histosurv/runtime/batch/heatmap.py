"""Attention heatmaps: where in the slide the model looked.

A MIL survival model pools its patches with attention weights; painting each patch's weight over the
slide's thumbnail is the interpretability view MIL papers show (CLAM, TransMIL, ...). Patches are
coloured with a viridis-like colormap and blended over the thumbnail; glass and tissue that were not
patches keep their own pixels, and a colour bar (low -> high) runs along the bottom.

Weights are shown by rank (their percentile among the slide's patches), not by value: attention is a
softmax over thousands of patches, so a few patches often hold most of the mass and a linear scale
would paint every other patch the lowest colour. Ranks keep the ordering visible everywhere and make
the picture independent of the softmax temperature; the cost is that absolute weights are not shown.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...data.atomic import atomic_path
from ...errors import InputError
from ..slides.reader import SlideReader

__all__ = ["write_heatmap", "attention_image", "heatmap_thumbnail", "rank_normalise", "colormap", "COLORBAR_HEIGHT"]

COLORBAR_HEIGHT = 12  # pixels

# Viridis sampled at 9 evenly spaced points: perceptually uniform and readable in greyscale and by
# colour-blind viewers, and its dark-purple -> yellow range stands apart from H&E pink and purple.
_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) to float RGB in 0..255, shape ``values.shape + (3,)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    pos = np.linspace(0.0, 1.0, len(_ANCHORS))
    return np.stack([np.interp(v, pos, _ANCHORS[:, c]) for c in range(3)], axis=-1)


def rank_normalise(attention: np.ndarray) -> np.ndarray:
    """Each value's mid-rank percentile in [0, 1]: the smallest 0, the largest 1, ties share one value.

    Mid-ranks (the mean of the positions a tie occupies) keep tied patches equal without favouring
    either end; a single patch, or all patches equal, land at 0.5 since nothing ranks them.
    """
    a = np.asarray(attention, dtype=np.float64)
    n = a.size
    if n == 1:
        return np.full(1, 0.5)
    s = np.sort(a)
    lo = np.searchsorted(s, a, side="left")
    hi = np.searchsorted(s, a, side="right") - 1
    return (lo + hi) / (2.0 * (n - 1))


def heatmap_thumbnail(reader: SlideReader, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """The thumbnail a heatmap is painted on, and its (x, y) scale: thumbnail pixels per level-0 pixel."""
    if int(max_side) < 1:
        raise InputError(f"max_side must be at least 1 pixel, got {max_side}")
    w0, h0 = reader.dimensions
    thumb, actual = reader.thumbnail(max(1.0, max(w0, h0) / int(max_side)))
    th, tw = thumb.shape[:2]
    if max(th, tw) > max_side:
        # the reader rounds to a whole reduction of a pyramid level, which can land above max_side
        from PIL import Image

        f = max_side / max(th, tw)
        size = (max(1, int(tw * f)), max(1, int(th * f)))
        thumb = np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX))
        return thumb, (size[0] / (tw * actual), size[1] / (th * actual))
    return thumb, (1.0 / actual, 1.0 / actual)


def _validate(coords, attention, patch_size_level0, alpha) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords)
    attention = np.asarray(attention)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"coords must have shape (N, 2) (level-0 top-left corners), got {coords.shape}")
    if attention.ndim != 1:
        raise InputError(f"attention must have shape (N,), one weight per patch, got {attention.shape}")
    if coords.shape[0] != attention.shape[0]:
        raise InputError(f"coords has {coords.shape[0]} patches but attention has {attention.shape[0]} weights")
    if attention.size == 0:
        raise InputError("attention and coords are empty: there are no patches to paint")
    if not np.issubdtype(attention.dtype, np.number):
        raise InputError(f"attention must be numbers, got dtype {attention.dtype}")
    if not np.isfinite(attention).all():
        bad = int((~np.isfinite(attention)).sum())
        raise InputError(f"attention must be finite; {bad} of {attention.size} weights are NaN or infinite")
    if not (np.issubdtype(coords.dtype, np.number) and np.isfinite(coords).all()):
        raise InputError("coords must be finite numbers (level-0 pixels)")
    if not (np.isfinite(patch_size_level0) and patch_size_level0 > 0):
        raise InputError(f"patch_size_level0 must be positive, got {patch_size_level0}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be within [0, 1], got {alpha}")
    return coords.astype(np.float64), attention.astype(np.float64)


def attention_image(
    reader: SlideReader,
    coords: np.ndarray,
    attention: np.ndarray,
    patch_size_level0: float,
    max_side: int = 2048,
    alpha: float = 0.45,
) -> np.ndarray:
    """The heatmap as uint8 (h + COLORBAR_HEIGHT, w, 3) RGB, where (w, h) is the thumbnail's size.

    ``coords`` are level-0 top-left corners (N, 2), ``attention`` one weight per patch (N,), and
    ``patch_size_level0`` a patch's side in level-0 pixels (``PatchGrid.size_level0``).
    """
    coords, attention = _validate(coords, attention, patch_size_level0, alpha)
    thumb, (sx, sy) = heatmap_thumbnail(reader, max_side)
    th, tw = thumb.shape[:2]
    # By rank, not value: softmax attention is dominated by a few patches (see the module docstring).
    ranks = rank_normalise(attention)
    colours = colormap(ranks)

    # Rounding both edges the same way makes neighbouring grid patches meet without gaps or overlap.
    x0 = np.round(coords[:, 0] * sx).astype(np.int64)
    y0 = np.round(coords[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.round((coords[:, 0] + patch_size_level0) * sx).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.round((coords[:, 1] + patch_size_level0) * sy).astype(np.int64))
    x0, x1 = np.clip(x0, 0, tw), np.clip(x1, 0, tw)
    y0, y1 = np.clip(y0, 0, th), np.clip(y1, 0, th)

    layer = np.zeros((th, tw, 3), np.float64)
    painted = np.zeros((th, tw), bool)
    # Ascending order: where patches overlap (an overlapping grid), the higher weight stays visible.
    for i in np.argsort(ranks, kind="stable"):
        if x1[i] > x0[i] and y1[i] > y0[i]:
            layer[y0[i] : y1[i], x0[i] : x1[i]] = colours[i]
            painted[y0[i] : y1[i], x0[i] : x1[i]] = True

    out = thumb.copy()
    blended = (1.0 - alpha) * thumb[painted].astype(np.float64) + alpha * layer[painted]
    out[painted] = np.clip(np.round(blended), 0, 255).astype(np.uint8)

    bar = colormap(np.linspace(0.0, 1.0, tw) if tw > 1 else np.ones(1))
    bar = np.broadcast_to(np.round(bar).astype(np.uint8), (COLORBAR_HEIGHT, tw, 3))
    return np.concatenate([out, bar], axis=0)


def write_heatmap(
    path: str | os.PathLike,
    reader: SlideReader,
    coords: np.ndarray,
    attention: np.ndarray,
    patch_size_level0: float,
    max_side: int = 2048,
    alpha: float = 0.45,
) -> Path:
    """Writes :func:`attention_image` as a PNG at ``path`` (atomically) and returns the path."""
    from PIL import Image

    image = attention_image(reader, coords, attention, patch_size_level0, max_side=max_side, alpha=alpha)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
