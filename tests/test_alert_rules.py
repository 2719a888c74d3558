"""deploy/prometheus: the rules parse, and each alert fires where it must and stays quiet where it must
not (``promtool test rules`` on alerts.test.yml). Skipped where promtool is not installed (Debian and
Ubuntu: ``apt-get install prometheus``; elsewhere the Prometheus release tarball)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool is not installed (apt-get install prometheus)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_the_rules_and_the_scrape_config_are_valid():
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        done = _promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say():
    done = _promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # each alert of alerts.yml has cases in the tests: a new alert without them fails here
    alerts = {line.split(":", 1)[1].strip() for line in (RULES / "alerts.yml").read_text().splitlines()
              if line.strip().startswith("- alert:")}
    tested = (RULES / "alerts.test.yml").read_text()
    assert alerts and all(f"alertname: {name}\n" in tested for name in alerts), alerts
