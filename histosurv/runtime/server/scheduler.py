"""Per-model execution: a bounded queue in front of a fixed number of engine instances.

Triton's model: requests wait in a queue, then run on one of ``instances`` executions at a time
(``instance_group { count }``). On a CPU, one instance already uses every core (ONNX Runtime's
intra-op threads), so running more requests at once only makes each slower; on a GPU a second
instance can overlap copies with compute. A full queue refuses at once (RESOURCE_EXHAUSTED) instead
of letting latency grow without bound, and a request cancelled or timed out while queued never runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from ...errors import HistosurvError

__all__ = ["QueueFull", "Scheduler", "Timed"]

T = TypeVar("T")


class QueueFull(HistosurvError):
    """The model's queue is full: the server answers RESOURCE_EXHAUSTED and the client may retry."""


class Timed:
    """What a run returned, with the nanoseconds it waited in the queue and ran."""

    __slots__ = ("value", "queue_ns", "run_ns")

    def __init__(self, value, queue_ns: int, run_ns: int):
        self.value, self.queue_ns, self.run_ns = value, queue_ns, run_ns


class Scheduler:
    def __init__(self, name: str, stats, instances: int, max_queue: int):  # limits: see ExecutionConfig
        if instances < 1 or max_queue < 0:
            raise ValueError(f"instances must be >= 1 and max_queue >= 0 (got {instances}, {max_queue})")
        self.name, self.stats = name, stats
        self.instances, self.max_queue = instances, max_queue
        self._executor = ThreadPoolExecutor(instances, thread_name_prefix=f"engine-{name}")
        self._lock = threading.Lock()
        self._waiting = 0
        # tests: called in the engine thread once a request has left the queue, before it runs (a gate
        # that holds it there makes "one running, the next queued" a state, not a race)
        self.before_run: Callable[[], None] | None = None

    async def run(self, fn: Callable[[], T]) -> Timed:
        """Runs ``fn`` on an instance once one is free; raises :class:`QueueFull` when ``max_queue``
        requests are already waiting. Cancelling the awaiting task while queued takes the request out
        of the queue; once running, the engine call finishes (engines cannot be interrupted) and its
        result is dropped."""
        with self._lock:
            if self._waiting >= self.max_queue + self.instances:
                raise QueueFull(
                    f"model '{self.name}' has {self._waiting} requests queued or running (limit: "
                    f"{self.instances} running + {self.max_queue} queued); retry later"
                )
            self._waiting += 1
        with self.stats.lock:
            self.stats.pending += 1
        state = {"started": None, "abandoned": False}
        enqueued = time.perf_counter_ns()

        def call():
            with self._lock:
                if state["abandoned"]:
                    return None
                state["started"] = time.perf_counter_ns()
            with self.stats.lock:
                self.stats.pending -= 1
            try:
                if self.before_run is not None:
                    self.before_run()
                return fn()
            finally:
                with self._lock:
                    self._waiting -= 1

        try:
            value = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except asyncio.CancelledError:
            with self._lock:
                never_ran = state["started"] is None
                state["abandoned"] = True
                if never_ran:
                    self._waiting -= 1
            if never_ran:
                with self.stats.lock:
                    self.stats.pending -= 1
            raise
        finished = time.perf_counter_ns()
        return Timed(value, state["started"] - enqueued, finished - state["started"])

    @property
    def waiting(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return self._waiting

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
