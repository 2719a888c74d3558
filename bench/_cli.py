"""Pieces the benchmark scripts share; no torch here (the parents must not import it)."""

from __future__ import annotations

import argparse

__all__ = ["int_list", "choice_list", "reset_peak_rss"]


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
