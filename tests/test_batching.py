"""The dynamic batcher on its own: joining, order, cancellation, a full queue, a failing encoder."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from histosurv.runtime.server.batching import DynamicBatcher
from histosurv.runtime.server.scheduler import QueueFull


class Encoder:
    """Features = the patch's first value times 10; records every batch it ran, can be held or fail."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.batches.append(len(patches))
        if self.fail:
            raise RuntimeError("encoder broke")
        return patches[:, :1].astype(np.float32) * 10


def _chunk(values) -> np.ndarray:
    return np.array(values, np.float32)[:, None].repeat(3, axis=1)


def test_chunks_queued_while_the_encoder_runs_join_one_batch_and_keep_their_order():
    encoder = Encoder()
    batcher = DynamicBatcher("enc", encoder, max_batch=8, max_delay=0.05, max_queue=4096)
    try:
        encoder.gate.clear()
        first = batcher.submit(_chunk([0]))
        time.sleep(0.1)  # the first chunk is running (held at the gate)
        futures = [batcher.submit(_chunk([i, i + 0.5])) for i in (1, 2, 3)]
        big = batcher.submit(_chunk(range(10, 13)))  # does not fit beside the other three: next batch
        encoder.gate.set()
        assert first.result(5).ravel().tolist() == [0]
        for i, f in zip((1, 2, 3), futures):
            assert f.result(5).ravel().tolist() == [10 * i, 10 * i + 5]
        assert big.result(5).ravel().tolist() == [100, 110, 120]
        assert encoder.batches == [1, 6, 3]
    finally:
        batcher.close()


def test_a_cancelled_chunk_is_never_encoded_and_a_full_queue_refuses():
    encoder = Encoder()
    batcher = DynamicBatcher("enc", encoder, max_batch=4, max_delay=0.0, max_queue=4)
    try:
        encoder.gate.clear()
        running = batcher.submit(_chunk([1]))
        time.sleep(0.1)
        dropped = batcher.submit(_chunk([2, 2]))
        kept = batcher.submit(_chunk([3, 3]))
        with pytest.raises(QueueFull, match="4 patches queued"):
            batcher.submit(_chunk([4]))
        assert dropped.cancel()
        encoder.gate.set()
        assert kept.result(5).ravel().tolist() == [30, 30] and running.result(5).ravel().tolist() == [10]
        assert encoder.batches == [1, 2]  # the cancelled chunk's patches were not encoded
    finally:
        batcher.close()


def test_an_encoder_failure_reaches_every_chunk_of_the_batch_and_the_batcher_goes_on():
    encoder = Encoder()
    batcher = DynamicBatcher("enc", encoder, max_batch=8, max_delay=0.05, max_queue=4096)
    try:
        encoder.fail = True
        encoder.gate.clear()
        a, b = batcher.submit(_chunk([1])), batcher.submit(_chunk([2]))
        encoder.gate.set()
        for f in (a, b):
            with pytest.raises(RuntimeError, match="encoder broke"):
                f.result(5)
        encoder.fail = False
        assert batcher.submit(_chunk([5])).result(5).ravel().tolist() == [50]
    finally:
        batcher.close()
