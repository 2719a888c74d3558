"""The two install sets side by side: what each puts on disk and how fast its commands start.

Builds two fresh venvs from a copy of this checkout (so pip writes no build/ into it): the serving set
(``pip install .``, no torch) and the training set (``pip install torch==2.13.0`` first, then
``'.[train]'``), and measures in each, best of ``--repeat`` runs:

* the size of site-packages;
* ``histosurv --help`` (every command's parser; the training set's lists the model zoo's options,
  which imports torch);
* importing what ``serve`` and ``predict`` load (the server, the slide pipeline, batch scoring);

and prints the serving set's figures as ratios against the training set's of the same run. Installs
from PyPI or pip's cache (minutes the first time); ``--keep`` leaves the venvs for another look.

    python bench/install.py [--work DIR] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import host_facts, now
from _cli import args_json
from _report import print_aligned, write_json

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU wheel the Makefile installs; an unpinned torch is a multi-GB CUDA build
SERVING_IMPORTS = "import histosurv.cli.serve, histosurv.cli.predict, histosurv.runtime.server.app, " \
                  "histosurv.runtime.pipeline, histosurv.runtime.batch.runner"
SETS = {"serving": [], "training": [TORCH]}  # extra pip installs before the checkout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, help="folder for the two venvs (default: a temporary one)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure, best kept (default: 5)")
    p.add_argument("--keep", action="store_true", help="keep the venvs")
    p.add_argument("--json", type=Path, help="write every figure here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="histosurv-install-"))
    host = host_facts()
    print(f"install sets of {ROOT} in {work}, {now()}; {host['cpu']}, {host['logical_cpus']} CPUs, Python {host['python']}")
    source = _copy_checkout(work / "src")
    results = {name: measure(work / name, source, extra, args.repeat) for name, extra in SETS.items()}
    base = results["training"]
    rows = [[name, f"{r['mb']:,.0f} MB", f"{r['help_s']:.2f} s", f"{r['import_s']:.2f} s", f"{r['install_s']:.0f} s",
             "-" if name == "training" else f"{r['mb'] / base['mb']:.2f}x size, {r['help_s'] / base['help_s']:.2f}x help"]
            for name, r in results.items()]
    print_aligned(["set", "site-packages", "histosurv --help", "import serve+predict", "install", "vs training"], rows)
    if args.json:
        write_json(args.json, {"args": args_json(args), "results": results})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _copy_checkout(dest: Path) -> Path:
    shutil.copytree(ROOT / "histosurv", dest / "histosurv", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def measure(venv: Path, source: Path, extra: list[str], repeat: int) -> dict:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    started = time.perf_counter()
    for spec in extra:
        _pip(python, spec)
    _pip(python, f"{source}[train]" if extra else str(source))
    installed = time.perf_counter() - started
    site = next((venv / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())
    has_torch = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    return {
        "mb": size / 1e6,
        "torch": has_torch,
        "install_s": installed,
        "help_s": _best([str(venv / "bin" / "histosurv"), "--help"], repeat),
        "import_s": _best([python, "-c", SERVING_IMPORTS], repeat),
    }


def _pip(python: str, spec: str) -> None:
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", spec],
                          capture_output=True, text=True)
    if done.returncode != 0:  # pip's warnings about absent local index folders are noise; its errors are not
        raise SystemExit(f"pip install {spec} failed:\n{done.stderr[-3000:]}")


def _best(command: list[str], repeat: int) -> float:
    """Wall seconds of the fastest of ``repeat`` runs (the others waited for a busy machine)."""
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return min(times)


if __name__ == "__main__":
    sys.exit(main())
