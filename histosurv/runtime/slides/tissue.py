"""Tissue detection on a low-resolution view of the slide, as CLAM does it.

saturation (HSV S, 0-255) -> median blur -> threshold -> closing -> drop small tissue specks ->
fill small holes. Stained tissue is saturated and glass is grey-white, so saturation separates them
better than brightness does, and it ignores the scanner's uneven white balance.

The threshold is Otsu's on the blurred saturation, clipped to [8, 25]: glass rarely exceeds 8 (CLAM's
fixed threshold) and stained tissue, loose stroma included, rarely falls under 25. Unclipped, Otsu
splits whatever two classes it finds: on the bundled CMU slide it picks 46 and cuts the loose stroma
away; on a slide of nearly all tissue, or of blank glass, it splits tissue from tissue or noise from
noise. ``threshold=<number>`` gives a fixed threshold instead, as CLAM does.

The same code runs on numpy/scipy/scikit-image and, with ``device='cuda'``, on cupy /
cupyx.scipy.ndimage / cucim.skimage, so the CPU and GPU masks are the same algorithm.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ...errors import InputError, SlideError
from .reader import SlideReader

__all__ = ["TissueConfig", "TissueMask", "tissue_mask", "mask_from_rgb", "gpu_available"]


@dataclass(frozen=True)
class TissueConfig:
    downsample: float = 32.0  # mask pixels per level-0 pixel (CLAM: the level nearest 64x)
    threshold: float | str = "otsu"  # saturation 0-255, or "otsu"
    otsu_min: float = 8.0  # clip range for Otsu's threshold (see the module docstring)
    otsu_max: float = 25.0
    median: int = 7  # median-blur window, mask pixels (odd)
    close: int = 2  # closing radius, mask pixels
    min_tissue_um2: float = 20_000.0  # tissue specks smaller than this are dropped (~1 patch at 20x)
    min_hole_um2: float = 20_000.0  # holes smaller than this are filled

    def __post_init__(self):
        if isinstance(self.threshold, str) and self.threshold != "otsu":
            raise InputError(f"tissue threshold must be 'otsu' or a number 0-255, got {self.threshold!r}")
        if self.downsample < 1:
            raise InputError(f"tissue mask downsample must be at least 1, got {self.downsample}")
        if self.median < 1 or self.median % 2 == 0:
            raise InputError(f"median window must be a positive odd number, got {self.median}")


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (h, w); pixel (i, j) covers level-0 [j*downsample, (j+1)*downsample) etc.
    downsample: float
    threshold: float
    device: str
    seconds: float = 0.0

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fraction_in(self, coords: np.ndarray, size_level0: float) -> np.ndarray:
        """Fraction of tissue under each level-0 square (x, y, size) — one lookup per square, through
        a summed-area table, so a 100k-patch grid costs milliseconds."""
        h, w = self.mask.shape
        table = np.zeros((h + 1, w + 1), np.int64)
        table[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        x0 = np.clip(np.floor(c[:, 0] / self.downsample), 0, w).astype(np.int64)
        y0 = np.clip(np.floor(c[:, 1] / self.downsample), 0, h).astype(np.int64)
        x1 = np.clip(np.ceil((c[:, 0] + size_level0) / self.downsample), 0, w).astype(np.int64)
        y1 = np.clip(np.ceil((c[:, 1] + size_level0) / self.downsample), 0, h).astype(np.int64)
        area = (x1 - x0) * (y1 - y0)
        inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        return np.where(area > 0, inside / np.maximum(area, 1), 0.0)

    def describe(self) -> dict:
        return {
            "downsample": round(self.downsample, 4),
            "shape": list(self.mask.shape),
            "threshold": round(self.threshold, 3),
            "tissue_fraction": round(self.tissue_fraction, 4),
            "device": self.device,
        }


def gpu_available() -> bool:
    """cupy and cucim.skimage import and a CUDA device answers."""
    if importlib.util.find_spec("cupy") is None or importlib.util.find_spec("cucim") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device: either way, no GPU
        return False


def tissue_mask(reader: SlideReader, config: TissueConfig = TissueConfig(), device: str = "cpu") -> TissueMask:
    """The slide's tissue mask at about ``config.downsample``."""
    t0 = time.perf_counter()
    if reader.mpp is None:
        raise SlideError(f"{reader.path}: the slide records no µm per pixel; give it (e.g. --slide-mpp 0.25)")
    thumb, downsample = reader.thumbnail(config.downsample)
    mask, threshold = mask_from_rgb(thumb, config, reader.mpp * downsample, device)
    return TissueMask(mask, downsample, threshold, device, time.perf_counter() - t0)


def mask_from_rgb(rgb: np.ndarray, config: TissueConfig, mpp: float, device: str = "cpu") -> tuple[np.ndarray, float]:
    """(bool tissue mask, threshold used) of a uint8 RGB image whose pixels are ``mpp`` µm wide."""
    ops = _gpu_ops() if device.startswith("cuda") else _cpu_ops()
    xp = ops.xp
    rgb = xp.asarray(rgb)
    hi = rgb.max(axis=2).astype(xp.float32)
    lo = rgb.min(axis=2).astype(xp.float32)
    # HSV saturation on 0-255, as OpenCV (and so CLAM) computes it
    saturation = xp.where(hi > 0, 255.0 * (hi - lo) / xp.maximum(hi, 1.0), 0.0)
    saturation = xp.rint(saturation).astype(xp.uint8)
    blurred = ops.ndi.median_filter(saturation, size=config.median, mode="nearest")
    threshold = _threshold(blurred, config, ops)
    mask = blurred > threshold
    if config.close > 0:
        r = config.close
        footprint = xp.ones((2 * r + 1, 2 * r + 1), dtype=bool)
        # pad so the closing does not eat tissue that touches the image border
        padded = xp.pad(mask, r + 1, mode="edge")
        mask = ops.ndi.binary_closing(padded, structure=footprint)[r + 1 : -(r + 1), r + 1 : -(r + 1)]
    pixel_um2 = mpp * mpp
    mask = _drop_small(mask, config.min_tissue_um2 / pixel_um2, ops)
    mask = ~_drop_small(~mask, config.min_hole_um2 / pixel_um2, ops, keep_border=True)
    if device.startswith("cuda"):
        mask = xp.asnumpy(mask)
    return np.asarray(mask, dtype=bool), float(threshold)


def _threshold(saturation, config: TissueConfig, ops) -> float:
    if config.threshold != "otsu":
        return float(config.threshold)
    if int(saturation.max()) == int(saturation.min()):
        return config.otsu_min  # one grey level: nothing to split
    otsu = float(ops.threshold_otsu(saturation))
    return float(min(max(otsu, config.otsu_min), config.otsu_max))


def _drop_small(mask, min_pixels: float, ops, keep_border: bool = False):
    """``mask`` without its 8-connected components smaller than ``min_pixels``. With ``keep_border``
    components touching the image border stay (for holes: background touching the border is glass
    around the tissue, not a hole)."""
    if min_pixels <= 1:
        return mask
    xp = ops.xp
    labels, n = ops.ndi.label(mask, structure=xp.ones((3, 3), dtype=bool))
    if int(n) == 0:
        return mask
    sizes = xp.bincount(labels.ravel(), minlength=int(n) + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    if keep_border:
        border = xp.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep[xp.unique(border)] = True
        keep[0] = False
    return keep[labels]


def _cpu_ops() -> SimpleNamespace:
    import scipy.ndimage
    from skimage.filters import threshold_otsu

    return SimpleNamespace(xp=np, ndi=scipy.ndimage, threshold_otsu=threshold_otsu)


def _gpu_ops() -> SimpleNamespace:
    if not gpu_available():
        raise SlideError("a GPU tissue mask needs cupy, cucim and a CUDA device (pip install 'histosurv[gpu]')")
    import cupy
    import cupyx.scipy.ndimage
    from cucim.skimage.filters import threshold_otsu

    return SimpleNamespace(xp=cupy, ndi=cupyx.scipy.ndimage, threshold_otsu=threshold_otsu)

