"""Which patch encoder makes a survival model's features, at which scale, and whether a bag fits it.

A model is served only with what it was trained with (DESIGN.md, Principles): the encoder its
training bags came from (architecture, width, weights, preprocessing) and their µm/px. This module is
the one place that decides it, for ``tile``, ``predict``, ``score`` and the server alike:

* :func:`choose_encoder` picks the encoder among a repository's (or a server's loaded) encoders and
  the µm/px to cut slides at, refusing an encoder that differs from the training one by naming the
  fields; ``mpp`` and ``allow_mismatch`` are the explicit overrides, which come back as notes to print
  and as ``overrides`` to record in every output made under them.
* :func:`check_bag` does the same for a bag of features read from an h5 file.

Facts one side does not record (older CLAM files, schema-1 manifests) cannot be checked: they are
reported in ``notes``, never silently treated as a match.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from ..data.encoder_record import EncoderRecord, record_from_attrs
from ..data.features import Bag
from ..errors import InputError, MismatchError, RepositoryError
from .repository import ModelRepository, ModelVersion

__all__ = ["DEFAULT_MPP", "EncoderChoice", "choose_encoder", "candidates", "check_bag", "ALLOW_FLAG"]

DEFAULT_MPP = 0.5  # 20x, CLAM's and most encoders' scale: used only when nothing records one
ALLOW_FLAG = "--allow-encoder-mismatch"


@dataclass(frozen=True)
class EncoderChoice:
    encoder: ModelVersion
    mpp: float  # µm per pixel to cut the slide's patches at
    notes: tuple[str, ...] = ()  # overrides in effect and facts that could not be checked, to print
    overrides: dict[str, str] = field(default_factory=dict)  # to record in every output made with it

    @property
    def record(self) -> EncoderRecord:
        """The record the features made with this choice carry (at the scale actually cut)."""
        return replace(self.encoder.encoder_record, mpp=self.mpp)


def choose_encoder(
    candidates: Sequence[ModelVersion],
    model: ModelVersion | None = None,
    name: str | None = None,
    mpp: float | None = None,
    allow_mismatch: bool = False,
    where: str = "the repository",
) -> EncoderChoice:
    """The encoder for ``model`` (or, without a model, the only encoder) among ``candidates``: the
    one named ``name``, else the one whose record matches the model's training bags. ``mpp`` cuts
    patches at another scale than the training one; ``allow_mismatch`` accepts another encoder."""
    encoders = [c for c in candidates if c.is_encoder]
    if model is not None and not model.takes("features"):
        raise InputError(f"model {model.name!r} takes no image features; it cannot score a slide")
    encoder = _named(candidates, name, where) if name else _pick(encoders, model, allow_mismatch, where)
    notes: list[str] = []
    overrides: dict[str, str] = {}
    if model is not None:
        _check_encoder(model, encoder, allow_mismatch, notes, overrides)
    scale, whose = _scale(model, encoder, notes)
    if mpp is not None and not _close(mpp, scale):
        notes.append(f"override: cutting patches at {mpp:g} µm/px; {whose} {scale:g} µm/px")
        overrides["mpp"] = f"{mpp:g} µm/px instead of {scale:g}"
        scale = mpp
    return EncoderChoice(encoder, float(scale), tuple(notes), overrides)


def candidates(repo: ModelRepository, name: str | None = None, version: int | None = None) -> list[ModelVersion]:
    """What :func:`choose_encoder` chooses among in a repository: every model's highest version, or
    the one pinned version of encoder ``name``."""
    if version is None:
        return repo.latest_versions()
    if not name:
        raise InputError("an encoder version goes with the encoder's name (--encoder)")
    return [repo.version(name, version, verify=False)]


def check_bag(bag: Bag, model: ModelVersion, allow_mismatch: bool = False) -> tuple[list[str], dict[str, str]]:
    """(notes, overrides) for scoring ``bag`` with ``model``; raises MismatchError when the bag's
    recorded encoder or scale differs from the training bags'."""
    notes: list[str] = []
    overrides: dict[str, str] = {}
    trained = model.trained_on
    record, complete = record_from_attrs(bag.attrs, bag.dim, bag.source)
    if trained is None:
        notes.append(f"model {model.label} does not record how its training bags were made; bags cannot be checked")
        return notes, overrides
    problems = list(trained.compare(record).differences)
    if trained.same_scale(record.mpp) is False:
        problems.append(f"µm/px: {trained.mpp:g} expected, {record.mpp:g} here")
    if problems:
        message = f"made differently from the bags model {model.label} was trained on: {'; '.join(problems)}"
        if not allow_mismatch:
            raise MismatchError(
                f"{bag.source}: {message}; re-tile the slide with the model's encoder, or pass {ALLOW_FLAG} to score it anyway"
            )
        notes.append(f"override: features {message}")
        overrides["encoder"] = "; ".join(problems)
    if not complete:
        notes.append("some bags record no encoder (older or CLAM h5 files); only their width could be checked")
    return notes, overrides


def _named(candidates: Sequence[ModelVersion], name: str, where: str) -> ModelVersion:
    found = next((c for c in candidates if c.name == name), None)
    if found is None:
        known = ", ".join(c.name for c in candidates if c.is_encoder) or "none"
        raise RepositoryError(f"{where}: no patch encoder {name!r} (encoders: {known})")
    if not found.is_encoder:
        raise InputError(f"model {name!r} is not a patch encoder (it takes {[t.name for t in found.inputs]})")
    return found


def _pick(encoders: list[ModelVersion], model: ModelVersion | None, allow_mismatch: bool, where: str) -> ModelVersion:
    if model is None:
        if len(encoders) == 1:
            return encoders[0]
        if not encoders:
            raise RepositoryError(f"{where}: no patch encoder; add one with 'histosurv export --encoder resnet18'")
        raise RepositoryError(f"{where}: several patch encoders ({_names(encoders)}); choose one with --encoder")
    fitting = [e for e in encoders if e.feature_dim == model.feature_dim]
    trained = model.trained_on
    if trained is not None:
        matching = [e for e in fitting if trained.compare(e.encoder_record).same]
        by_name = [e for e in matching if trained.name and e.name == trained.name]
        if by_name or len(matching) == 1:
            return (by_name or matching)[0]
        if len(matching) > 1:
            raise RepositoryError(
                f"{where}: several encoders match the training bags of {model.label} ({_names(matching)}); choose one with --encoder"
            )
        if fitting and not allow_mismatch:
            raise MismatchError(_no_match(model, trained, fitting, where))
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        raise RepositoryError(
            f"{where}: no patch encoder gives the {model.feature_dim}-d features {model.label} takes "
            f"(encoders: {', '.join(f'{e.name} ({e.feature_dim}-d)' for e in encoders) or 'none'}); "
            "export the encoder it was trained with: histosurv export --encoder NAME"
        )
    raise RepositoryError(f"{where}: several encoders give {model.feature_dim}-d features ({_names(fitting)}); choose one with --encoder")


def _check_encoder(model: ModelVersion, encoder: ModelVersion, allow_mismatch: bool, notes: list, overrides: dict) -> None:
    if encoder.feature_dim != model.feature_dim:  # no override: the engine cannot take them
        raise MismatchError(
            f"encoder {encoder.label} gives {encoder.feature_dim}-d features; model {model.label} takes {model.feature_dim}-d"
        )
    trained = model.trained_on
    if trained is None:
        notes.append(f"model {model.label} does not record its training encoder; cannot check that {encoder.label} made its bags")
        return
    comparison = trained.compare(encoder.encoder_record)
    if comparison.differences:
        message = (
            f"model {model.label} was trained on features of {trained.describe()}; "
            f"encoder {encoder.label} differs: {'; '.join(comparison.differences)}"
        )
        if not allow_mismatch:
            raise MismatchError(f"{message}. Export the encoder the model was trained with, or pass {ALLOW_FLAG}")
        notes.append("override: " + message)
        overrides["encoder"] = f"{encoder.label} differs from the training encoder: {'; '.join(comparison.differences)}"
    if comparison.unknown:
        notes.append(f"not recorded, so not checked against {encoder.label}: {', '.join(comparison.unknown)} of the training bags")


def _scale(model: ModelVersion | None, encoder: ModelVersion, notes: list) -> tuple[float, str]:
    """(µm/px, whose it is): the training bags' where recorded, else the encoder's, else 20x with a note."""
    trained = model.trained_on.mpp if model is not None and model.trained_on is not None else None
    native = encoder.encoder_record.mpp
    if trained is not None:
        return trained, f"model {model.label} was trained on patches cut at"
    if native is not None:
        return native, f"encoder {encoder.label} is meant for"
    notes.append(f"neither the model nor {encoder.label} records a µm/px (exported before records); cutting at {DEFAULT_MPP:g}")
    return DEFAULT_MPP, "the default is"


def _no_match(model: ModelVersion, trained: EncoderRecord, fitting: list[ModelVersion], where: str) -> str:
    lines = "; ".join(f"{e.label}: {', '.join(trained.compare(e.encoder_record).differences)}" for e in fitting)
    return (
        f"{where}: no encoder matches the bags model {model.label} was trained on ({trained.describe()}); {lines}. "
        f"Export the encoder it was trained with, or pass {ALLOW_FLAG} to use another (with --encoder if several fit)"
    )


def _names(versions: list[ModelVersion]) -> str:
    return ", ".join(v.name for v in versions)


def _close(a: float, b: float) -> bool:
    return abs(a / b - 1) <= 1e-6
