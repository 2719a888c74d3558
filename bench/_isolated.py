"""One measurement per fresh process: the parent's launcher, and the child's timing and memory primitives.

A child's ``ru_maxrss`` starts at its parent's peak (Linux carries the high-water mark across fork
and exec), so a parent that had loaded torch or run an export would inflate every child's peak: the
parents import nothing heavy, and each (engine, N) runs in a process of its own. No torch here.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time

import psutil

__all__ = ["run_measurement", "reset_peak_rss", "rss_bytes", "peak_rss_bytes", "time_calls"]


def run_measurement(cmd: list[str], threads: int, timeout: float) -> dict:
    """Runs one measurement in a fresh process; its last stdout line is its JSON result. A crash, a
    timeout or an out-of-memory kill becomes a row saying so."""
    # Pin OpenMP/MKL pools before the child imports torch, so no pool is ever sized to every core.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:  # subprocess.run has already killed the child
        return {"status": "timeout", "detail": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "detail": _failure(proc)}
    try:
        return {"status": "ok", **json.loads(lines[-1])}
    except json.JSONDecodeError:
        return {"status": "failed", "detail": f"unreadable result: {lines[-1][:200]}"}


def _failure(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode == -9:
        return "killed by SIGKILL (out of memory?)"
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"exit status {proc.returncode}: {last[:300]}"


def reset_peak_rss() -> bool:
    """Forgets the peak so far (Linux >= 4.0), so transients while loading (torch's import, ORT's graph
    optimiser) are not counted as the forward pass's memory. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int:
    """This process's resident memory now: the baseline a measurement's extra is counted from."""
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last :func:`reset_peak_rss`: VmHWM, which
    clear_refs resets (``ru_maxrss`` is never reset, and starts at the parent's peak), or ``ru_maxrss``
    where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def time_calls(run, repeat: int, budget_s: float) -> list[float]:
    """Milliseconds of up to ``repeat`` calls of ``run`` (the caller has warmed it up), fewer once
    ``budget_s`` is spent so a slow size cannot hold the run for hours, and never fewer than one."""
    times, started = [], time.perf_counter()
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() - started > budget_s:
            break
    return times
