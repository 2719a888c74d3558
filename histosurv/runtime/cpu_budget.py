"""How the cores of this machine are shared between the patch encoder and the slide decoder.

On a box without a GPU the encoder is 85-95% of the work from slide to features, so ONNX Runtime's
intra-op pool gets every core the process may use: leaving one core of two to the decoder cost 40-50%
of the speed (``bench/cpu_budget.py``; the README gives the table). Decoding only has to stay ahead of
the encoder: two cuCIM workers, or one per four cores on bigger boxes. On two cores the number of decode
workers and whether ONNX Runtime's idle threads spin moved the speed by less than the run-to-run noise
(8%), so both stay at their defaults. With the encoder on a GPU the CPU only decodes: every core but
one decodes.

Batch size: FP32 encoders ran at the same speed from 1 to 64 patches a call, INT8 ones 1.2-1.3x faster
at 1-8 than at 32 (their activations stay in the caches), so an INT8 encoder is fed 8 at a time.

"The cores the process may use" is the CPU affinity mask and, in a container, the cgroup's CPU quota
(``docker --cpus``, a Kubernetes limit): ONNX Runtime sizes its default pool from the host's cores,
which in a 2-CPU container on a 64-core host is 32 threads fighting over 2 CPUs.

Every figure can be overridden: ``--threads``, ``--workers`` and ``--batch-size`` on the commands, or
``HISTOSURV_THREADS`` in the environment (Ray workers are given theirs this way).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuBudget", "cpu_budget", "encoder_batch_size", "usable_cores", "env_threads"]

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
CORES_PER_DECODER = 4  # one decode worker keeps up with the encoder of four cores (bench/cpu_budget.py)
MIN_DECODERS = 2
BATCH = {"int8": 8}  # patches per encoder call by the encoder's precision (bench/cpu_budget.py); others 32
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class CpuBudget:
    cores: int  # the cores this process may use
    encoder_threads: int  # ONNX Runtime intra-op threads (torch threads for torch engines)
    decode_workers: int  # cuCIM decode workers of the slide reader

    def describe(self) -> str:
        return f"{self.cores} usable cores: {self.encoder_threads} encoder threads, {self.decode_workers} decode workers"


def _cgroup_quota(v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                  v1_period: Path = CGROUP_V1_PERIOD) -> float | None:
    """CPUs the cgroup's quota allows (2.5 for ``--cpus 2.5``), or None where no quota is set."""
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota, period = int(v1_quota.read_text()), int(v1_period.read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota (rounded up:
    a quota of 2.5 CPUs keeps three threads busy part of the time, which beats two)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def env_threads() -> int | None:
    """``HISTOSURV_THREADS``, checked: the encoder threads someone set for this process."""
    value = os.environ.get("HISTOSURV_THREADS")
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        from ..errors import InputError

        raise InputError(f"HISTOSURV_THREADS must be a whole number of threads >= 1, got {value!r}")
    return threads


def cpu_budget(encoder_on_gpu: bool = False, threads: int | None = None, workers: int | None = None,
               cores: int | None = None) -> CpuBudget:
    """Encoder threads and decode workers for this machine; ``threads`` and ``workers`` (a user's
    override) are kept as given, ``HISTOSURV_THREADS`` stands in for ``threads``."""
    from ..errors import InputError

    for name, value in (("threads", threads), ("workers", workers)):
        if value is not None and value < 1:
            raise InputError(f"--{name} must be at least 1, got {value}")
    cores = cores or usable_cores()
    threads = threads or env_threads()
    if encoder_on_gpu:
        # the GPU encodes: the CPU's work is decoding, and one core stays free for the GPU's host thread
        return CpuBudget(cores, threads or 1, workers or max(1, cores - 1))
    return CpuBudget(cores, threads or cores, workers or max(MIN_DECODERS, cores // CORES_PER_DECODER))


def encoder_batch_size(precision: str) -> int:
    """Patches per encoder call where the user gave none: the fastest measured for the precision."""
    return BATCH.get(precision, DEFAULT_BATCH)
