"""Patch batches read ahead of the encoder, in a bounded queue.

A reader thread walks the patch grid with the slide reader's batched path (cuCIM's decode workers),
resizes where the grid asks for it, and hands batches over a queue of ``prefetch`` slots. The encoder
consumes one batch while the next ones are decoded, so reading hides behind encoding; the queue bound
keeps memory at (prefetch + 2) batches whatever the slide's size. Decoding and ONNX Runtime both
release the GIL, so a thread is enough.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .reader import SlideReader
from .tiler import PatchGrid

__all__ = ["PatchBatch", "PatchStream", "resize_patches"]

_DONE = object()


@dataclass
class PatchBatch:
    index: int  # position of the first patch in the grid
    coords: np.ndarray  # (b, 2) level-0
    patches: np.ndarray  # (b, patch_size, patch_size, 3) uint8


class PatchStream:
    """Iterates :class:`PatchBatch` es of ``grid`` in grid order. Use as a context manager (or call
    :meth:`close`) so the reader thread stops when the consumer stops early.

    ``read_seconds`` is the reader thread's busy time (decode + resize); ``wait_seconds`` is how long
    the consumer waited for a batch, i.e. the reading the overlap did not hide.
    """

    def __init__(
        self,
        reader: SlideReader,
        grid: PatchGrid,
        batch_size: int = 64,
        num_workers: int = 2,
        prefetch: int = 2,
    ):
        self.reader, self.grid = reader, grid
        self.batch_size, self.num_workers = max(1, int(batch_size)), max(1, int(num_workers))
        self.read_seconds = 0.0
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[PatchBatch]:
        if self._thread is not None:
            raise RuntimeError("a PatchStream can be iterated once")
        self._thread = threading.Thread(target=self._produce, name="histosurv-patch-reader", daemon=True)
        self._thread.start()
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _produce(self) -> None:
        grid, index = self.grid, 0
        try:
            batches = self.reader.read_regions(
                grid.coords, (grid.read_size, grid.read_size), grid.level, self.batch_size, self.num_workers
            )
            while True:
                t0 = time.perf_counter()
                patches = next(batches, None)
                if patches is None:
                    break
                patches = resize_patches(patches, grid.patch_size)
                self.read_seconds += time.perf_counter() - t0
                batch = PatchBatch(index, grid.coords[index : index + len(patches)], patches)
                index += len(patches)
                if not self._put(batch):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "PatchStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """(b, s, s, 3) uint8 -> (b, size, size, 3), area-averaged (windows are only ever reduced)."""
    b, s = patches.shape[0], patches.shape[1]
    if s == size:
        return patches
    if s % size == 0:
        # integer sums over the f x f blocks, rounded half up: twice as fast as a float mean (measured)
        f = s // size
        total = np.zeros((b, size, size, 3), np.uint32)
        for dy in range(f):
            for dx in range(f):
                total += patches[:, dy::f, dx::f]
        return ((total + (f * f) // 2) // (f * f)).astype(np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BOX)) for p in patches])
