"""One small interface for every inference backend, and the registry that picks one.

An engine loads one model version from the repository, says which tensors it takes and returns,
runs on named numpy arrays, and reports where it really runs (``device``, ``providers``), because
some backends fall back to the CPU without raising.
"""

from __future__ import annotations

import abc
import warnings
from typing import ClassVar

import numpy as np

from ...errors import HistosurvError
from ..repository import ModelVersion

__all__ = ["Engine", "ENGINES", "register_engine", "load_engine", "EngineUnavailable"]

ENGINES: dict[str, type["Engine"]] = {}


class EngineUnavailable(HistosurvError, RuntimeError):
    """The backend's library is not installed here, or the model version has no artifact for it."""


def register_engine(cls: type["Engine"]) -> type["Engine"]:
    ENGINES[cls.name] = cls
    return cls


class Engine(abc.ABC):
    name: ClassVar[str]
    priority: ClassVar[int] = 100  # order tried by engine="auto": lower first
    install_hint: ClassVar[str] = ""

    def __init__(self, version: ModelVersion):
        self.version = version

    @classmethod
    @abc.abstractmethod
    def is_installed(cls) -> bool:
        """True when the backend's library imports here."""

    @property
    def inputs(self):
        return self.version.inputs

    @property
    def outputs(self):
        return self.version.outputs

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it runs, e.g. 'cpu' or 'cuda:0'."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (validated by the caller) -> named outputs."""

    def describe(self) -> dict:
        return {"engine": self.name, "device": self.device}


def load_engine(version: ModelVersion, name: str = "auto", **options) -> Engine:
    """Loads backend ``name`` for ``version``; ``auto`` takes the first installed backend that the
    version has an artifact for."""
    if name != "auto":
        if name not in ENGINES:
            raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}")
        cls = ENGINES[name]
        if not cls.is_installed():
            raise EngineUnavailable(f"engine {name!r} is not installed here ({cls.install_hint})")
        return cls(version, **options)
    for cls in sorted(ENGINES.values(), key=lambda c: c.priority):
        if cls.name in version.info.engines and cls.is_installed():
            return cls(version, **options)
    raise EngineUnavailable(
        f"no usable engine for {version.name} version {version.version}: the version has "
        f"{sorted(version.info.engines)}, installed backends are "
        f"{[c.name for c in ENGINES.values() if c.is_installed()]}"
    )


def warn_fallback(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
