"""The patch grid: which windows of a slide become patches, read at which level, at which size.

Patches are defined physically (default 256 px at 0.5 µm/px, i.e. "20x"), because slides come from
scanners at 0.25 (40x), 0.5 (20x) or odd values in between, and a patch encoder was trained at one
resolution. The grid is read from the coarsest pyramid level that is still at least as fine as the
target, and resized down where that level does not match it within ``mpp_tolerance``; never up,
which would invent detail.

Coordinates are level-0 top-left corners (CLAM's convention), in row-major order. Only windows lying
wholly inside the slide are used, so no patch depends on how a reader pads past the edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import InputError, SlideError
from .reader import SlideReader
from .tissue import TissueMask

__all__ = ["GridConfig", "PatchGrid", "plan_patch_grid", "choose_level"]


@dataclass(frozen=True)
class GridConfig:
    patch_size: int = 256  # pixels of each patch as the encoder sees it
    mpp: float = 0.5  # µm per pixel of those patches
    min_tissue: float = 0.5  # fraction of a patch the tissue mask must cover
    mpp_tolerance: float = 0.02  # a level within 2% of the target is read as is (0.499 is 0.5)

    def __post_init__(self):
        if self.patch_size < 16:
            raise InputError(f"patch size must be at least 16 px, got {self.patch_size}")
        if not self.mpp > 0:
            raise InputError(f"target µm per pixel must be positive, got {self.mpp}")
        if not 0 <= self.min_tissue <= 1:
            raise InputError(f"minimum tissue fraction must be within [0, 1], got {self.min_tissue}")


@dataclass
class PatchGrid:
    coords: np.ndarray  # (N, 2) int64 level-0 top-left corners, row-major
    tissue: np.ndarray  # (N,) tissue fraction under each patch
    level: int  # pyramid level the patches are read from
    read_size: int  # window side at that level, pixels
    patch_size: int  # side after resizing, pixels
    size_level0: int  # side in level-0 pixels (also the grid step)
    mpp: float  # µm per pixel of the patches as encoded (the real figure, e.g. 0.499, not the target)
    candidates: int = 0  # windows inside the slide before the tissue filter
    slide_mpp: float | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def resized(self) -> bool:
        return self.read_size != self.patch_size

    def attrs(self) -> dict:
        """What the h5 file records about the patches (CLAM's names where CLAM has one)."""
        return {
            "patch_size": self.patch_size,
            "patch_level": self.level,
            "patch_size_level0": self.size_level0,
            "read_size": self.read_size,
            "mpp": self.mpp,
            "slide_mpp": self.slide_mpp if self.slide_mpp is not None else float("nan"),
        }


def choose_level(reader: SlideReader, config: GridConfig) -> tuple[int, int]:
    """(level, window side at that level) for patches of ``config.patch_size`` px at ``config.mpp``."""
    if reader.mpp is None:
        raise SlideError(f"{reader.path}: the slide records no µm per pixel; give it (e.g. --slide-mpp 0.25)")
    fine_enough = [
        i for i in range(reader.level_count) if reader.level_mpp(i) <= config.mpp * (1 + config.mpp_tolerance)
    ]
    if not fine_enough:
        raise SlideError(
            f"{reader.path}: its finest level has {reader.mpp:.4g} µm/px, coarser than the {config.mpp:g} µm/px "
            f"patches asked for; patches would have to be upsampled (ask for --mpp {reader.mpp:.4g} or more)"
        )
    level = max(fine_enough, key=lambda i: reader.level_downsamples[i])
    ratio = config.mpp / reader.level_mpp(level)
    read_size = config.patch_size if abs(ratio - 1) <= config.mpp_tolerance else int(round(config.patch_size * ratio))
    return level, read_size


def plan_patch_grid(reader: SlideReader, mask: TissueMask, config: GridConfig = GridConfig()) -> PatchGrid:
    """Every window of the non-overlapping grid that lies inside the slide and holds enough tissue."""
    level, read_size = choose_level(reader, config)
    ds = reader.level_downsamples[level]
    size0 = int(round(read_size * ds))
    w0, h0 = reader.dimensions
    lw, lh = reader.level_dimensions[level]
    xs = np.arange(0, w0 - size0 + 1, size0, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, size0, dtype=np.int64)
    # a level's dimensions are rounded down; drop windows that would end past the level's last pixel
    xs = xs[np.floor(xs / ds).astype(np.int64) + read_size <= lw]
    ys = ys[np.floor(ys / ds).astype(np.int64) + read_size <= lh]
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    tissue = mask.fraction_in(coords, size0)
    keep = tissue >= config.min_tissue if config.min_tissue > 0 else np.ones(len(coords), bool)
    return PatchGrid(
        coords=coords[keep],
        tissue=tissue[keep],
        level=level,
        read_size=read_size,
        patch_size=config.patch_size,
        size_level0=size0,
        mpp=float(reader.level_mpp(level) * read_size / config.patch_size),
        candidates=len(coords),
        slide_mpp=reader.mpp,
    )
