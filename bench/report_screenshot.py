"""A per-case report of the bundled real slide, opened in headless Chromium and saved as a screenshot.

    python bench/report_screenshot.py [--work DIR] [--out docs/report_screenshot.png]

Builds (once, in a child process) the benchmarks' model repository (bench/_fixtures.py: ResNet18
encoder + AMMASurv trained one epoch on synthetic bags recorded as ResNet18's), runs ``histosurv report``
on the CMU Aperio slide for the cohort's first case, opens the HTML in Chromium from the system packages
(``/usr/bin/chromium``; no network: the page has no URL to fetch) and writes the screenshot, reduced to
256 colours so the README's image stays small. Prints the figures the report printed and the file sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def chromium_screenshot(html: Path, png: Path, width: int = 1200, height: int = 2400, timeout: float = 120) -> None:
    """Opens ``html`` in headless Chromium (a fresh profile) and saves what it shows as ``png``."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
                   f"--window-size={width},{height}", html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not png.is_file():
        raise SystemExit(f"chromium failed (exit status {done.returncode}): {done.stderr[-2000:]}")


def shrink_png(path: Path, margin: int = 16) -> None:
    """Crops the empty page below the report, then 256 colours (median cut): a report is flat colours and
    a few pictures, so it stays readable at a fraction of the bytes."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    used = np.flatnonzero((rgb != rgb[-1, 0]).any(axis=(1, 2)))  # rows not all page background
    rgb = rgb[: min(len(rgb), (used[-1] + 1 + margin) if used.size else len(rgb))]
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "histosurv-report-bench")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "report_screenshot.png")
    p.add_argument("--height", type=int, default=2400, help="screenshot height, px (the width is 1200)")
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child process: build the repository
    args = p.parse_args()
    if args.build:
        print(json.dumps(_fixtures.build_repository(args.build)))
        return 0
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium")
    from histosurv.cli import main as histosurv
    from histosurv.data.demo_slide import demo_slide

    repo = args.work / "model_repository"
    _fixtures.ensure_repository(repo, Path(__file__).resolve())
    cohort = args.work / "cohort"
    if not (cohort / "genes.csv").is_file():  # seeded: the genes of the cohort the model was trained on
        _fixtures.write_cohort(cohort)
    case_id = (cohort / "genes.csv").read_text().splitlines()[1].split(",")[0]
    html = args.work / f"{case_id}.html"
    t = time.perf_counter()
    status = histosurv(["report", "--repo", str(repo), "--slide", str(demo_slide(log=print)), "--genes",
                        str(cohort / "genes.csv"), "--case-id", case_id, "--out", str(html)])
    if status:
        return status
    seconds = time.perf_counter() - t
    shot = args.work / "screenshot.png"
    chromium_screenshot(html, shot, height=args.height)
    shrink_png(shot)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, args.out)
    print(f"report {html} ({html.stat().st_size / 1e3:.0f} kB, {seconds:.1f} s) -> screenshot {args.out} "
          f"({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
