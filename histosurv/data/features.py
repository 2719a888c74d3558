"""Per-slide feature bags in CLAM's h5 layout.

CLAM's ``extract_features_fp.py`` writes ``<slide_id>.h5`` with datasets ``features`` (float32, N x D)
and ``coords`` (int32 or int64, N x 2, level-0 top-left corners of the patches). Most public survival
code and feature releases use this layout, so histosurv reads and writes it unchanged.

Metadata lives in attributes, in three places: CLAM's patching puts its own on the ``coords`` dataset
(``patch_size`` at ``patch_level``, ``downsample``, ``level_dim``, ``name``), TRIDENT adds
``patch_size_level0`` there and the encoder's name on ``features``, and histosurv keeps its full record
(the encoder record, µm/px, reader, the slide's sha256, ...) on the file root. Reading merges all
three (the root wins where names collide: there ``patch_size`` is the side as encoded, where CLAM's is
the side read at ``patch_level``); writing puts each where those tools look for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError, MissingInputError
from .atomic import atomic_path

__all__ = ["Bag", "read_bag", "write_bag", "validate_bag", "SLIDE_SUFFIXES", "bag_path", "clam_coords_attrs",
           "MAX_COORD", "coords_problem"]

# Patch positions are level-0 pixels of a slide: never negative, and no scanner makes a slide 10 million
# pixels across (2.5 m at 0.25 µm/px). Anything outside is a corrupted file or a malformed request.
MAX_COORD = 10_000_000


def coords_problem(coords: np.ndarray) -> str | None:
    """What is wrong with (N, 2) level-0 ``coords``, or None."""
    c = np.asarray(coords)
    if c.size == 0:
        return None
    low, high = int(c.min()), int(c.max())
    if low < 0:
        return f"'coords' has a negative position ({low}); positions are level-0 pixels from the slide's top-left corner"
    if high > MAX_COORD:
        return f"'coords' has a position of {high} px, beyond any slide (at most {MAX_COORD:,} px)"
    return None

# TRIDENT's attributes on the features dataset that mean something here (it also writes "name" and
# "savetodir", which are the slide's and the folder's and would shadow nothing useful)
_FEATURE_ATTRS = ("encoder",)

# Slide ids in MCAT-style clinical tables often keep the scanner file's extension.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".h5")


@dataclass
class Bag:
    """One slide's patches: features (N, D) float32 and level-0 coords (N, 2) int64."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def bag_path(features_dir: str | os.PathLike, slide_id: str) -> Path:
    """``features_dir/<slide_id without scanner extension>.h5``, as CLAM names them."""
    stem = str(slide_id)
    for suffix in SLIDE_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return Path(features_dir) / f"{stem}.h5"


def read_bag(path: str | os.PathLike, feature_dim: int | None = None) -> Bag:
    """Reads and validates one bag; ``feature_dim`` is the width the model expects, if known."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: feature file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise InputError(
                    f"{path}: no {' or '.join(repr(m) for m in missing)} dataset in the h5 file "
                    f"(found {sorted(f.keys())}); expected CLAM's layout: 'features' N x D, 'coords' N x 2"
                )
            groups = [k for k in ("features", "coords") if not isinstance(f[k], h5py.Dataset)]
            if groups:
                raise InputError(f"{path}: {' and '.join(repr(g) for g in groups)} must be a dataset (N rows), not an h5 group")
            features, coords = f["features"][()], f["coords"][()]
            attrs = {
                **{k: _plain(v) for k, v in f["coords"].attrs.items()},
                **{k: _plain(v) for k, v in f["features"].attrs.items() if k in _FEATURE_ATTRS},
                **{k: _plain(v) for k, v in f.attrs.items()},
            }
    except (OSError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: not a readable HDF5 feature file ({e}); re-extract its features") from e
    bag = Bag(features, coords, attrs, str(path))
    return validate_bag(bag, feature_dim)


def validate_bag(bag: Bag, feature_dim: int | None = None) -> Bag:
    """Checks shapes, dtypes and values; returns the bag with float32 features and int64 coords."""
    where, f, c = bag.source, np.asarray(bag.features), np.asarray(bag.coords)
    # CLAM stores one bag per slide; some tools keep a leading batch axis of 1.
    if f.ndim == 3 and f.shape[0] == 1:
        f = f[0]
    if c.ndim == 3 and c.shape[0] == 1:
        c = c[0]
    if f.ndim != 2:
        raise InputError(f"{where}: 'features' must be 2-D (N patches x D), got shape {f.shape}")
    if f.shape[0] == 0:
        raise InputError(f"{where}: empty bag: 'features' has no rows (no tissue patches were extracted)")
    if f.shape[1] == 0:
        raise InputError(f"{where}: 'features' has no columns (shape {f.shape}): each patch needs its D feature values")
    if feature_dim is not None and f.shape[1] != feature_dim:
        raise InputError(
            f"{where}: 'features' has {f.shape[1]} columns but the model expects {feature_dim}; "
            f"were these features made by another patch encoder?"
        )
    if not np.issubdtype(f.dtype, np.number):
        raise InputError(f"{where}: 'features' must be numeric, got dtype {f.dtype}")
    if c.shape != (f.shape[0], 2):
        raise InputError(f"{where}: 'coords' must have shape ({f.shape[0]}, 2) to match 'features', got {c.shape}")
    f = f.astype(np.float32, copy=False)
    bad = ~np.isfinite(f)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise InputError(
            f"{where}: 'features' holds {int(bad.sum())} NaN or infinite values in {rows.size} patches "
            f"(first at row {int(rows[0])})"
        )
    if not np.issubdtype(c.dtype, np.integer):
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise InputError(f"{where}: 'coords' must be whole level-0 pixel positions")
    problem = coords_problem(c)
    if problem:
        raise InputError(f"{where}: {problem}")
    return Bag(f, c.astype(np.int64, copy=False), dict(bag.attrs), where)


def write_bag(path: str | os.PathLike, bag: Bag) -> Path:
    """Writes ``bag`` atomically in CLAM's layout (chunked rows, as CLAM does), with CLAM's and
    TRIDENT's attributes on the datasets where their readers look, and every attribute on the root."""
    path = Path(path)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            chunk = (min(len(bag), 512), bag.dim)
            features = f.create_dataset("features", data=bag.features.astype(np.float32), chunks=chunk)
            coords = f.create_dataset("coords", data=bag.coords.astype(np.int64), chunks=(chunk[0], 2))
            for k, v in bag.attrs.items():
                if v is None:  # HDF5 has no null: an attribute that is not known is not written
                    continue
                f.attrs[k] = str(v) if isinstance(v, str) else v  # str subclasses (torch's version) as str
            for k, v in clam_coords_attrs(bag.attrs, Path(path).stem).items():
                coords.attrs[k] = v
            if "encoder" in bag.attrs:
                features.attrs["encoder"] = bag.attrs["encoder"]
    return path


def clam_coords_attrs(attrs: dict, name: str) -> dict:
    """CLAM's ``coords`` attributes from histosurv's: ``patch_size`` is the window side at
    ``patch_level`` and ``downsample`` that level's, so that CLAM's heatmap code, which multiplies the
    two, gets the level-0 footprint; TRIDENT's ``patch_size_level0`` says it outright."""
    if "patch_size_level0" not in attrs:
        return {}
    level0 = _positive_int(attrs, "patch_size_level0")
    read = _positive_int(attrs, "read_size" if "read_size" in attrs else "patch_size", level0)
    downsample = level0 / read
    return {
        "patch_size": read,
        "patch_level": _positive_int(attrs, "patch_level", 0, least=0),
        "downsample": np.array([downsample, downsample]),
        "patch_size_level0": level0,
        "name": name,
    }


def _positive_int(attrs: dict, key: str, default: int | None = None, least: int = 1) -> int:
    """A whole-number attribute (a bag read from another tool's file may hold text, a list or 0 there)."""
    value = attrs.get(key, default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and float(value).is_integer() and value >= least:
        return int(value)
    raise InputError(f"bag attribute '{key}' must be a whole number >= {least}, got {value!r}")


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
