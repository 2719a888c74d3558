"""cuCIM's ``CuImage`` behind the :class:`SlideReader` interface (Aperio SVS, Philips and generic tiled
TIFF; JPEG, JPEG 2000, LZW, Deflate or raw tiles).

cuCIM decodes on the CPU without a GPU (the ``--no-deps`` wheel is enough) and on the GPU with
``device='cuda'`` where a driver, cupy and nvJPEG are present. Its batched ``read_region`` runs a pool
of decode workers, which is what keeps a slide's thousands of patch reads off the encoder's critical
path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import SlideError
from .reader import SlideReader, positive_float, register_reader

__all__ = ["CuCIMReader"]

_LENGTH_UNITS_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4}


@register_reader
class CuCIMReader(SlideReader):
    backend = "cucim"

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("cucim") is not None

    @classmethod
    def open(cls, path: Path, device: str = "cpu") -> "CuCIMReader":
        from cucim import CuImage

        try:
            image = CuImage(str(path))
        except Exception as e:  # noqa: BLE001 - cuCIM says only "Cannot load <path>!"
            raise SlideError(f"{path}: cuCIM cannot open it ({e})") from e
        reader = cls(path)
        reader._image = image
        res = image.resolutions
        reader.level_dimensions = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        reader.level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        reader.tile_sizes = tuple((int(w), int(h)) for w, h in res["level_tile_sizes"])
        reader.mpp, reader.magnification = _physical(image)
        if reader.level_count == 0 or reader.dimensions[0] <= 0:
            raise SlideError(f"{path}: cuCIM opened it but found no image levels")
        if device != "cpu":
            reader._enable_gpu(device)
        return reader

    def _enable_gpu(self, device: str) -> None:
        if importlib.util.find_spec("cupy") is None:
            raise SlideError("GPU decode needs cupy (pip install 'histosurv[gpu]')")
        try:  # nvJPEG fails here, not at import, when there is no usable GPU
            self._image.read_region((0, 0), (16, 16), 0, device="cuda")
        except Exception as e:  # noqa: BLE001
            raise SlideError(f"{self.path}: cuCIM cannot decode on the GPU here ({e})") from e
        self.device = device

    def _read(self, location, size, level) -> np.ndarray:
        region = self._image.read_region(location=tuple(location), size=tuple(size), level=level, device=self._cucim_device)
        return self._to_host(region)

    def _read_many(self, locations, size, level, batch_size, num_workers) -> Iterator[np.ndarray]:
        if len(locations) == 1:  # cuCIM refuses a one-location list with zero workers; keep it simple
            yield self._read(tuple(locations[0]), size, level)[None]
            return
        batches = self._image.read_region(
            location=[(int(x), int(y)) for x, y in locations],
            size=tuple(size),
            level=level,
            num_workers=num_workers,
            batch_size=batch_size,
            drop_last=False,
            device=self._cucim_device,
        )
        for batch in batches:
            # The iterator decodes the next batches into the same buffers: copy out before moving on,
            # or earlier batches silently change (checked on cuCIM 26.10).
            array = self._to_host(batch)
            yield array if array.ndim == 4 else array[None]

    @property
    def _cucim_device(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def _to_host(self, region) -> np.ndarray:
        if self._cucim_device == "cuda":
            import cupy

            return cupy.asnumpy(cupy.asarray(region))[..., :3]
        return np.array(region, copy=True)[..., :3]

    def associated_image_names(self) -> list[str]:
        return sorted(self._image.associated_images)

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self._image.associated_images:
            raise SlideError(f"{self.path}: no associated image {name!r} (it has {self.associated_image_names()})")
        return np.array(self._image.associated_image(name), copy=True)[..., :3]

    def close(self) -> None:
        image, self._image = getattr(self, "_image", None), None
        if image is not None and hasattr(image, "close"):
            image.close()


def _physical(image) -> tuple[float | None, float | None]:
    """(µm per level-0 pixel, objective power) from vendor metadata, else the TIFF resolution tags."""
    meta = image.metadata
    aperio = meta.get("aperio", {}) if isinstance(meta, dict) else {}
    mpp = positive_float(aperio.get("MPP"))
    magnification = positive_float(aperio.get("AppMag"))
    if mpp is None:
        units = image.spacing_units()
        spacing = image.spacing()
        unit = str(units[0]).lower() if units else ""
        if unit in _LENGTH_UNITS_UM and spacing:
            mpp = positive_float(spacing[0] * _LENGTH_UNITS_UM[unit])
    return mpp, magnification

