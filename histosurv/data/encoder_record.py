"""What a patch encoder is, as one record: the fact that ties features to the model trained on them.

A survival model trained on one encoder's features gives meaningless risks on another's, even at the
same width, and so does a model fed patches cut at another scale than its training bags. So the same
record travels with the features everywhere:

* an encoder version in the model repository carries its own record (``VersionInfo.encoder``);
* ``tile`` and the slide pipeline write it into every h5 bag they make (attribute ``encoder_record``);
* training copies it from the bags into the run, and ``export`` into the survival model's manifest
  (``VersionInfo.trained_on``);
* the runtime compares the model's ``trained_on`` with the encoder about to make its features, and with
  the record of every bag it is given, and refuses a mismatch by naming the field.

A field may be unknown (None): bags from CLAM or older histosurv versions record little. Unknown
fields cannot be checked; the runtime warns about them instead of refusing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from .typed_json import FieldError, from_json_dict, to_json_dict

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "WeightsIdentity",
    "EncoderRecord",
    "Comparison",
    "MPP_TOLERANCE",
    "ATTRIBUTE",
    "record_from_attrs",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Scanners report 0.499 or 0.2527 for nominal 0.5 and 0.25 µm/px; the tiler reads a level within 2% of
# the target as is, so the same tolerance decides whether two scales are the same.
MPP_TOLERANCE = 0.02
ATTRIBUTE = "encoder_record"  # the h5 attribute holding the record as JSON


@dataclass(frozen=True)
class Preprocessing:
    """How a patch cut from the slide becomes the network's input (all of it inside the graph)."""

    resize: int | None = None  # side the cut patch is resized to; None: fed as cut
    resize_filter: str = "none"  # e.g. "bilinear-antialias", "bicubic"; "none" without a resize
    crop: int | None = None  # centre crop side after the resize; None: no crop
    mean: tuple[float, float, float] = IMAGENET_MEAN  # of [0, 1] RGB values
    std: tuple[float, float, float] = IMAGENET_STD

    def describe(self) -> str:
        steps = [f"resize to {self.resize} ({self.resize_filter})"] if self.resize else []
        steps += [f"centre crop {self.crop}"] if self.crop else []
        steps.append(f"mean {_numbers(self.mean)} std {_numbers(self.std)}")
        return ", ".join(steps)

    def same_as(self, other: "Preprocessing") -> bool:
        close = all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(self.mean + self.std, other.mean + other.std))
        return close and (self.resize, self.resize_filter, self.crop) == (other.resize, other.resize_filter, other.crop)


@dataclass(frozen=True)
class WeightsIdentity:
    """Which weights: ``sha256`` digests the tensors themselves (names, dtypes, shapes, bytes), so the
    same weights loaded from a .pth or a .safetensors file, or seeded twice alike, are one identity."""

    sha256: str | None  # None: unknown
    source: str  # "file", "seeded" (no pretrained weights), "synthetic" or "unknown"
    detail: str = ""  # the file and its own sha256, or the seed

    def describe(self) -> str:
        digest = f"sha256 {self.sha256[:12]}" if self.sha256 else "digest unknown"
        return f"{self.source} ({self.detail}; {digest})" if self.detail else f"{self.source} ({digest})"


@dataclass(frozen=True)
class EncoderRecord:
    architecture: str | None  # e.g. "resnet18"; "synthetic" for histosurv synth; None: unknown
    feature_dim: int | None
    patch_size: int | None = None  # side of a patch as cut from the slide (what the engine takes), px
    mpp: float | None = None  # µm per pixel the patches are cut at
    input_size: int | None = None  # side the network sees after resize/crop, px
    preprocessing: Preprocessing | None = None
    feature: str | None = None  # which output is the feature: "pooled", "cls", ...
    weights: WeightsIdentity | None = None
    name: str = ""  # the encoder's model name in the repository it came from (provenance)
    version: int | None = None  # and its version (provenance: versions of one encoder may share weights)

    def describe(self) -> str:
        parts = [self.architecture or "unknown encoder", f"{self.feature_dim}-d" if self.feature_dim else "width unknown"]
        if self.patch_size:
            parts.append(f"{self.patch_size} px patches" + (f" at {self.mpp:g} µm/px" if self.mpp else ""))
        if self.weights is not None:
            parts.append(f"weights {self.weights.describe()}")
        where = f" [{self.name} v{self.version}]" if self.name and self.version is not None else (f" [{self.name}]" if self.name else "")
        return ", ".join(parts) + where

    def compare(self, other: "EncoderRecord") -> "Comparison":
        """How features made as ``other`` says differ from ``self`` (the expected record): fields that
        differ, and fields one side does not know. Scale (µm/px) is compared separately: see
        :meth:`same_scale`."""
        differ, unknown = [], []
        for field_name, mine, theirs, same in self._identity_pairs(other):
            if mine is None or theirs is None:
                unknown.append(field_name)
            elif not same(mine, theirs):
                differ.append(f"{field_name}: {_shown(field_name, mine)} expected, {_shown(field_name, theirs)} here")
        return Comparison(tuple(differ), tuple(unknown))

    def _identity_pairs(self, other: "EncoderRecord"):
        eq = lambda a, b: a == b  # noqa: E731
        mine_w, theirs_w = self.weights, other.weights
        yield "architecture", self.architecture, other.architecture, eq
        yield "feature_dim", self.feature_dim, other.feature_dim, eq
        yield "weights", mine_w and mine_w.sha256, theirs_w and theirs_w.sha256, eq
        yield "patch_size", self.patch_size, other.patch_size, eq
        yield "input_size", self.input_size, other.input_size, eq
        yield "preprocessing", self.preprocessing, other.preprocessing, lambda a, b: a.same_as(b)
        yield "feature", self.feature, other.feature, eq

    def same_scale(self, mpp: float | None) -> bool | None:
        """Whether patches cut at ``mpp`` are at this record's scale; None when either is unknown."""
        if self.mpp is None or mpp is None:
            return None
        return abs(mpp / self.mpp - 1) <= MPP_TOLERANCE

    def with_provenance(self, name: str, version: int | None) -> "EncoderRecord":
        return replace(self, name=name, version=version)

    def to_json(self) -> str:
        return json.dumps(to_json_dict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "") -> "EncoderRecord":
        try:
            return from_json_dict(cls, json.loads(text))
        except (json.JSONDecodeError, FieldError) as e:
            raise ValueError(f"{where}: unreadable encoder record ({e})") from e


@dataclass(frozen=True)
class Comparison:
    differences: tuple[str, ...]  # "weights: sha256 ab12... expected, sha256 cd34... here"
    unknown: tuple[str, ...]  # fields one side does not record

    @property
    def same(self) -> bool:
        return not self.differences


def record_from_attrs(attrs: dict, feature_dim: int | None, where: str = "") -> tuple[EncoderRecord, bool]:
    """(the encoder record of a bag, whether it was recorded in full) from its h5 attributes.

    Bags written by this histosurv hold the whole record; bags from CLAM, TRIDENT or older histosurv
    versions hold some of it under their own names (patch size, µm/px, encoder name), which fill a
    partial record whose other fields are unknown."""
    if ATTRIBUTE in attrs:
        return EncoderRecord.from_json(str(attrs[ATTRIBUTE]), where), True
    architecture = attrs.get("encoder_architecture")
    if architecture is None and attrs.get("encoder") == "synthetic":  # histosurv synth before records
        architecture = "synthetic"
    mpp = attrs.get("mpp")
    magnification = attrs.get("target_magnification")  # TRIDENT's; 20x is 0.5 µm/px by convention
    if not _is_number(mpp) and _is_number(magnification) and magnification > 0:
        mpp = 10.0 / magnification
    partial = EncoderRecord(
        architecture=str(architecture) if architecture is not None else None,
        feature_dim=feature_dim,
        patch_size=_int_or_none(attrs.get("patch_size")),
        mpp=float(mpp) if _is_number(mpp) and mpp > 0 else None,
        name=str(attrs.get("encoder", "")),
    )
    return partial, False


def _shown(field_name: str, value) -> str:
    if field_name == "weights":
        return f"sha256 {value[:12]}"
    if isinstance(value, Preprocessing):
        return value.describe()
    return str(value)


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_or_none(value) -> int | None:
    return int(value) if _is_number(value) else None
