"""One small interface for every inference backend, and the registry that picks one.

An engine loads one artifact of a model version (an entry of the manifest's ``engines``: the key
names the artifact, e.g. ``onnxruntime_fp16``; its ``backend`` names the class that runs it), says
which tensors it takes and returns, runs on named numpy arrays, and reports where it really runs
(``device``, ``providers``), because some backends fall back to the CPU without raising.

Artifacts tied to a machine (a TensorRT plan is built for one GPU and one TensorRT version; an
AOTInductor package for one device type and one torch release) are refused at load with a message
naming the file, before the library gets a chance to crash or, worse, to run wrongly.
"""

from __future__ import annotations

import abc
import inspect
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np

from ...errors import HistosurvError, RepositoryError
from ..manifest import EngineEntry
from ..repository import ModelRepository, ModelVersion

__all__ = [
    "Engine",
    "ENGINES",
    "register_engine",
    "load_engine",
    "load_models",
    "EngineUnavailable",
    "usable_engine_keys",
    "why_unusable",
]

ENGINES: dict[str, type["Engine"]] = {}


class EngineUnavailable(HistosurvError, RuntimeError):
    """The backend's library is not installed here, the artifact was built for another machine, or the
    model version has no artifact for it."""


def register_engine(cls: type["Engine"]) -> type["Engine"]:
    ENGINES[cls.name] = cls
    return cls


class Engine(abc.ABC):
    name: ClassVar[str]
    priority: ClassVar[int] = 100  # order tried by engine="auto": lower first
    install_hint: ClassVar[str] = ""

    def __init__(self, version: ModelVersion, key: str | None = None):
        self.version = version
        self.key = key or self.name
        self.path: Path = version.engine_file(self.key)  # refuses a key the version does not have
        self.entry: EngineEntry = version.info.engines[self.key]
        problem = self.incompatibility(self.entry)
        if problem:
            raise EngineUnavailable(f"{self.path}: {problem}")

    @classmethod
    @abc.abstractmethod
    def is_installed(cls) -> bool:
        """True when the backend's library imports here."""

    @classmethod
    def incompatibility(cls, entry: EngineEntry) -> str | None:
        """Why an artifact described by ``entry`` cannot run on this machine, or None if it can."""
        return None

    @classmethod
    def preferred_here(cls, entry: EngineEntry) -> bool:
        """Whether engine="auto" may pick this artifact here (e.g. not an FP16 graph on a CPU)."""
        return True

    @classmethod
    def precision_rank(cls, entry: EngineEntry) -> int:
        """Order among this backend's artifacts that engine="auto" may pick: lower first (FP32 before the rest)."""
        return 0 if entry.precision == "fp32" else 1

    @classmethod
    def runs_on_gpu(cls, entry: EngineEntry) -> bool:
        """Whether this artifact would compute on a GPU here."""
        return entry.device == "cuda"

    @property
    def inputs(self):
        return self.version.inputs

    @property
    def outputs(self):
        return self.version.outputs

    @property
    def precision(self) -> str:
        return self.entry.precision

    @property
    @abc.abstractmethod
    def device(self) -> str:
        """Where it runs, e.g. 'cpu' or 'cuda:0'."""

    @abc.abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named inputs (validated by the caller) -> named outputs."""

    def describe(self) -> dict:
        return {"engine": self.key, "backend": self.name, "device": self.device, "precision": self.precision}


def nvidia_device_present() -> bool:
    """Without importing a framework: a CPU box never loads torch just to rank its engines."""
    return Path("/dev/nvidia0").exists()


def usable_engine_keys(version: ModelVersion, first_only: bool = False) -> list[str]:
    """Manifest keys engine="auto" would try, best first: installed backends, artifacts that suit this
    machine. Machine checks may import a backend's library, so they run in order and, with
    ``first_only``, stop at the first usable artifact (a CPU box choosing ONNX Runtime never imports torch)."""
    # On a GPU box an artifact that computes on the GPU goes first: its ONNX Runtime may have no CUDA
    # provider (the CPU wheel) while a compiled torch package does run there.
    gpu_here = nvidia_device_present()
    candidates = []
    for key, entry in version.info.engines.items():
        cls = ENGINES.get(entry.backend or "")
        if cls is not None and cls.is_installed() and cls.preferred_here(entry):
            on_cpu = not (gpu_here and cls.runs_on_gpu(entry))
            candidates.append((on_cpu, cls.priority, cls.precision_rank(entry), key, cls))
    usable = []
    for *_, key, cls in sorted(candidates, key=lambda c: c[:4]):
        if cls.incompatibility(version.info.engines[key]) is None:
            usable.append(key)
            if first_only:
                break
    return usable


def load_engine(version: ModelVersion, name: str = "auto", **options) -> Engine:
    """Loads the artifact ``name`` of ``version``: a manifest engine key (``onnxruntime_fp16``), a
    backend name (its artifact of the same key), or ``auto``: the best artifact this machine can run."""
    engines = version.info.engines
    if name == "auto":
        keys = usable_engine_keys(version, first_only=True)
        if not keys:
            raise EngineUnavailable(
                f"no engine of {version.name} version {version.version} can run here: " + "; ".join(_why_not(version))
            )
        name = keys[0]
    if name not in engines:
        if name in ENGINES:
            raise EngineUnavailable(
                f"{version.path}: no {name} artifact in this version (present: {', '.join(sorted(engines))})"
            )
        raise EngineUnavailable(
            f"unknown engine {name!r}; this version has {', '.join(sorted(engines))} "
            f"(backends: {', '.join(sorted(ENGINES))})"
        )
    backend = engines[name].backend
    if backend is None:
        raise EngineUnavailable(f"{version.path / engines[name].file} is an input to engine builds, not an engine")
    cls = ENGINES.get(backend)
    if cls is None:
        raise EngineUnavailable(f"engine {name!r} needs backend {backend!r}, which this histosurv does not have")
    if not cls.is_installed():
        raise EngineUnavailable(f"engine {name!r} needs {backend}, which is not installed here ({cls.install_hint})")
    return cls(version, key=name, **_for_backend(cls, options))


TUNING_OPTIONS = frozenset({"threads", "spinning", "memory_arena"})


def _for_backend(cls: type, options: dict) -> dict:
    """``options`` less the tuning knobs this backend does not have (ONNX Runtime's spinning asked of a
    torch package): they change speed, never answers, so a caller need not know which backend ``auto``
    picks. Any other unknown option still fails, as a mistake should."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in accepted or k not in TUNING_OPTIONS}


def why_unusable(version: ModelVersion, key: str, for_auto: bool = False) -> str | None:
    """Why artifact ``key`` cannot run on this machine (or, with ``for_auto``, would not be chosen by
    engine="auto"), naming its file; None if it can."""
    entry = version.info.engines[key]
    backend, path = entry.backend, version.path / entry.file
    cls = ENGINES.get(backend or "")
    if backend is None:
        return f"{path}: an input to engine builds, not an engine"
    if cls is None:
        return f"{path}: backend {backend!r} unknown to this histosurv"
    if not cls.is_installed():
        return f"{path}: {backend} is not installed here ({cls.install_hint})"
    if for_auto and not cls.preferred_here(entry):
        if entry.precision == "int8" and (entry.details.get("gate") or {}).get("passed") is not True:
            return f"{path}: int8 graph whose accuracy gates failed at export (kept with --force): served only when named"
        return f"{path}: {entry.precision} graph, not chosen on this machine unless named"
    problem = cls.incompatibility(entry)
    return f"{path}: {problem}" if problem else None


def _why_not(version: ModelVersion) -> list[str]:
    reasons = [why_unusable(version, key, for_auto=True) for key, e in version.info.engines.items() if e.servable]
    return [r for r in reasons if r] or [f"{version.path}: the manifest lists no engines"]


def load_models(
    repository, names: list[str] | None = None, engine: str = "auto", **options
) -> tuple[dict[str, Engine], dict[str, str]]:
    """Loads the highest version of every model (or of ``names``); a model that cannot load (a damaged
    file, an artifact for another machine) is reported in the second dict and the others still load."""
    repo = ModelRepository(repository)
    loaded, failed = {}, {}
    for name in names or repo.models():
        try:
            loaded[name] = load_engine(repo.version(name), engine, **options)
        except (RepositoryError, EngineUnavailable) as e:
            failed[name] = str(e)
    return loaded, failed


def warn_fallback(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
