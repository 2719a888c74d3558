"""The models a server holds: which versions are loaded, their engines, and their statistics.

Loading goes through the same checks as everywhere in the runtime (sha256 of every file, engines
built for this machine); a version that fails to load is reported in the repository index with its
reason and never replaces a version that works. A request holds the ``LoadedModel`` it started with,
so unloading or replacing a model does not disturb requests already running on it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from ...errors import HistosurvError, RepositoryError
from ..engines import Engine, load_engine
from ..repository import MANIFEST, ModelRepository, ModelVersion
from .batching import DynamicBatcher
from .scheduler import Scheduler

__all__ = ["ModelStore", "LoadedModel", "ExecutionConfig", "Statistics", "ModelNotFound"]


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
    failures: Counter = field(default_factory=Counter)  # Triton's reasons: REJECTED, CANCELED, BACKEND, OTHER
    pending: int = 0  # requests received and not yet running
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def executed(
        self, total_ns: int, infer_ns: int, queue_ns: int = 0, input_ns: int = 0, output_ns: int = 0, inferences: int = 1
    ) -> None:
        """One successful request that ran in one execution of ``inferences`` items."""
        with self.lock:
            self.inference_count += inferences
            self.execution_count += 1
            self.last_inference_ms = now_ms()
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)

    def failed(self, reason: str, ns: int) -> None:
        with self.lock:
            self.fail.add(ns)
            self.failures[reason] += 1


@dataclass(frozen=True)
class ExecutionConfig:
    """How requests reach a model's engine (Triton's instance_group count, queue policy, dynamic_batching)."""

    instances: int = 1  # engine runs at once per model
    max_queue: int = 64  # requests waiting per model beyond the running ones; more: RESOURCE_EXHAUSTED
    batching: bool = True  # join encoder batches across concurrent slides
    max_batch: int = 64  # patches per encoder run
    max_delay: float = 0.005  # seconds the batcher waits for a batch to fill
    max_queue_patches: int = 8192  # patches waiting for the encoder; more: RESOURCE_EXHAUSTED


class LoadedModel:
    """A loaded model version with its engine, statistics, scheduler and (for a patch encoder) its
    dynamic batcher. Requests hold it through :meth:`ModelStore.lease`; once it is replaced or
    unloaded it is retired, and its batcher stops when its last request is done."""

    def __init__(self, version: ModelVersion, engine: Engine, config: ExecutionConfig = ExecutionConfig()):
        self.version, self.engine, self.config = version, engine, config
        self.stats = Statistics()
        self.scheduler = Scheduler(version.name, self.stats, config.instances, config.max_queue)
        self.batcher = None
        if config.batching and version.is_encoder:
            self.batcher = DynamicBatcher(
                version.name, self._encode, config.max_batch, config.max_delay, config.max_queue_patches, self._batched
            )
        self.on_batch = None  # set by the server: metrics for each batcher run
        self.fingerprint = None  # the repository's state of this version when it was loaded (poll mode)
        self._leases = 0
        self._retired = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def is_encoder(self) -> bool:
        return self.version.is_encoder

    def _encode(self, patches):
        return self.engine.run({"patches": patches})["features"]

    def _batched(self, n_patches: int, n_chunks: int, queue_ns: list, run_ns: int) -> None:
        s = self.stats
        with s.lock:
            s.inference_count += n_patches
            s.execution_count += 1
            s.last_inference_ms = now_ms()
            for q in queue_ns:
                s.success.add(q + run_ns)
                s.queue.add(q)
            s.compute_infer.add(run_ns)
        if self.on_batch is not None:
            self.on_batch(self, n_patches)

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            done = self._retired and self._leases == 0
        if done:
            self._shutdown()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            done = self._leases == 0
        if done:
            self._shutdown()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._leases

    def _shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.scheduler.close()


class ModelStore:
    def __init__(
        self,
        repository,
        engine: str = "auto",
        engine_options: dict | None = None,
        execution: ExecutionConfig = ExecutionConfig(),
    ):
        self.repository = ModelRepository(repository)
        self.engine, self.engine_options = engine, dict(engine_options or {})
        self.execution = execution
        self._models: dict[str, LoadedModel] = {}
        self._failures: dict[str, tuple[str, str]] = {}  # model -> (version, why its last load failed)
        # The models asked for (at start-up, by poll or by a client) and not unloaded since: the server
        # is ready only while every one of them serves (Triton's strict readiness).
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        self.on_load = None  # called with each newly loaded model (the server hooks its metrics here)

    def load_all(self) -> None:
        for name in self.repository.models():
            self.load(name, raise_errors=False)

    def load(self, name: str, raise_errors: bool = True) -> LoadedModel | None:
        """Loads the highest version of ``name``; on failure the version already loaded stays.
        Requests running on the version it replaces finish on it. Without ``raise_errors`` (start-up,
        poll mode) a highest version that fails is listed with its reason and the next lower versions
        are tried, down to the one already serving: the newest version that loads serves."""
        try:
            versions = sorted(self.repository.manifest(name).versions, reverse=True)
        except HistosurvError as e:
            if name not in self.repository.models():  # no model of this repository: nothing to wait for
                if raise_errors:
                    raise
                return None
            return self._failed(name, "", e, raise_errors)
        with self._lock:
            self._wanted.add(name)
            serving = self._models[name].version.version if name in self._models else None
        failure = None
        for version in versions:
            if failure is not None and serving is not None and version <= serving:
                break  # what serves now is at least as new as what is left to try
            try:
                loaded = self._load_version(name, version)
            except HistosurvError as e:
                if failure is None:
                    self._failed(name, str(version), e, raise_errors)
                    failure = (str(version), str(e))
                continue
            self._install(name, loaded, failure)
            return loaded
        return None

    def _load_version(self, name: str, version: int) -> LoadedModel:
        fingerprint = self.fingerprint(name, version)  # taken first: a change during the load is seen next scan
        mv = self.repository.version(name, version)
        loaded = LoadedModel(mv, load_engine(mv, self.engine, **self.engine_options), self.execution)
        loaded.fingerprint = fingerprint
        return loaded

    def _failed(self, name: str, version: str, error: HistosurvError, raise_errors: bool) -> None:
        with self._lock:
            self._wanted.add(name)
            self._failures[name] = (version, str(error))
        if raise_errors:
            raise error

    def _install(self, name: str, loaded: LoadedModel, failure: tuple[str, str] | None) -> None:
        if self.on_load is not None:
            self.on_load(loaded)
        with self._lock:
            old = self._models.get(name)
            self._models[name] = loaded
            if failure is None:
                self._failures.pop(name, None)
            else:  # the newer version that did not load stays listed beside the one serving
                self._failures[name] = failure
        if old is not None:
            old.retire()

    def failure(self, name: str) -> tuple[str, str]:
        """(version, reason) of the last failed load of ``name``; ("", "") if none."""
        with self._lock:
            return self._failures.get(name, ("", ""))

    def fingerprint(self, name: str, version: int | None = None) -> tuple | None:
        """What poll mode compares between scans: the version that would serve (the manifest's highest,
        or ``version``), its manifest record with the model's shared fields, and the files that record
        lists (size, mtime). Other version folders, their records and files no manifest lists do not
        count, so writing the next export does not reload the version serving."""
        folder = self.repository.root / name
        try:
            manifest = self.repository.manifest(name)
            version = manifest.latest if version is None else version
            info = manifest.versions.get(version)
            record = dataclasses.replace(manifest, versions={version: info})
            return (version, record, _file_states(folder / str(version), info.files if info is not None else {}))
        except OSError:  # the model folder moved away meanwhile: the next scan sees where it went
            return None
        except HistosurvError:  # an unreadable manifest: fixing it changes this, and a load is tried
            try:
                stat = (folder / MANIFEST).stat()
            except OSError:
                return None
            return ("unreadable", stat.st_size, stat.st_mtime_ns)

    def serves(self, name: str, fingerprint: tuple | None) -> bool:
        """Whether the version loaded for ``name`` is the one ``fingerprint`` describes, unchanged."""
        with self._lock:
            loaded = self._models.get(name)
        return loaded is not None and fingerprint is not None and loaded.fingerprint == fingerprint

    @contextmanager
    def lease(self, name: str, version: str = "") -> Iterator[LoadedModel]:
        """The loaded model, held for one request: a reload or unload meanwhile does not stop it."""
        model = self.get(name, version)
        model.acquire()
        try:
            yield model
        finally:
            model.release()

    def unload(self, name: str) -> None:
        with self._lock:
            self._wanted.discard(name)  # unloaded on purpose: no longer one the server must serve
            self._failures.pop(name, None)
            old = self._models.pop(name, None)
        if old is None:
            raise ModelNotFound(f"model '{name}' is not loaded")
        old.retire()

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for model in models:
            model.retire()

    def get(self, name: str, version: str = "") -> LoadedModel:
        with self._lock:
            loaded = self._models.get(name)
        if loaded is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model '{name}' is not loaded (loaded: {known})")
        if version and version != str(loaded.version.version):
            raise ModelNotFound(f"model '{name}' has no loaded version '{version}' (loaded: {loaded.version.version})")
        return loaded

    def loaded_version(self, name: str) -> int | None:
        with self._lock:
            loaded = self._models.get(name)
        return loaded.version.version if loaded is not None else None

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for every model of the repository and every loaded one; a
        version that failed to load is listed beside the version still serving."""
        with self._lock:
            models, failures = dict(self._models), dict(self._failures)
        rows = []
        for name in sorted(set(self.repository.models()) | set(models) | set(failures)):
            if name in models:
                rows.append((name, str(models[name].version.version), "READY", ""))
            if name in failures:
                rows.append((name, *failures[name][:1], "UNAVAILABLE", failures[name][1]))
            elif name not in models:
                rows.append((name, "", "UNAVAILABLE", "not loaded"))
        return rows

    @property
    def ready(self) -> bool:
        """Triton's strict readiness: something serves, and every model asked for serves (a fusion
        model whose encoder failed to load would refuse every slide)."""
        return bool(self.loaded()) and not self.not_ready()

    def not_ready(self) -> list[str]:
        """The models asked for that have no version serving."""
        with self._lock:
            return sorted(self._wanted - set(self._models))


def _file_states(folder, names) -> tuple:
    """(name, size, mtime) of each listed file; a missing one is (name, None, None) until it appears."""
    states = []
    for name in sorted(names):
        try:
            stat = (folder / name).stat()
            states.append((name, stat.st_size, stat.st_mtime_ns))
        except OSError:
            states.append((name, None, None))
    return tuple(states)


def now_ms() -> int:
    return int(time.time() * 1000)


def check_repository_name(name: str) -> None:
    if name not in ("", "default"):
        raise RepositoryError(f"repository '{name}' is unknown; this server has one, named 'default' (or empty)")
