"""Pieces the benchmark scripts share; no torch here (the parents must not import it)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

__all__ = ["int_list", "choice_list", "reset_peak_rss", "run_measurement", "print_aligned"]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def choice_list(known, what: str):
    """argparse type: a comma-separated subset of ``known``."""

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
        return names

    return parse


def reset_peak_rss() -> bool:
    """Forgets the peak so far (Linux >= 4.0), so transients while loading (torch's import, ORT's graph
    optimiser) are not counted as the forward pass's memory. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


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


def print_aligned(header: list[str], body: list[list[str]], left: tuple[int, ...]) -> None:
    """A plain-text table: columns ``left`` (names, notes) left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *body]:
        cells = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells).rstrip())
