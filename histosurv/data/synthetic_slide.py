"""Pyramidal TIFF slides whose every pixel is known, for tests and benchmarks.

Every level is computed from one deterministic function of level-0 coordinates: pixel (i, j) of the
level with downsample d covers the level-0 square [j*d, (j+1)*d) x [i*d, (i+1)*d) and takes the
pattern's value at its corner (j*d, i*d); whether it is tissue is decided at the square's centre, the
same test as :meth:`SyntheticSlide.tissue_mask`. Levels are therefore not averages of level 0, but a
reader test can predict exactly what any read at any level returns (:meth:`SyntheticSlide.expected_region`).

Patterns: ``"tissue"``, pink/purple H&E-like texture inside a union of ellipses (a
:class:`TissueShape`) on near-white, low-saturation glass; ``"coordinates"``, colours that encode the
level-0 position, for exact reader checks with lossless compression.

Layout choices, each one forced by a reader:

* every level is a page of the main IFD chain, reduced levels with ``subfiletype=1``: cuCIM and
  OpenSlide do not see pyramids kept in SubIFDs;
* JPEG tiles are stored as YCbCr with 2x2 chroma subsampling and the photometric tag says YCbCr
  (tifffile's default for RGB input). Tiles labelled RGB but holding YCbCr data decode with wrong
  colours in cuCIM and OpenSlide;
* µm per pixel goes into X/YResolution in pixels per centimetre for each level (level mpp = mpp * d);
  no Aperio description, so OpenSlide reads the file as ``generic-tiff``;
* deflate and LZW are written without a predictor: cuCIM 26.10 crashes on deflate + predictor tiles.

Tiles are rendered a few at a time on a small thread pool and streamed to tifffile, so memory stays
at a few tiles whatever the slide's size (a 40000 x 30000 JPEG slide: ~50 MB peak RSS, under a minute
on 2 cores); the file appears under its final name only once complete.
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from .atomic import atomic_path

__all__ = [
    "Ellipse",
    "TissueShape",
    "SyntheticSlide",
    "write_synthetic_slide",
    "write_blank_slide",
    "describe_synthetic_slide",
    "default_tissue",
    "BACKGROUND_RGB",
]

Pattern = Literal["tissue", "coordinates"]
Compression = Literal["jpeg", "deflate", "lzw"] | None

# Glass: HSV saturation 255 * (237 - 234) / 237 ~ 3, under the ~5/255 a tissue detector treats as empty.
# The noise added to it is grey (same on every channel), so it never raises the saturation.
BACKGROUND_RGB = (236, 234, 237)
_BACKGROUND_NOISE = 2  # +- grey levels

# Stain colours: eosin-pink stroma, haematoxylin-purple nuclei.
_EOSIN = (234.0, 160.0, 204.0)
_HAEMATOXYLIN = (92.0, 52.0, 142.0)

# Noise lattices are random tables indexed modulo prime sizes: a slide evaluated at level-0 coordinates
# that are multiples of 4, 16 or 64 still visits every entry (no short repeats at low levels).
_TABLE_SHAPE = (251, 257)


@dataclass(frozen=True)
class Ellipse:
    """An ellipse in level-0 pixels: centre, semi-axes, rotation in degrees (counter-clockwise)."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Inside test for broadcastable x (level-0 columns) and y (level-0 rows)."""
        dx, dy = x - self.cx, y - self.cy
        if self.angle:
            c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        return (dx / self.rx) ** 2 + (dy / self.ry) ** 2 <= 1.0

    def bbox(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the rotated ellipse."""
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        hx = math.hypot(self.rx * c, self.ry * s)
        hy = math.hypot(self.rx * s, self.ry * c)
        return self.cx - hx, self.cy - hy, self.cx + hx, self.cy + hy


@dataclass(frozen=True)
class TissueShape:
    """Tissue = union of ``ellipses`` minus union of ``holes`` (all in level-0 pixels). Empty: blank glass."""

    ellipses: tuple[Ellipse, ...] = ()
    holes: tuple[Ellipse, ...] = ()

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tissue test at level-0 points; x is a row vector of columns, y a column vector of rows."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y))
        inside = np.zeros(shape, bool)
        box = (float(np.min(x)), float(np.min(y)), float(np.max(x)), float(np.max(y))) if inside.size else None
        for e in self.ellipses:
            if box is None or _overlaps(e.bbox(), box):  # most tiles miss most ellipses: skip the 2-D test
                inside |= e.contains(x, y)
        for h in self.holes:
            if inside.any() and _overlaps(h.bbox(), box):
                inside &= ~h.contains(x, y)
        return inside

    def bbox_overlaps(self, box: tuple[float, float, float, float]) -> bool:
        return any(_overlaps(e.bbox(), box) for e in self.ellipses)


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def default_tissue(width: int, height: int) -> TissueShape:
    """Three pieces of tissue, one with a lumen, covering roughly a third of the slide."""
    w, h = width, height
    return TissueShape(
        ellipses=(
            Ellipse(0.30 * w, 0.40 * h, 0.20 * w, 0.28 * h, angle=20),
            Ellipse(0.68 * w, 0.55 * h, 0.17 * w, 0.22 * h, angle=-35),
            Ellipse(0.78 * w, 0.18 * h, 0.08 * w, 0.09 * h),
        ),
        holes=(Ellipse(0.30 * w, 0.42 * h, 0.05 * w, 0.07 * h),),
    )


@dataclass(frozen=True)
class SyntheticSlide:
    """What was written, and the helpers that say what a reader must find in it."""

    path: Path
    dimensions: tuple[int, int]  # level-0 (width, height)
    mpp: float  # µm per level-0 pixel
    downsamples: tuple[int, ...]
    level_dimensions: tuple[tuple[int, int], ...]
    tile: int
    compression: str | None
    jpeg_quality: int | None
    pattern: str
    tissue: TissueShape
    seed: int
    _tables: tuple[np.ndarray, ...] = field(repr=False, compare=False, default=())

    @property
    def level_count(self) -> int:
        return len(self.downsamples)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.downsamples[level]

    def expected_region(self, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
        """The (h, w, 3) uint8 pixels that a read at level-0 ``location`` of ``size`` at ``level`` returns.

        The window starts at level pixel (x // d, y // d) and must lie inside the level. cuCIM and
        tiffslide return exactly this for any location; OpenSlide only where x and y are multiples of d
        (otherwise it shifts the level by the sub-pixel remainder and interpolates). Exact for lossless
        compression; for JPEG it is the image before compression.
        """
        d = self.downsamples[level]
        (x, y), (w, h) = location, size
        col, row = x // d, y // d
        lw, lh = self.level_dimensions[level]
        if w <= 0 or h <= 0 or col < 0 or row < 0 or col + w > lw or row + h > lh:
            raise ValueError(
                f"window {size} at level-{level} pixel ({col}, {row}) is not inside the level's {lw} x {lh}"
            )
        return _render(self.pattern, self.tissue, self._tables, d, col, row, w, h)

    def tissue_mask(self, downsample: float) -> np.ndarray:
        """True tissue on the grid of ``downsample`` (any value, not only a level's): pixel (i, j) is tissue
        when the level-0 point at its centre, ((j + 0.5) * ds, (i + 0.5) * ds), is. Shape (ceil(H/ds), ceil(W/ds))."""
        width, height = self.dimensions
        cols = (np.arange(math.ceil(width / downsample)) + 0.5) * downsample
        rows = (np.arange(math.ceil(height / downsample)) + 0.5) * downsample
        if self.pattern != "tissue":
            return np.zeros((rows.size, cols.size), bool)
        return self.tissue.contains(cols[None, :], rows[:, None])

    def tissue_fraction(self, downsample: float | None = None) -> float:
        """Share of the slide's area that is tissue, measured on the ``downsample`` grid (default: the
        finest power of two whose grid has at most 4 million points)."""
        if downsample is None:
            width, height = self.dimensions
            downsample = 1
            while math.ceil(width / downsample) * math.ceil(height / downsample) > 4_000_000:
                downsample *= 2
        return float(self.tissue_mask(downsample).mean())


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    mpp: float = 0.25,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 4, 16, 64),
    compression: Compression = "jpeg",
    jpeg_quality: int = 90,
    pattern: Pattern = "tissue",
    tissue: TissueShape | None = None,
    seed: int = 0,
) -> SyntheticSlide:
    """Writes a tiled pyramidal TIFF at ``path`` and returns its description.

    ``tissue`` defaults to :func:`default_tissue` for the slide's size (``pattern="tissue"`` only); pass
    ``TissueShape()`` for a slide with no tissue. ``seed`` picks the texture. A level with
    downsample d is ceil(width / d) x ceil(height / d) pixels; readers report its downsample as the
    ratio of widths, which is exactly d only when d divides the width (and height).
    """
    slide = describe_synthetic_slide(
        path, width, height, mpp=mpp, tile=tile, downsamples=downsamples, compression=compression,
        jpeg_quality=jpeg_quality, pattern=pattern, tissue=tissue, seed=seed,
    )
    _write(slide)
    return slide


def describe_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    mpp: float = 0.25,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 4, 16, 64),
    compression: Compression = "jpeg",
    jpeg_quality: int = 90,
    pattern: Pattern = "tissue",
    tissue: TissueShape | None = None,
    seed: int = 0,
) -> SyntheticSlide:
    """The :class:`SyntheticSlide` that :func:`write_synthetic_slide` with the same arguments writes,
    without writing anything: for a caller that keeps a slide written earlier (the writer is
    deterministic, so the same arguments give the same file)."""
    downsamples = tuple(int(d) for d in downsamples)
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width} x {height}")
    if not downsamples or downsamples[0] != 1 or any(b <= a for a, b in zip(downsamples, downsamples[1:])):
        raise ValueError(f"downsamples must start at 1 and increase, got {downsamples}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF and JPEG 2x2 subsampling), got {tile}")
    if pattern not in ("tissue", "coordinates"):
        raise ValueError(f"pattern must be 'tissue' or 'coordinates', got {pattern!r}")
    if compression not in ("jpeg", "deflate", "lzw", None):
        raise ValueError(f"compression must be 'jpeg', 'deflate', 'lzw' or None, got {compression!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be within 1..100, got {jpeg_quality}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return SyntheticSlide(
        path=Path(path),
        dimensions=(width, height),
        mpp=float(mpp),
        downsamples=downsamples,
        level_dimensions=tuple((math.ceil(width / d), math.ceil(height / d)) for d in downsamples),
        tile=tile,
        compression=compression,
        jpeg_quality=jpeg_quality if compression == "jpeg" else None,
        pattern=pattern,
        tissue=_tissue_for(pattern, tissue, width, height),
        seed=seed,
        _tables=_noise_tables(seed),
    )


def _write(slide: SyntheticSlide) -> None:
    import tifffile  # only writers need it

    options: dict = {"compression": slide.compression}
    if slide.compression == "jpeg":
        options["compressionargs"] = {"level": slide.jpeg_quality}
    # No predictor for deflate or LZW: cuCIM 26.10 segfaults on tiles with deflate + horizontal predictor.

    workers = min(8, os.cpu_count() or 1)
    bigtiff = sum(w * h * 3 for w, h in slide.level_dimensions) > 2**31  # compressed size unknown up front
    with atomic_path(slide.path, suffix=".tif") as tmp, ThreadPoolExecutor(workers) as pool:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for d, (lw, lh) in zip(slide.downsamples, slide.level_dimensions):
                pixels_per_cm = 1e4 / (slide.mpp * d)
                tif.write(
                    _tiles(slide, d, lw, lh, pool, ahead=4 * workers),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(slide.tile, slide.tile),
                    photometric="rgb",  # with JPEG, tifffile stores YCbCr and tags it so
                    resolution=(pixels_per_cm, pixels_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if d == 1 else 1,
                    metadata=None,  # no JSON description: readers would show it as the slide's comment
                    software="histosurv synthetic_slide",
                    **options,
                )


def write_blank_slide(path: str | os.PathLike, width: int, height: int, **options) -> SyntheticSlide:
    """A slide of empty glass only (``pattern="tissue"`` with no tissue), for error-path tests."""
    return write_synthetic_slide(path, width, height, pattern="tissue", tissue=TissueShape(), **options)


def _tissue_for(pattern: str, tissue: TissueShape | None, width: int, height: int) -> TissueShape:
    if pattern != "tissue":
        if tissue is not None and tissue.ellipses:
            raise ValueError(f"a tissue shape only applies to pattern='tissue', not {pattern!r}")
        return TissueShape()
    return default_tissue(width, height) if tissue is None else tissue


def _tiles(
    slide: SyntheticSlide, d: int, lw: int, lh: int, pool: ThreadPoolExecutor, ahead: int
) -> Iterator[np.ndarray]:
    """The level's tiles in TIFF order, rendered up to ``ahead`` tiles in advance on ``pool`` (numpy
    releases the GIL); the bound keeps memory at a few tiles."""
    t = slide.tile
    pending: deque[Future] = deque()
    for row in range(0, lh, t):
        for col in range(0, lw, t):
            # Edge tiles are rendered past the level's edge too: readers crop them, and a continuous
            # texture compresses without JPEG ringing at the border.
            pending.append(pool.submit(_render, slide.pattern, slide.tissue, slide._tables, d, col, row, t, t))
            if len(pending) >= ahead:
                yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# --- the patterns ---------------------------------------------------------------------------------------


def _render(pattern: str, tissue: TissueShape, tables, d: int, col: int, row: int, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8 window of the level with downsample ``d`` starting at level pixel (col, row)."""
    x0 = (col + np.arange(w, dtype=np.int64)) * d  # level-0 coordinates of the pixels' corners
    y0 = (row + np.arange(h, dtype=np.int64)) * d
    if pattern == "coordinates":
        return _coordinates(x0, y0)
    return _tissue(tissue, tables, d, x0, y0)


def _coordinates(x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """R and G encode x0 and y0 so that a one-pixel shift at any level changes them: x0 + x0 // 64 grows
    by about d + d / 64 per level pixel, and at 64x by exactly 65, which is odd, so R repeats only every
    256 pixels (plain x0 & 255 would repeat every 4 pixels at 64x). B holds the coarse position, in
    4096 px blocks."""
    r = ((x0 + (x0 >> 6)) & 255).astype(np.uint8)
    g = ((y0 + (y0 >> 6)) & 255).astype(np.uint8)
    b = (((x0[None, :] >> 12) + 16 * (y0[:, None] >> 12)) & 255).astype(np.uint8)
    out = np.empty((y0.size, x0.size, 3), np.uint8)
    out[..., 0] = r[None, :]
    out[..., 1] = g[:, None]
    out[..., 2] = b
    return out


def _noise_tables(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    smooth = tuple(rng.random(_TABLE_SHAPE, dtype=np.float32) for _ in range(3))
    grain = rng.integers(-_BACKGROUND_NOISE, _BACKGROUND_NOISE + 1, _TABLE_SHAPE, dtype=np.int16)
    return (*smooth, grain)


def _value_noise(table: np.ndarray, cell: int, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1) with features about ``cell`` level-0 pixels wide (bilinear value noise)."""
    p, q = table.shape
    cx, cy = x0 // cell, y0 // cell
    fx, fy = _smoothstep((x0 % cell) / cell), _smoothstep((y0 % cell) / cell)
    # Interpolate between lattice rows over the whole (small) table width first, then gather and
    # interpolate columns: two full-size gathers instead of four.
    rows = table[cy % p] * (1 - fy)[:, None] + table[(cy + 1) % p] * fy[:, None]
    return rows[:, cx % q] * (1 - fx) + rows[:, (cx + 1) % q] * fx


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = t.astype(np.float32)
    return t * t * (3 - 2 * t)


def _tissue(tissue: TissueShape, tables, d: int, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    coarse, clusters, nuclei, grain = tables
    noise = grain[np.ix_(y0 % grain.shape[0], x0 % grain.shape[1])]
    out = np.empty((y0.size, x0.size, 3), np.uint8)
    for c, v in enumerate(BACKGROUND_RGB):
        out[..., c] = v + noise  # grey noise: equal on every channel, so saturation stays low

    # Tissue membership is tested at the centre of the level-0 square each pixel covers, the same test
    # as tissue_mask(d), so the written level and the mask agree pixel for pixel.
    half = d / 2
    box = (x0[0] + half, y0[0] + half, x0[-1] + half, y0[-1] + half)
    if not tissue.bbox_overlaps(box):
        return out
    inside = tissue.contains((x0 + half)[None, :], (y0 + half)[:, None])
    if not inside.any():
        return out

    shade = 0.82 + 0.18 * _value_noise(coarse, 512, x0, y0)  # staining intensity across the section
    density = _value_noise(clusters, 48, x0, y0)  # cellular vs. stromal areas
    blobs = _value_noise(nuclei, 7, x0, y0)  # nucleus-sized spots
    purple = np.clip((blobs - 0.75 + 0.35 * density) * 4.0, 0.0, 1.0)
    noise = noise.astype(np.float32)
    for c in range(3):  # channel by channel on 2-D float32 planes: a third of the memory traffic of (h, w, 3)
        value = (_EOSIN[c] + (_HAEMATOXYLIN[c] - _EOSIN[c]) * purple) * shade + noise
        np.copyto(out[..., c], np.clip(value, 0, 255).astype(np.uint8), where=inside)
    return out
