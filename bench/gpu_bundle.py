"""What the GPU check needs brought along to an offline GPU box: wheels and the demo slide, in .gpu-bundle/.

The GPU boxes have Python 3.12, a CUDA 13 torch, Triton, CuPy, nvcc, CMake and ninja, and nothing can be
fetched there. What bench/gpu_check.py needs beyond that travels with the checkout, and everything that
travels (the tracked and untracked-but-not-ignored files, and this folder) must stay within 64 MiB.
This script, run on a machine with network access, fills ``.gpu-bundle/`` (ignored by git):

  wheels/  cuCIM for CUDA 13 and the nvImageCodec codecs it decodes JPEG with on the GPU (GPU decode,
           the GPU tissue mask), and OpenSlide (the slide benchmark's serial baseline); pip download
           --no-deps for the box's Python and platform, each in the order below while the limit allows
  cache/   cmu_small_region.svs, the real slide the tests and the slide benchmark read

and prints each file, what it is for, and the total that would travel against the limit. Not carried,
because they do not fit: onnxruntime-gpu (a 256 MB wheel: ONNX Runtime's CUDA provider stays unchecked
there) and imagecodecs (28 MB: the slide benchmark writes its synthetic slide with deflate tiles
instead of JPEG). Carry the folder to the box with the working tree (the device tool's ``carry``).

    python bench/gpu_bundle.py                  # then: make gpu-check on the GPU box
    python bench/gpu_bundle.py --python-version 3.12 --limit-mib 64
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / ".gpu-bundle"
MIB = 2**20

# (requirement, what it is for), in the order they are taken while the size limit allows
WHEELS = (
    ("cucim-cu13==26.10.0", "cuCIM for CUDA 13: GPU decode and the GPU tissue mask (cucim.skimage on the box's CuPy)"),
    ("nvidia-nvimgcodec-cu13>=0.9,<0.10", "nvImageCodec: the nvJPEG decoder cuCIM 26 decodes with on the GPU"),
    ("openslide-bin==4.0.1.2", "OpenSlide's library: the serial CLAM-style baseline of bench/slides.py"),
    ("openslide-python==1.4.7", "OpenSlide's Python binding"),
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python-version", default="3.12", help="the GPU box's Python (default 3.12)")
    p.add_argument("--limit-mib", type=float, default=64, help="what may travel with the checkout, MiB (default 64)")
    p.add_argument("--margin-mib", type=float, default=2, help="kept free under the limit for files added later (default 2)")
    return p.parse_args(argv)


def traveling_bytes() -> int:
    """Bytes of the files that travel besides the bundle: tracked, and untracked but not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def download(requirement: str, python_version: str, dest: Path) -> Path:
    """One wheel for the box's interpreter and platform, without its dependencies (the box has them)."""
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *platforms,
                   "--python-version", python_version, "--implementation", "cp", "--dest", tmp, requirement]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise SystemExit(f"pip download {requirement} failed: {(done.stderr or done.stdout).strip()[-600:]}")
        target = dest / wheels[0].name
        shutil.move(str(wheels[0]), target)
        return target


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from histosurv.data.demo_slide import demo_slide

    limit = args.limit_mib * MIB
    tree = traveling_bytes()
    wheels_dir = BUNDLE / "wheels"
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)  # one version of each: two of one package stop pip's install on the box
    wheels_dir.mkdir(parents=True)
    slide = demo_slide(BUNDLE / "cache", log=print)
    used = tree + slide.stat().st_size
    print(f"working tree that travels: {tree / MIB:.1f} MiB")
    print(f"{slide.relative_to(ROOT)}: {slide.stat().st_size / MIB:.1f} MiB, the real slide the GPU tests read")
    left_out = []
    for requirement, why in WHEELS:
        wheel = download(requirement, args.python_version, wheels_dir)
        size = wheel.stat().st_size
        if used + size > limit - args.margin_mib * MIB:
            wheel.unlink()
            left_out.append(f"{requirement} ({size / MIB:.1f} MiB): would pass the {args.limit_mib:g} MiB limit")
            continue
        used += size
        print(f"{wheel.relative_to(ROOT)}: {size / MIB:.1f} MiB, {why}")
    for line in left_out:
        print(f"left out: {line}")
    print(f"total that travels: {used / MIB:.1f} MiB of {args.limit_mib:g} MiB")
    return 1 if left_out else 0


if __name__ == "__main__":
    sys.exit(main())
