"""OpenSlide behind the :class:`SlideReader` interface: the fallback for vendor formats cuCIM has no
plugin for (Hamamatsu .ndpi, MIRAX .mrxs, Leica .scn, Ventana .bif, ...).

``openslide.OpenSlide`` is used, never ``open_slide``: the latter falls back to PIL and would accept a
PNG renamed .svs as a "slide" with no µm/px.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ...errors import SlideError
from .reader import SlideReader, positive_float, register_reader

__all__ = ["OpenSlideReader"]


@register_reader
class OpenSlideReader(SlideReader):
    backend = "openslide"

    @classmethod
    def is_installed(cls) -> bool:
        if importlib.util.find_spec("openslide") is None:
            return False
        try:  # the Python package imports only when the C library (openslide-bin) is found
            import openslide  # noqa: F401
        except (ImportError, OSError):
            return False
        return True

    @classmethod
    def open(cls, path: Path, device: str = "cpu") -> "OpenSlideReader":
        import openslide

        if device != "cpu":
            raise SlideError(f"OpenSlide decodes on the CPU only; use the cucim reader for device {device!r}")
        try:
            slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as e:
            raise SlideError(f"{path}: OpenSlide cannot open it ({type(e).__name__}: {e})") from e
        reader = cls(path)
        reader._slide = slide
        reader.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        reader.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        props = slide.properties
        reader.mpp = positive_float(props.get(openslide.PROPERTY_NAME_MPP_X))
        reader.magnification = positive_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        return reader

    def _read(self, location, size, level) -> np.ndarray:
        import openslide

        try:
            image = self._slide.read_region(tuple(location), level, tuple(size))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: OpenSlide read failed ({e}); the file is probably damaged or truncated") from e
        return _rgb(image)

    def associated_image_names(self) -> list[str]:
        return sorted(self._slide.associated_images)

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self._slide.associated_images:
            raise SlideError(f"{self.path}: no associated image {name!r} (it has {self.associated_image_names()})")
        return _rgb(self._slide.associated_images[name])

    def close(self) -> None:
        slide, self._slide = getattr(self, "_slide", None), None
        if slide is not None:
            slide.close()


def _rgb(image) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; transparent pixels (outside scanned areas) become white."""
    rgba = np.asarray(image)
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb

