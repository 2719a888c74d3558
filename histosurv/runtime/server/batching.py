"""A dynamic batcher for the patch encoder: fills encoder batches with patches from concurrent slides.

Each slide being scored streams its patches in chunks (its read-ahead batches). The batcher joins
chunks from different slides into one encoder run of up to ``max_batch`` patches, waiting at most
``max_delay`` for others to join (Triton's ``max_batch_size`` and ``max_queue_delay_microseconds``).
One thread runs the encoder, so a CPU runs one batch on all its cores at a time instead of several
slides' batches fighting over them, and a GPU gets full batches.

Unlike Triton, the delay counts from the later of the first chunk's arrival and the end of the
previous run. Slides wait for their features before sending more, so with the delay counted from
arrival alone, two groups of slides fall into step and take turns: the chunks that queued during a
run are past their delay when it ends, leave at once, and the slides just served arrive a moment
too late to join. With this rule and two chunks of each slide in flight (``featurize_slide``'s
``in_flight``), bench/server.py's 4 concurrent slides went from 2.0 to 5.0 chunks per encoder run.
A chunk pays at most ``max_delay`` more for it.

Chunks are never split: a chunk that does not fit waits for the next batch, and a chunk larger than
``max_batch`` runs alone. The queue is bounded in patches; a slide whose chunk would overflow it
gets :class:`QueueFull` and fails with RESOURCE_EXHAUSTED. A chunk whose future was cancelled (its
slide was cancelled or ran out of time) is dropped before it is encoded.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import numpy as np

from .scheduler import QueueFull

__all__ = ["DynamicBatcher"]


class _Chunk:
    __slots__ = ("patches", "future", "enqueued")

    def __init__(self, patches: np.ndarray):
        self.patches, self.future, self.enqueued = patches, Future(), time.perf_counter_ns()


class DynamicBatcher:
    """``encode(patches) -> features`` run on batches joined across callers.

    The limits have no defaults here: ``ExecutionConfig`` holds them (and ``histosurv serve`` reads
    them from it). ``on_batch(n_patches, n_chunks, queue_ns_per_chunk, run_ns)`` is called after each
    run (for statistics and metrics)."""

    def __init__(
        self,
        name: str,
        encode: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay: float,
        max_queue: int,
        on_batch: Callable[[int, int, list, int], None] | None = None,
    ):
        if max_batch < 1 or max_delay < 0 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_delay >= 0 (got {max_batch}, {max_queue}, {max_delay})")
        self.name, self.encode = name, encode
        self.max_batch, self.max_delay, self.max_queue = max_batch, max_delay, max_queue
        self.on_batch = on_batch
        self._queue: deque[_Chunk] = deque()
        self._queued_patches = 0
        self._cond = threading.Condition()
        self._closed = False
        self._free_since = 0  # perf_counter_ns at the end of the last run
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, patches: np.ndarray) -> Future:
        """Queues a chunk of patches; the future gets their features, in order."""
        chunk = _Chunk(patches)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the batcher of '{self.name}' is closed")
            if self._queued_patches and self._queued_patches + len(patches) > self.max_queue:
                raise QueueFull(
                    f"encoder '{self.name}' has {self._queued_patches} patches queued (limit {self.max_queue}); retry later"
                )
            self._queue.append(chunk)
            self._queued_patches += len(patches)
            self._cond.notify()
        return chunk.future

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """Encodes ``patches`` through the batcher, blocking until their batch has run."""
        return self.submit(patches).result()

    @property
    def queued_patches(self) -> int:
        with self._cond:
            return self._queued_patches

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(10)

    def _take_batch(self) -> list[_Chunk]:
        """Blocks for the first live chunk, then gathers more until the batch is full or the delay,
        counted from the first chunk's arrival, is over."""
        with self._cond:
            batch: list[_Chunk] = []
            size = 0
            while True:
                while self._queue:
                    chunk = self._queue[0]
                    if batch and size + len(chunk.patches) > self.max_batch:
                        return batch
                    self._queue.popleft()
                    self._queued_patches -= len(chunk.patches)
                    if not chunk.future.set_running_or_notify_cancel():
                        continue  # its slide was cancelled: nothing waits for these features
                    batch.append(chunk)
                    size += len(chunk.patches)
                    if size >= self.max_batch:
                        return batch
                if self._closed:
                    return batch
                if not batch:
                    self._cond.wait()
                    continue
                opened = max(batch[0].enqueued, self._free_since)
                left = self.max_delay - (time.perf_counter_ns() - opened) / 1e9
                if left <= 0:
                    return batch
                self._cond.wait(left)

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                continue
            started = time.perf_counter_ns()
            try:
                patches = batch[0].patches if len(batch) == 1 else np.concatenate([c.patches for c in batch])
                features = self.encode(patches)
            except BaseException as e:  # every waiting slide learns why; the batcher goes on
                for chunk in batch:
                    chunk.future.set_exception(e)
                self._free_since = time.perf_counter_ns()
                continue
            self._free_since = time.perf_counter_ns()
            run_ns = self._free_since - started
            start = 0
            for chunk in batch:
                chunk.future.set_result(features[start : start + len(chunk.patches)])
                start += len(chunk.patches)
            if self.on_batch is not None:
                self.on_batch(start, len(batch), [started - c.enqueued for c in batch], run_ns)
