"""Slide progress as people read it: rewritten in place on a terminal, whole lines in logs (issue 22)."""

from __future__ import annotations

import io

from histosurv.cli._slide_options import progress_printer


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, label: str, total: int = 16) -> None:
    report = progress_printer(label, stream)
    for done in range(0, total + 1, 2):
        report(done, total)


def test_logs_get_whole_lines():
    log = io.StringIO()
    _run(log, "a.tiff")
    _run(log, "b.tiff")  # a second slide must not run on from the first one's last line
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert lines[0] == "a.tiff: 0/16 patches" and lines[-1] == "b.tiff: 16/16 patches"
    assert all(line.endswith(" patches") and line.count(":") == 1 for line in lines)
    assert len([line for line in lines if line.startswith("a.tiff")]) == 5  # 0, 25, 50, 75, 100 %


def test_a_terminal_gets_one_line_rewritten():
    terminal = _Terminal()
    _run(terminal, "a.tiff")
    text = terminal.getvalue()
    assert text.count("\n") == 1 and text.endswith("\ra.tiff: 16/16 patches\n")
    assert text.count("\r") >= 9
