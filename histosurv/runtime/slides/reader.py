"""One small interface over whole-slide readers: cuCIM first, OpenSlide for what cuCIM cannot read.

Conventions are OpenSlide's, which every pathology tool shares: a location is the top-left corner in
level-0 pixels, a size is in pixels of the level being read, dimensions are (width, height), and
arrays come back as uint8 (height, width, 3) RGB.

Behaviour that differs between the libraries is made the same here, because a slide must give the
same patches whichever library read it:
- reads that run past the slide's edge are white outside it (cuCIM pads white, OpenSlide black, and
  cuCIM refuses windows larger than the whole level);
- µm per pixel is a float or None (OpenSlide gives a string, generic TIFFs often carry none);
- every failure is a :class:`SlideError` naming the file and the likely cause (cuCIM prints the real
  reason to stderr and raises ``ValueError: Cannot load``).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np

from ...errors import MissingInputError, SlideError

__all__ = ["SlideReader", "open_slide", "READERS", "OPENSLIDE_ONLY_SUFFIXES", "BACKGROUND"]

BACKGROUND = 255  # white glass: what a scanner sees outside the tissue

# Vendor formats cuCIM has no plugin for; OpenSlide reads them.
OPENSLIDE_ONLY_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")

READERS: dict[str, type["SlideReader"]] = {}


def register_reader(cls: type["SlideReader"]) -> type["SlideReader"]:
    READERS[cls.backend] = cls
    return cls


class SlideReader(abc.ABC):
    """A pyramidal slide opened for reading. Use as a context manager or call :meth:`close`."""

    backend: ClassVar[str]

    def __init__(self, path: Path):
        self.path = path
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.mpp: float | None = None  # µm per level-0 pixel
        self.magnification: float | None = None  # objective power, where the scanner recorded it
        self.device = "cpu"

    # -- what each backend provides ------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def is_installed(cls) -> bool: ...

    @classmethod
    @abc.abstractmethod
    def open(cls, path: Path, device: str = "cpu") -> "SlideReader":
        """Opens ``path`` for reading, decoding on ``device``; a :class:`SlideError` if it cannot."""

    @abc.abstractmethod
    def _read(self, location: tuple[int, int], size: tuple[int, int], level: int) -> np.ndarray:
        """A window that lies entirely inside ``level``: uint8 (h, w, 3)."""

    @abc.abstractmethod
    def associated_image_names(self) -> list[str]:
        """Side images stored with the slide: 'label', 'macro', 'thumbnail', ... ."""

    @abc.abstractmethod
    def associated_image(self, name: str) -> np.ndarray: ...

    def close(self) -> None:
        pass

    def _read_many(
        self, locations: np.ndarray, size: tuple[int, int], level: int, batch_size: int, num_workers: int
    ) -> Iterator[np.ndarray]:
        """Windows inside ``level``, in order, ``batch_size`` at a time. Backends with a faster batched
        path (cuCIM's worker pool) override this."""
        for start in range(0, len(locations), batch_size):
            yield np.stack([self._read((int(x), int(y)), size, level) for x, y in locations[start : start + batch_size]])

    # -- the interface -------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def read_region(self, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
        """uint8 (h, w, 3) window at ``location`` (level-0 pixels) of ``size`` (level pixels)."""
        self._check_level(level)
        w, h = (int(v) for v in size)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {size}")
        x, y = (int(v) for v in location)
        inside = self._inside(x, y, w, h, level)
        if inside is None:
            return np.full((h, w, 3), BACKGROUND, np.uint8)
        (ix, iy, iw, ih), (ox, oy) = inside
        if (iw, ih) == (w, h):
            return self._guarded_read((x, y), (w, h), level)
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        out[oy : oy + ih, ox : ox + iw] = self._guarded_read((ix, iy), (iw, ih), level)
        return out

    def read_regions(
        self,
        locations: Sequence[tuple[int, int]] | np.ndarray,
        size: tuple[int, int],
        level: int = 0,
        batch_size: int = 32,
        num_workers: int = 1,
    ) -> Iterator[np.ndarray]:
        """Yields uint8 (b, h, w, 3) batches of windows, in the order given. Every window must lie
        inside the level (a patch grid guarantees it), so that the fast batched path applies."""
        self._check_level(level)
        locations = np.asarray(locations, dtype=np.int64).reshape(-1, 2)
        size = (int(size[0]), int(size[1]))
        ds, (lw, lh) = self.level_downsamples[level], self.level_dimensions[level]
        corner = np.floor(locations / ds).astype(np.int64)  # in level pixels
        outside = (corner < 0).any(axis=1) | (corner[:, 0] + size[0] > lw) | (corner[:, 1] + size[1] > lh)
        if outside.any():
            x, y = (int(v) for v in locations[np.argmax(outside)])
            raise SlideError(f"{self.path}: window at {(x, y)} of size {size} is not inside level {level}")
        try:
            yield from self._read_many(locations, size, level, max(1, int(batch_size)), max(1, int(num_workers)))
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001 - every backend failure becomes one clear error
            raise self._read_error(e) from e

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (with 1% slack, since
        scanners report 4.0003 for 4)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, downsample: float, chunk: int = 2048) -> tuple[np.ndarray, float]:
        """The slide reduced by about ``downsample``: (uint8 image, the downsample it really has).

        Read from the closest finer level in chunks and area-averaged, so a slide without a low level
        (many small SVS files have one level) never needs its whole level 0 in memory."""
        level = self.best_level_for_downsample(downsample)
        factor = max(1, int(round(downsample / self.level_downsamples[level])))
        lw, lh = self.level_dimensions[level]
        ow, oh = max(1, lw // factor), max(1, lh // factor)
        out = np.empty((oh, ow, 3), np.uint8)
        step = max(factor, (chunk // factor) * factor)  # chunk edges on the reduction grid
        ds = self.level_downsamples[level]
        for y in range(0, oh * factor, step):
            for x in range(0, ow * factor, step):
                w, h = min(step, ow * factor - x), min(step, oh * factor - y)
                region = self._guarded_read((int(round(x * ds)), int(round(y * ds))), (w, h), level)
                blocks = region.reshape(h // factor, factor, w // factor, factor, 3).mean(axis=(1, 3))
                out[y // factor : (y + h) // factor, x // factor : (x + w) // factor] = np.round(blocks)
        return out, ds * factor

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "device": self.device,
            "dimensions": list(self.dimensions),
            "levels": [
                {"dimensions": list(d), "downsample": round(s, 4)} for d, s in zip(self.level_dimensions, self.level_downsamples)
            ],
            "mpp": self.mpp,
            "magnification": self.magnification,
            "associated_images": self.associated_image_names(),
        }

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path.name} {self.dimensions} levels={self.level_count} mpp={self.mpp}>"

    # -- helpers -------------------------------------------------------------------------------

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise SlideError(f"{self.path}: level {level} does not exist (the slide has levels 0-{self.level_count - 1})")

    def _inside(self, x: int, y: int, w: int, h: int, level: int):
        """The part of a window inside the level, in level-0 location + level size, and its offset
        in the window; None when the window misses the level."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = x / ds, y / ds  # window origin in level pixels
        x0, y0 = max(0, int(np.floor(lx))), max(0, int(np.floor(ly)))
        ox, oy = x0 - int(np.floor(lx)), y0 - int(np.floor(ly))
        iw, ih = min(w - ox, lw - x0), min(h - oy, lh - y0)
        if iw <= 0 or ih <= 0:
            return None
        inner_x = x if ox == 0 else int(round(x0 * ds))
        inner_y = y if oy == 0 else int(round(y0 * ds))
        return (inner_x, inner_y, iw, ih), (ox, oy)

    def _guarded_read(self, location, size, level) -> np.ndarray:
        try:
            region = self._read(location, size, level)
        except SlideError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._read_error(e) from e
        if region.shape != (size[1], size[0], 3):
            raise SlideError(f"{self.path}: {self.backend} returned shape {region.shape} for a {size} read at level {level}")
        return region

    def _read_error(self, e: Exception) -> SlideError:
        return SlideError(
            f"{self.path}: reading pixels failed ({type(e).__name__}: {e}); the file is probably damaged or "
            f"truncated (was it copied completely?)"
        )


def open_slide(path: str | os.PathLike, backend: str = "auto", device: str = "cpu") -> SlideReader:
    """Opens ``path`` with ``backend`` ('cucim', 'openslide' or 'auto': cuCIM where it can read the
    format, else OpenSlide). ``device='cuda'`` asks cuCIM to decode on the GPU."""
    from . import cucim_reader, openslide_reader  # noqa: F401 - register the backends

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: slide file not found")
    if not path.is_file():
        raise SlideError(f"{path}: not a file (a .mrxs slide is opened through its .mrxs file, not its folder)")
    if backend != "auto":
        if backend not in READERS:
            raise SlideError(f"unknown slide reader {backend!r}; known: {', '.join(sorted(READERS))}")
        if not READERS[backend].is_installed():
            raise SlideError(f"slide reader {backend!r} is not installed here")
        return READERS[backend].open(path, device)
    order = ["openslide"] if path.suffix.lower() in OPENSLIDE_ONLY_SUFFIXES else ["cucim", "openslide"]
    if device != "cpu":
        if "cucim" not in order:
            raise SlideError(f"{path}: GPU decode needs a format cuCIM reads, and {path.suffix} goes through OpenSlide")
        order = ["cucim"]
    order = [b for b in order if READERS[b].is_installed()]
    if not order:
        raise SlideError(f"{path}: no slide reader is installed (pip install cucim-cu12 or openslide-bin)")
    reasons = []
    for name in order:
        try:
            return READERS[name].open(path, device)
        except SlideError as e:
            reasons.append(f"{name}: {e.__cause__ or e}")
    raise SlideError(f"{path}: not a slide any installed reader can open ({'; '.join(reasons)})")


def positive_float(value) -> float | None:
    """A metadata value as a positive finite float, or None (vendors store numbers as strings)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None
