"""The models a server holds: which versions are loaded, their engines, and their statistics.

Loading goes through the same checks as everywhere in the runtime (sha256 of every file, engines
built for this machine); a version that fails to load is reported in the repository index with its
reason and never replaces a version that works. A request holds the ``LoadedModel`` it started with,
so unloading or replacing a model does not disturb requests already running on it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ...errors import HistosurvError, RepositoryError
from ..engines import Engine, load_engine
from ..repository import ModelRepository, ModelVersion

__all__ = ["ModelStore", "LoadedModel", "Statistics", "ModelNotFound"]


class ModelNotFound(HistosurvError, LookupError):
    pass


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class Statistics:
    """Triton's per-version counters: requests (inference_count) and engine runs (execution_count)."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class LoadedModel:
    version: ModelVersion
    engine: Engine
    stats: Statistics = field(default_factory=Statistics)

    @property
    def name(self) -> str:
        return self.version.name


class ModelStore:
    def __init__(self, repository, engine: str = "auto", engine_options: dict | None = None):
        self.repository = ModelRepository(repository)
        self.engine, self.engine_options = engine, dict(engine_options or {})
        self._models: dict[str, LoadedModel] = {}
        self._failures: dict[str, str] = {}  # model -> why its last load failed
        self._lock = threading.Lock()

    def load_all(self) -> None:
        for name in self.repository.models():
            self.load(name, raise_errors=False)

    def load(self, name: str, raise_errors: bool = True) -> LoadedModel | None:
        """Loads the highest version of ``name``; on failure the version already loaded stays."""
        try:
            mv = self.repository.version(name)
            loaded = LoadedModel(mv, load_engine(mv, self.engine, **self.engine_options))
        except HistosurvError as e:
            with self._lock:
                self._failures[name] = str(e)
            if raise_errors:
                raise
            return None
        with self._lock:
            self._models[name] = loaded
            self._failures.pop(name, None)
        return loaded

    def unload(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise ModelNotFound(f"model '{name}' is not loaded")

    def get(self, name: str, version: str = "") -> LoadedModel:
        with self._lock:
            loaded = self._models.get(name)
        if loaded is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {known})")
        if version and version != str(loaded.version.version):
            raise ModelNotFound(f"model '{name}' has no loaded version '{version}' (loaded: {loaded.version.version})")
        return loaded

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model of the repository and every loaded one."""
        with self._lock:
            models, failures = dict(self._models), dict(self._failures)
        rows = []
        for name in sorted(set(self.repository.models()) | set(models) | set(failures)):
            if name in models:
                rows.append((name, str(models[name].version.version), "READY", ""))
            else:
                rows.append((name, "", "UNAVAILABLE", failures.get(name, "not loaded")))
        return rows

    @property
    def ready(self) -> bool:
        with self._lock:
            return bool(self._models)


def now_ms() -> int:
    return int(time.time() * 1000)


def check_repository_name(name: str) -> None:
    if name not in ("", "default"):
        raise RepositoryError(f"repository '{name}' is unknown; this server has one, named 'default' (or empty)")
