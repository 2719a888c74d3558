"""Whole-slide reading on the CPU: cuCIM, tiffslide and OpenSlide on the same windows of the same slide.

Part 1 (``--parts readers``): windows of 256 x 256 pixels read one at a time at level 0, per reader:

* ``cucim``              ``CuImage.read_region(location, size, 0)`` + ``np.asarray``, one call per window;
* ``cucim batched wW bB`` the iterator ``read_region(locations, size, 0, num_workers=W, batch_size=B)``
                          (W worker threads: with W > 1 it is not single-threaded);
* ``tiffslide``          ``TiffSlide.read_region(..., as_array=True)``;
* ``openslide``          ``OpenSlide.read_region`` + ``convert("RGB")`` (the baseline).

Two sets of windows, identical for every reader and read in the same order:

* ``aligned``: a fixed random sample of windows whose corner is a tile corner (with 256 px tiles each
  window is exactly one tile);
* ``unaligned``: as many random windows at non-tile offsets in x and y (each touches up to 4 tiles).

Each reader gets a freshly opened handle per pass (opening is not timed), so no pass starts with a
tile cache warmed by the previous one; within a pass each library keeps its default cache (cuCIM
none, OpenSlide a 32 MiB tile cache, tiffslide none), as a user gets it. The figure is the best pass
of ``--repeat``; sets smaller than ``--windows`` (a small slide) get proportionally more passes. The
file is read once before timing so every reader finds it in the page cache. ``vs openslide`` is
windows/s divided by OpenSlide's on the same slide and set, measured in the same run (above 1 is
faster). Timings are only meaningful on an otherwise idle machine.

Part 2 (``--parts pipeline``): the whole slide-to-features path (tissue mask, patch grid, patches,
ResNet18 encoder in ONNX Runtime) on the same slides, as a serial CLAM-style loop on OpenSlide (the
baseline) and as histosurv's pipeline on OpenSlide and on cuCIM, with the time split by stage and a
check that all three give the same features.

The slides: a synthetic pyramidal JPEG TIFF written by ``histosurv.data.synthetic_slide`` (pattern
"tissue", q90, 256 px tiles; kept in ``--workdir`` and reused when given, else in a temporary folder)
and, with ``--svs``, a real Aperio slide (e.g. ``cmu_small_region.svs``, 240 px tiles, one level).

    python bench/slides.py                                    # ~20k x 16k synthetic slide, ~1-2 minutes
    python bench/slides.py --svs ~/.cache/histosurv/cmu_small_region.svs --json /tmp/slides.json
    python bench/slides.py --width 8192 --height 6144 --windows 300 --repeat 2
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# All three readers are imported up front, in this order, before any timing: cuCIM's single-read
# speed was seen to depend on what the process had imported before it (shared/research/deps.md, 1).
import tifffile
import openslide

try:  # only the readers part compares it; the GPU check's box (bench/gpu_check.py) goes without
    import tiffslide
except ImportError:
    tiffslide = None
from cucim import CuImage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from _cli import args_json, choice_list, pair_list  # noqa: E402
from _fixtures import ENCODER_PACKAGES, SLIDE_TILE, ensure_encoder, ensure_encoder_engine, tissue_slide  # noqa: E402
from _machine import host_facts, package_version  # noqa: E402
from _report import print_rows, write_json  # noqa: E402

WINDOW = SLIDE_TILE  # one window per tile of the synthetic slide when aligned
BASELINE = "openslide"
OPENSLIDE_CACHE_BYTES = 32 * 2**20  # OpenSlide's default tile cache
PARTS = ("readers", "pipeline", "clam")

Location = tuple[int, int]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=choice_list(PARTS, "parts"), default=["readers", "pipeline"],
                   help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--width", type=int, default=20480, help="synthetic slide width, level-0 px")
    p.add_argument("--height", type=int, default=16384, help="synthetic slide height, level-0 px")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic slide")
    p.add_argument("--compression", choices=["jpeg", "deflate"], default="jpeg",
                   help="tiles of the synthetic slide: jpeg (as scanners write; tifffile needs imagecodecs for it) or deflate")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the synthetic slide here, not in a temporary folder")
    p.add_argument("--svs", type=Path, help="also measure this real slide (e.g. cmu_small_region.svs)")
    p.add_argument("--windows", type=int, default=1000, help="windows per set (aligned, unaligned)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per reader and set (clam part: interleaved "
                   "passes, at least 2); the best is reported")
    p.add_argument("--batched", type=pair_list("WORKERSxBATCH", "1x16,2x16"), default=[(1, 16), (2, 16)],
                   help="cuCIM batched configurations as WORKERSxBATCH, comma-separated (default 1x16,2x16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sample")
    p.add_argument("--json", type=Path, help="also write the facts and rows here")
    p.add_argument("--encoder", default="resnet18", help="pipeline: patch encoder (resnet18 or resnet50_trunc)")
    p.add_argument("--encoder-engine", default="auto", choices=["auto", "onnxruntime", "onnxruntime_int8", *ENCODER_PACKAGES],
                   help="pipeline: the encoder's engine; a torch package (torch_cuda_fp16: FP16 on the GPU) is "
                   "compiled into the bench repository first, not timed")
    p.add_argument("--batch-size", type=int, default=32, help="pipeline: patches per encoder call")
    p.add_argument("--int8", action="store_true", help="pipeline: also the INT8 encoder (built once, calibrated on "
                   "--int8-calibration or --svs, not timed), three more rows per slide")
    p.add_argument("--workers", type=int, default=None, help="pipeline: cuCIM decode workers (default: histosurv's, "
                   "from the cores present)")
    p.add_argument("--device", default="cpu", help="pipeline: decode and mask on cpu or cuda (GPU boxes)")
    p.add_argument("--clam", type=int, default=256, metavar="PATCHES", help="clam part: race the real CLAM recipe (OpenSlide read_region at "
                   "level 0, PIL resize to 224, eager torch FP32, one process) against histosurv FP32 and INT8 on the "
                   "same PATCHES tissue patches of each slide (evenly spaced over its grid)")
    p.add_argument("--int8-calibration", type=Path, help="--clam, --int8: slides to calibrate the INT8 encoder on "
                   "(default: --svs)")
    p.add_argument("--int8-gated", action="store_true", help="clam part: also race the INT8 graph that `histosurv "
                   "export --int8` keeps (its most sensitive ops FP32 until the accuracy gates pass; no row where they "
                   "fail even so), beside the all-INT8 graph")
    args = p.parse_args(argv)
    if "readers" in args.parts and tiffslide is None:
        p.error("the readers part compares tiffslide, which is not installed (pip install tiffslide, or --parts pipeline)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print_header(args)
    with tempfile.TemporaryDirectory(prefix="histosurv-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        synthetic = write_bench_slide(workdir, args.width, args.height, quality=args.quality, compression=args.compression)
        slides = [("synthetic", synthetic)] + ([("svs", args.svs)] if args.svs else [])
        rows: list[dict] = []
        encoder_facts = None
        if "readers" in args.parts:
            for name, path in slides:
                print(f"\n{name}: {describe_slide(path)}")
                print_cache_note(path)
                print_pixel_check(path, args.seed)
                rows += bench_readers(path, windows=args.windows, repeat=args.repeat, batched=args.batched,
                                      seed=args.seed, slide_name=name, log=print)
            print_reader_table(rows)
        if "pipeline" in args.parts:
            pipeline_rows = []
            engines = [args.encoder_engine] + (["onnxruntime_int8"] if args.int8 else [])
            for engine in dict.fromkeys(engines):
                encoder = pipeline_encoder(workdir, args.encoder, engine, args.int8_calibration or args.svs)
                encoder_facts = encoder.engine.describe()
                print(f"encoder: {args.encoder}, {encoder_facts}")
                for name, path in slides:
                    pipeline_rows += bench_pipeline(path, encoder, name, args.batch_size, args.workers, args.device)
            print_pipeline_table(pipeline_rows)
            rows += pipeline_rows
        if "clam" in args.parts:
            from _clam import bench_clam, print_clam_table

            clam_rows = []
            for name, path in slides:
                clam_rows += bench_clam(path, workdir / "bench_repository", args.encoder, name, args.clam, args.batch_size,
                                        args.workers, args.int8_calibration or args.svs, gated=args.int8_gated,
                                        passes=args.repeat)
            print_clam_table(clam_rows, args.repeat)
            rows += clam_rows
    if args.json:
        facts = software_facts() | machine_facts() | {"encoder_engine": encoder_facts}
        write_json(args.json, {"facts": facts, "args": args_json(args), "rows": rows})
        print(f"\nrows written to {args.json}")
    return 0


# --- the slide ------------------------------------------------------------------------------------------


def write_bench_slide(workdir: Path, width: int, height: int, *, quality: int = 90, compression: str = "jpeg",
                      log=print) -> Path:
    """The synthetic JPEG slide in ``workdir``, written unless it is already there (named by its size
    and compression, so a reused file is the same slide)."""
    name = f"q{quality}" if compression == "jpeg" else compression
    path = Path(workdir) / f"synthetic_{width}x{height}_{name}.tif"
    seconds = tissue_slide(path, width, height, quality=quality, compression=compression)
    if seconds is None:
        log(f"reusing {path}")
    else:
        log(f"wrote {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {seconds:.1f} s")
    return path


def describe_slide(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tiles = f"{page.tilewidth} px tiles" if page.is_tiled else "stripped"
        compression = page.compression.name.lower()
    image = CuImage(str(path))
    dims = " / ".join(f"{w}x{h}" for w, h in image.resolutions["level_dimensions"])
    levels = image.resolutions["level_count"]
    return f"{path.name}, {dims} ({levels} level{'s' if levels > 1 else ''}), {tiles}, {compression}"


def print_cache_note(path: Path) -> None:
    """Says when OpenSlide's default tile cache can hold all of level 0: then every repeated tile in a
    pass is a cache hit for OpenSlide only (cuCIM's default is no cache), which flatters it."""
    width, height = CuImage(str(path)).resolutions["level_dimensions"][0]
    decoded = width * height * 4  # OpenSlide caches decoded ARGB tiles
    if decoded <= OPENSLIDE_CACHE_BYTES:
        print(f"  note: level 0 decoded is {decoded / 2**20:.0f} MiB, within OpenSlide's default "
              f"{OPENSLIDE_CACHE_BYTES // 2**20} MiB tile cache: its unaligned figure counts cache hits")


def tile_size(path: Path) -> int:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        return page.tilewidth if page.is_tiled else WINDOW


# --- the windows ----------------------------------------------------------------------------------------


def aligned_windows(width: int, height: int, tile: int, count: int, rng: np.random.Generator) -> list[Location]:
    """Up to ``count`` distinct windows whose corner is a tile corner, in random order."""
    xs, ys = range(0, width - WINDOW + 1, tile), range(0, height - WINDOW + 1, tile)
    n = len(xs) * len(ys)
    picks = rng.choice(n, size=min(count, n), replace=False)
    return [(xs[i % len(xs)], ys[i // len(xs)]) for i in picks]


def unaligned_windows(width: int, height: int, tile: int, count: int, rng: np.random.Generator) -> list[Location]:
    """``count`` random windows whose corner is off the tile grid in both x and y."""
    out: list[Location] = []
    while len(out) < count:
        x, y = int(rng.integers(0, width - WINDOW + 1)), int(rng.integers(0, height - WINDOW + 1))
        if x % tile and y % tile:
            out.append((x, y))
    return out


# --- the readers ----------------------------------------------------------------------------------------

# Each reader: open(path) -> handle, and a pass that reads every window through the handle and
# returns how many it read (the count guards against a batched iterator that drops windows).
Pass = Callable[[object, list[Location]], int]


def _cucim_single(image: CuImage, windows: list[Location]) -> int:
    for location in windows:
        np.asarray(image.read_region(location, (WINDOW, WINDOW), 0))
    return len(windows)


def _cucim_batched(workers: int, batch: int) -> Pass:
    def run(image: CuImage, windows: list[Location]) -> int:
        regions = image.read_region(windows, (WINDOW, WINDOW), 0, num_workers=workers, batch_size=batch)
        return sum(np.asarray(b).reshape(-1, WINDOW, WINDOW, 3).shape[0] for b in regions)

    return run


def _tiffslide(slide: tiffslide.TiffSlide, windows: list[Location]) -> int:
    for location in windows:
        slide.read_region(location, 0, (WINDOW, WINDOW), as_array=True)
    return len(windows)


def _openslide(slide: openslide.OpenSlide, windows: list[Location]) -> int:
    for location in windows:
        np.asarray(slide.read_region(location, 0, (WINDOW, WINDOW)).convert("RGB"))
    return len(windows)


def readers(batched: Sequence[tuple[int, int]]) -> dict[str, tuple[Callable[[Path], object], Pass]]:
    out: dict[str, tuple[Callable[[Path], object], Pass]] = {"cucim": (lambda p: CuImage(str(p)), _cucim_single)}
    for workers, batch in batched:
        out[f"cucim batched w{workers} b{batch}"] = (lambda p: CuImage(str(p)), _cucim_batched(workers, batch))
    out["tiffslide"] = (lambda p: tiffslide.TiffSlide(str(p)), _tiffslide)
    out[BASELINE] = (lambda p: openslide.OpenSlide(str(p)), _openslide)
    return out


def read_one(name: str, path: Path, location: Location) -> np.ndarray:
    """One window through one library, as uint8 RGB (for the pixel check)."""
    if name == "cucim":
        return np.asarray(CuImage(str(path)).read_region(location, (WINDOW, WINDOW), 0))
    if name == "tiffslide":
        return tiffslide.TiffSlide(str(path)).read_region(location, 0, (WINDOW, WINDOW), as_array=True)
    return np.asarray(openslide.OpenSlide(str(path)).read_region(location, 0, (WINDOW, WINDOW)).convert("RGB"))


# --- measuring ------------------------------------------------------------------------------------------


def bench_readers(
    slide_path: Path,
    *,
    windows: int = 1000,
    repeat: int = 3,
    batched: Sequence[tuple[int, int]] = ((1, 16), (2, 16)),
    seed: int = 0,
    slide_name: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Windows per second of every reader on both window sets of one slide; one row per (set, reader),
    with ``vs_baseline`` = windows/s over OpenSlide's on the same set."""
    slide_path = Path(slide_path)
    width, height = CuImage(str(slide_path)).resolutions["level_dimensions"][0]
    if width < WINDOW or height < WINDOW:
        raise ValueError(f"{slide_path}: level 0 is {width} x {height}, smaller than one {WINDOW} px window")
    tile = tile_size(slide_path)
    rng = np.random.default_rng(seed)
    sets = {
        "aligned": aligned_windows(width, height, tile, windows, rng),
        "unaligned": unaligned_windows(width, height, tile, windows, rng),
    }
    warm_page_cache(slide_path)
    rows = []
    for set_name, locations in sets.items():
        # A small slide has few aligned windows; more passes keep the timed work comparable.
        passes = max(repeat, math.ceil(repeat * windows / len(locations)))
        for reader, (open_, run) in readers(batched).items():
            times = time_passes(open_, run, slide_path, locations, passes)
            row = {
                "slide": slide_name or slide_path.name,
                "set": set_name,
                "reader": reader,
                "windows": len(locations),
                "passes": passes,
                "best_s": min(times),
                "median_s": float(np.median(times)),
                "windows_per_s": len(locations) / min(times),
            }
            log(f"  {set_name:9s} {reader:22s} {row['windows_per_s']:8.0f} windows/s "
                f"(best of {passes}: {min(times):.3f} s, median {row['median_s']:.3f} s)")
            rows.append(row)
    add_ratios(rows)
    return rows


def time_passes(
    open_: Callable[[Path], object], run: Pass, path: Path, windows: list[Location], passes: int
) -> list[float]:
    times = []
    for _ in range(passes):
        handle = open_(path)  # fresh per pass: no tile cache carried over from the previous pass
        start = time.perf_counter()
        got = run(handle, windows)
        times.append(time.perf_counter() - start)
        if got != len(windows):
            raise RuntimeError(f"read {got} windows, expected {len(windows)}")
        close = getattr(handle, "close", None)
        if close:
            close()
    return times


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def add_ratios(rows: list[dict]) -> None:
    base = {(r["slide"], r["set"]): r["windows_per_s"] for r in rows if r["reader"] == BASELINE}
    for r in rows:
        b = base.get((r["slide"], r["set"]))
        r["vs_baseline"] = r["windows_per_s"] / b if b else None


def print_pixel_check(path: Path, seed: int, count: int = 4) -> None:
    """Max |difference| between the readers (and a raw tile decode) on a few windows of each set."""
    width, height = CuImage(str(path)).resolutions["level_dimensions"][0]
    tile = tile_size(path)
    rng = np.random.default_rng(seed + 1)
    for set_name, picker in (("aligned", aligned_windows), ("unaligned", unaligned_windows)):
        diffs = {"tiffslide": 0, "openslide": 0}
        raw_diff = 0
        for location in picker(width, height, tile, count, rng):
            ref = read_one("cucim", path, location).astype(np.int16)
            for name in diffs:
                diffs[name] = max(diffs[name], int(np.abs(read_one(name, path, location) - ref).max()))
            if set_name == "aligned" and tile == WINDOW:
                raw_diff = max(raw_diff, int(np.abs(raw_tile(path, location) - ref).max()))
        parts = [f"cucim vs {name} {d}" for name, d in diffs.items()]
        if set_name == "aligned" and tile == WINDOW:
            parts.append(f"cucim vs raw tile decode {raw_diff}")
        print(f"  pixels, {count} {set_name} windows, max |diff|: " + ", ".join(parts))


def raw_tile(path: Path, location: Location) -> np.ndarray:
    """The level-0 tile at ``location`` decoded straight from the file (tifffile + imagecodecs)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = math.ceil(page.imagewidth / page.tilewidth)
        index = (location[1] // page.tilelength) * across + location[0] // page.tilewidth
        tif.filehandle.seek(page.dataoffsets[index])
        data = tif.filehandle.read(page.databytecounts[index])  # before page.decode, whose first use seeks
        return page.decode(data, index)[0][0]


# --- part 2: slide -> tissue mask -> patch grid -> patches -> features --------------------------------


def pipeline_encoder(workdir: Path, name: str, engine: str = "auto", calibration: Path | None = None):
    """The patch encoder as the runtime loads it: exported once into ``workdir`` (not timed)."""
    from histosurv.runtime.pipeline import PatchEncoder

    repo = workdir / "bench_repository"
    log = lambda message: print(f"\n{message}")  # noqa: E731
    model = ensure_encoder(repo, name, log=log)
    if engine in ENCODER_PACKAGES:
        ensure_encoder_engine(repo, model, engine, log=log)
    if engine == "onnxruntime_int8":
        from _clam import _ensure_int8

        if not _ensure_int8(repo, model, calibration, log=log):
            raise SystemExit("--int8 needs --svs or --int8-calibration to calibrate the INT8 encoder on")
    return PatchEncoder.from_repository(repo, model, engine=engine)


def bench_pipeline(path: Path, encoder, slide_name: str, batch_size: int, workers: int, device: str) -> list[dict]:
    """The whole path, three ways, on the same tissue patches and the same encoder engine:

    * ``serial openslide`` (the baseline, as CLAM's extract_features does it): one OpenSlide
      ``read_region`` per patch, then the encoder on each batch; reading and encoding take turns;
    * ``histosurv openslide``: histosurv's pipeline on the OpenSlide reader (read-ahead only);
    * ``histosurv cucim``: the default, cuCIM's batched reads with decode workers plus read-ahead.
    """
    from dataclasses import replace

    from histosurv.runtime.pipeline import SlideConfig, featurize_slide

    config = SlideConfig(batch_size=batch_size, num_workers=workers, device=device)  # workers None: histosurv's choice
    featurize_slide(path, encoder, config)  # warm-up: page cache, ORT's first-run allocations
    rows = [serial_openslide(path, encoder, config, slide_name)]
    for reader in ("openslide", "cucim"):
        on = device if reader == "cucim" else "cpu"  # OpenSlide decodes on the CPU only
        result = featurize_slide(path, encoder, replace(config, reader=reader, device=on))
        rows.append(_pipeline_row(slide_name, f"histosurv {reader}" + (f" ({on})" if on != "cpu" else ""),
                                  len(result.grid), result.seconds, result.bag.features, encoder.engine.key))
    reference = rows[0].pop("features")
    for row in rows[1:]:
        # GPU decode (nvJPEG) differs from libjpeg-turbo by a few pixel levels: its features are close, not equal
        features = row.pop("features")
        row["same_features"] = np.array_equal(features, reference)
        row["max_feature_diff"] = float(np.abs(features - reference).max()) if features.shape == reference.shape else None
    rows[0].update(same_features=True, max_feature_diff=0.0)
    for row in rows:
        row["vs_baseline"] = row["patches_per_s"] / rows[0]["patches_per_s"]
    return rows


def serial_openslide(path: Path, encoder, config, slide_name: str) -> dict:
    from dataclasses import replace

    from histosurv.runtime.slides import open_slide
    from histosurv.runtime.slides.stream import resize_patches
    from histosurv.runtime.slides.tiler import plan_patch_grid
    from histosurv.runtime.slides.tissue import tissue_mask

    seconds = dict.fromkeys(("open", "mask", "grid", "read", "encode", "wait", "total"), 0.0)
    t_start = time.perf_counter()
    with open_slide(path, "openslide") as reader:
        seconds["open"] = time.perf_counter() - t_start
        mask = tissue_mask(reader, config.tissue)
        seconds["mask"] = mask.seconds
        grid = plan_patch_grid(reader, mask, replace(config.grid, patch_size=encoder.patch_size))
        slide = openslide.OpenSlide(str(path))
        features = np.empty((len(grid), encoder.feature_dim), np.float32)
        size = (grid.read_size, grid.read_size)
        for start in range(0, len(grid), config.batch_size):
            t0 = time.perf_counter()
            coords = grid.coords[start : start + config.batch_size]
            patches = np.stack([np.asarray(slide.read_region((int(x), int(y)), grid.level, size).convert("RGB"))
                                for x, y in coords])
            patches = resize_patches(patches, grid.patch_size)
            t1 = time.perf_counter()
            features[start : start + len(coords)] = encoder.encode(patches)
            seconds["read"] += t1 - t0
            seconds["encode"] += time.perf_counter() - t1
        seconds["wait"] = seconds["read"]  # nothing hides the reading
        slide.close()
    seconds["total"] = time.perf_counter() - t_start
    return _pipeline_row(slide_name, "serial openslide", len(grid), seconds, features, encoder.engine.key)


def _pipeline_row(slide_name: str, method: str, patches: int, seconds: dict, features: np.ndarray, engine: str) -> dict:
    return {"part": "pipeline", "slide": slide_name, "method": method, "engine": engine, "patches": patches,
            "patches_per_s": patches / seconds["total"], **{f"{k}_s": v for k, v in seconds.items()},
            "features": features}


def print_pipeline_table(rows: list[dict]) -> None:
    print("\nslide -> features (256 px patches at 0.5 µm/px), whole path; vs serial = patches/s over the serial "
          "OpenSlide baseline;\nread and encode overlap in histosurv's rows, so they add up to more than the total; "
          "'wait' is the reading\nthe overlap did not hide\n")
    print_rows(rows, [
        ("slide", lambda r: r["slide"]),
        ("method", lambda r: r["method"]),
        ("encoder engine", lambda r: r["engine"]),
        ("patches", lambda r: str(r["patches"])),
        ("total s", lambda r: f"{r['total_s']:.2f}"),
        ("patches/s", lambda r: f"{r['patches_per_s']:.1f}"),
        ("vs serial", lambda r: f"{r['vs_baseline']:.2f}x"),
        ("mask s", lambda r: f"{r['mask_s']:.2f}"),
        ("read s", lambda r: f"{r['read_s']:.2f}"),
        ("encode s", lambda r: f"{r['encode_s']:.2f}"),
        ("wait s", lambda r: f"{r['wait_s']:.2f}"),
        ("same features", lambda r: "yes" if r["same_features"] else "NO"),
    ], left=("slide", "method", "encoder engine"))


# --- output ---------------------------------------------------------------------------------------------


def print_reader_table(rows: list[dict]) -> None:
    print("\n256 x 256 windows at level 0, windows/s (best pass); vs openslide = windows/s / OpenSlide's\n")
    print_rows(rows, [
        ("slide", lambda r: r["slide"]),
        ("set", lambda r: r["set"]),
        ("reader", lambda r: r["reader"]),
        ("windows", lambda r: str(r["windows"])),
        ("windows/s", lambda r: f"{r['windows_per_s']:.0f}"),
        ("ms/window", lambda r: f"{1e3 / r['windows_per_s']:.2f}"),
        ("vs openslide", lambda r: f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] else "n/a"),
    ], left=("slide", "set", "reader"))


def software_facts() -> dict:
    return {
        "cucim": package_version("cucim-cu12", "cucim-cu13", missing="unknown"),
        "openslide-python": openslide.__version__,
        "openslide": openslide.__library_version__,
        "tiffslide": package_version("tiffslide"),
        "tifffile": tifffile.__version__,
        "imagecodecs": package_version("imagecodecs"),
        "numpy": np.__version__,
    }


def machine_facts() -> dict:
    return {k: v for k, v in host_facts().items() if k in ("cpu", "logical_cpus", "platform", "python")}


def print_header(args: argparse.Namespace) -> None:
    m, s = machine_facts(), software_facts()
    print(f"Whole-slide reading, decode and tissue mask on {'the CPU' if args.device == 'cpu' else args.device}")
    print(f"machine : {m['cpu']}, {m['logical_cpus']} logical CPUs; {m['platform']}")
    print(f"software: python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in s.items()))
    batched = ", ".join(f"{w} worker(s) x batch {b}" for w, b in args.batched)
    print(f"runs    : {args.windows} windows per set, best of {args.repeat} passes (more for small sets), "
          f"fresh handle per pass, seed {args.seed}; cuCIM batched: {batched}")


if __name__ == "__main__":
    sys.exit(main())
