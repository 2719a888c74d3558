"""What the benchmarks ran on, and how busy it was: CPU model, cores, memory, package versions, load.

Every script's header and ``--json`` carry these so a figure can be read against its machine (a
timing from a busy or a different machine is a different figure). No torch here: the parents import
this module. The GPU's name comes from the children that load torch (bench/_measure.py, kernels.py).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import psutil

__all__ = [
    "cpu_model", "cpu_simd_and_clock", "host_facts", "package_version", "now",
    "load_average", "format_load_average", "busy_cpu_seconds", "process_cpu_seconds",
]


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def cpu_simd_and_clock() -> tuple[int | None, float | None]:
    """FP32 lanes per vector FMA (16 with AVX-512, 8 with AVX2+FMA) and the clock in GHz, from /proc/cpuinfo:
    the two machine-dependent factors of a CPU's FP32 peak."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, None
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    lanes = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 4 if "sse2" in flags else None
    clocks = [float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    return lanes, (max(clocks) / 1e3 if clocks else None)


def host_facts(*, memory_available: bool = False) -> dict:
    """CPU, cores, memory, OS and Python: the part of a header every script shares. With
    ``memory_available`` also the memory free now, which bounds what the big-bag runs can try."""
    memory = psutil.virtual_memory()
    facts = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_total_bytes": memory.total,
    }
    if memory_available:
        facts["memory_available_bytes"] = memory.available
    facts.update(platform=platform.platform(), python=platform.python_version())
    return facts


def package_version(*distributions: str, missing=None):
    """The version of the first of ``distributions`` installed (a package can ship under several names,
    e.g. cucim-cu12 / cucim-cu13), else ``missing``; reads metadata only, so nothing heavy is imported."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return missing


def now() -> str:
    """The local date and time with its UTC offset, to the second: when the figures were taken."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 min load averages: a high one says other work competed with the run."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def format_load_average(values) -> str:
    """:func:`load_average`'s values as the headers print them."""
    return ", ".join(f"{x:.2f}" for x in values) if values else "unknown"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot; the difference over a stretch, less the
    measured processes' own, is what other processes took (iowait is idle time, not work)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def process_cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU seconds of one process so far."""
    times = process.cpu_times()
    return times.user + times.system
