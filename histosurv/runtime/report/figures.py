"""The report's pictures as PNG bytes, drawn with matplotlib (the ``report`` extra; Agg, never a display).

Colours: the heatmap's viridis (from ``batch.heatmap``, so the colour bar is the one painted), and for
signed gene attributions red = raises the risk, blue = lowers it (the usual reading of risk charts).
"""

from __future__ import annotations

import io

import numpy as np

from ..batch.heatmap import colormap
from .case import GeneAttributions, SlideView, SurvivalView

__all__ = ["survival_png", "qc_png", "heatmap_png", "genes_png", "image_png", "INSTALL_REPORT"]

INSTALL_REPORT = "pip install 'histosurv[report]'"
RAISES, LOWERS = "#c0392b", "#2e6da4"
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    # no Software chunk: the file stays free of any URL, even inside its metadata
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buffer.getvalue()


def image_png(image: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def survival_png(view: SurvivalView) -> bytes | None:
    """S(t) of the case over the training cohort's Kaplan-Meier curve; None when there is neither."""
    reference = view.reference if view.reference and len(view.reference.get("time", ())) else None
    if not view.available and reference is None:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.1))
    if reference is not None:
        t = np.r_[0.0, np.asarray(reference["time"], float)]
        s = np.r_[1.0, np.asarray(reference["survival"], float)]
        ax.step(t, s, where="post", color="#888888", lw=1.4, label="training cohort (Kaplan-Meier)")
    if view.available:
        t = np.r_[0.0, np.asarray(view.times, float)]
        s = np.r_[1.0, np.asarray(view.survival, float)]
        ax.plot(t, s, "-o", color="#1b2a49", lw=2, ms=4, label="this case, S(t)")
    ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.02), xlim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return _png(fig)


def _grid_rectangles(view: SlideView):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    sx, sy = view.scale
    side = view.patch_size_level0
    boxes = [Rectangle((x * sx, y * sy), side * sx, side * sy) for x, y in np.asarray(view.coords, float)]
    return PatchCollection(boxes, facecolor="none", edgecolor="#0a7d3b", linewidth=0.8, alpha=0.9)


def qc_png(view: SlideView) -> bytes:
    """The thumbnail, the tissue mask (tinted, outlined) and the patch grid."""
    plt = _plt()
    h, w = view.thumbnail.shape[:2]
    fig, ax = plt.subplots(figsize=(5.2, 5.2 * h / w if w else 5.2))
    ax.imshow(view.thumbnail)
    # the mask's pixel (i, j) covers level-0 [j*ds, (j+1)*ds): in thumbnail pixels, its extent
    mh, mw = view.mask.shape
    ds, (sx, sy) = view.mask_downsample, view.scale
    extent = (0, mw * ds * sx, mh * ds * sy, 0)
    tint = np.zeros((mh, mw, 4))
    tint[view.mask] = (0.1, 0.6, 0.9, 0.25)
    ax.imshow(tint, extent=extent, interpolation="nearest")
    if view.mask.any() and not view.mask.all():
        xs, ys = (np.arange(mw) + 0.5) * ds * sx, (np.arange(mh) + 0.5) * ds * sy  # mask pixel centres
        ax.contour(xs, ys, view.mask.astype(float), levels=[0.5], colors="#1565c0", linewidths=0.9)
    ax.add_collection(_grid_rectangles(view))
    ax.set(xlim=(0, w), ylim=(h, 0))
    ax.axis("off")
    return _png(fig)


def heatmap_png(view: SlideView) -> bytes | None:
    """The attention heatmap (painted by ``batch.heatmap``) with a labelled colour bar."""
    if view.heatmap is None:
        return None
    plt = _plt()
    from matplotlib.colors import ListedColormap

    h, w = view.heatmap.shape[:2]
    fig, ax = plt.subplots(figsize=(5.2, 5.2 * h / w + 0.7 if w else 5.9))
    ax.imshow(view.heatmap)
    ax.axis("off")
    cmap = ListedColormap(colormap(np.linspace(0, 1, 256)) / 255.0)
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, orientation="horizontal", fraction=0.05, pad=0.03)
    bar.set_ticks([0, 0.5, 1], labels=["lowest", "median", "highest"])
    bar.set_label("attention, by rank among this slide's patches", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return _png(fig)


def genes_png(genes: GeneAttributions, top: int = 15) -> bytes | None:
    """Signed bars: gene groups, then the genes of largest effect."""
    if not genes.groups and not genes.genes:
        return None
    plt = _plt()
    panels = [(title, rows) for title, rows in (("gene groups", genes.groups),
              (f"genes (largest {min(top, len(genes.genes))} of {len(genes.genes)})",
               sorted(genes.genes, key=lambda p: -abs(p[1]))[:top])) if rows]
    heights = [max(1.0, 0.22 * len(rows) + 0.6) for _, rows in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(5.4, sum(heights)), gridspec_kw={"height_ratios": heights})
    for ax, (title, rows) in zip(np.atleast_1d(axes), panels):
        names, values = [n for n, _ in rows][::-1], np.array([v for _, v in rows][::-1])
        ax.barh(names, values, color=np.where(values >= 0, RAISES, LOWERS), height=0.65)
        ax.axvline(0, color="#333333", lw=0.8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[-1].set_xlabel("contribution to the risk (+ raises it, − lowers it)", fontsize=8)
    fig.tight_layout()
    return _png(fig)
