"""The live line of a batch run: slides done, failures, slides per hour, time left."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, already: int = 0, stream=None, every: float = 30.0):
        self.total, self.already = total, already
        self.done = self.failed = 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every  # seconds between lines when the output is a log file, not a terminal
        self.started = self._last = time.monotonic()

    def update(self, record: dict) -> None:
        self.done += 1
        self.failed += record.get("status") == "failed"
        now = time.monotonic()
        if self.tty or now - self._last >= self.every or self.done == self.total - self.already:
            self._last = now
            end = "" if self.tty and self.done < self.total - self.already else "\n"
            print(("\r" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)

    @property
    def per_hour(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed * 3600 if elapsed > 0 and self.done else 0.0

    def line(self) -> str:
        left = self.total - self.already - self.done
        eta = left / self.per_hour * 3600 if self.per_hour else float("nan")
        return (
            f"{self.already + self.done}/{self.total} slides ({self.failed} failed this run, {self.already} done before), "
            f"{self.per_hour:.0f} slides/h, ETA {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured yet
        return "-"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
