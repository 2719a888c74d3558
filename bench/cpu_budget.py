"""How to share a CPU-only box's cores between the patch encoder and the slide decoder, measured.

Two parts, each in one run so that the ratios compare like with like on a noisy machine:

* ``batch``: the encoder alone (ONNX Runtime, every usable core) on the slide's own tissue patches, at
  batch sizes 1-64, FP32 and (where built) INT8; patches/s and the ratio to batch 32.
* ``split``: the slide path (``featurize_slide``, mask and grid made once and excluded) under several
  shares of the cores: encoder threads, decode workers, and whether ONNX Runtime's idle threads spin.
  ``budget`` is what ``histosurv.runtime.cpu_budget`` chooses here. Configurations are interleaved over
  ``--repeat`` passes and the best pass is kept.

    python bench/cpu_budget.py --svs ~/.cache/histosurv/cmu_small_region.svs
    python bench/cpu_budget.py --svs ~/.cache/histosurv/cmu_small_region.svs --encoder resnet18 --parts split
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from _cli import choice_list  # noqa: E402
from _clam import _ensure_int8  # noqa: E402
from _fixtures import ensure_encoder, tissue_slide  # noqa: E402
from _machine import format_load_average, host_facts, load_average  # noqa: E402
from _report import cell, print_rows, write_json  # noqa: E402

PARTS = ("batch", "split")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", type=choice_list(PARTS, "parts"), default=list(PARTS), help="batch,split (default: both)")
    p.add_argument("--svs", type=Path, required=True, help="a real slide (cmu_small_region.svs); also calibrates INT8")
    p.add_argument("--encoder", default="resnet50_trunc", help="resnet18 or resnet50_trunc (default)")
    p.add_argument("--width", type=int, default=12288, help="synthetic slide width, level-0 px at 0.25 µm/px")
    p.add_argument("--height", type=int, default=9216, help="synthetic slide height, level-0 px")
    p.add_argument("--batches", default="1,8,16,32,64", help="batch part: batch sizes")
    p.add_argument("--patches", type=int, default=128, help="batch part: patches encoded per pass")
    p.add_argument("--repeat", type=int, default=2, help="passes; the best is reported")
    p.add_argument("--no-int8", action="store_true", help="FP32 only (no INT8 graph is built)")
    p.add_argument("--workdir", type=Path, help="keep the repository and synthetic slide here")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def load(repo: Path, model: str, engine: str, threads: int, spinning: bool | None):
    from histosurv.runtime.pipeline import PatchEncoder

    return PatchEncoder.from_repository(repo, model, engine=engine, threads=threads, spinning=spinning)


def slide_patches(path: Path, encoder, count: int) -> np.ndarray:
    """``count`` tissue patches of the slide as the pipeline cuts them (repeated where it has fewer)."""
    from histosurv.runtime.pipeline import plan_slide
    from histosurv.runtime.slides import open_slide
    from histosurv.runtime.slides.stream import PatchStream

    plan = plan_slide(path, encoder.patch_size, encoder.mpp)
    with open_slide(path) as reader, PatchStream(reader, plan.grid, 64) as stream:
        patches = np.concatenate([batch.patches for batch in stream])
    return patches[np.arange(count) % len(patches)]


def bench_batch(repo: Path, model: str, engines: list[str], patches: np.ndarray, batches: list[int], cores: int,
                repeat: int) -> list[dict]:
    rows = []
    for engine in engines:
        encoder = load(repo, model, engine, cores, None)
        encoder.encode(patches[:8])  # ORT's first-run allocations
        best = {}
        for _ in range(repeat):
            for b in batches:
                t = time.perf_counter()
                for start in range(0, len(patches), b):
                    encoder.encode(patches[start : start + b])
                best[b] = min(best.get(b, np.inf), time.perf_counter() - t)
        for b in batches:
            rows.append({"part": "batch", "engine": engine, "batch": b, "patches_per_s": len(patches) / best[b],
                         "vs_32": best.get(32, np.nan) / best[b]})
    return rows


def configurations(cores: int) -> list[tuple[str, int, int, bool | None]]:
    """(label, encoder threads, decode workers, spinning; None: ONNX Runtime's default, which spins): what
    the budget picks and its neighbours."""
    from histosurv.runtime.cpu_budget import cpu_budget

    b = cpu_budget(cores=cores)
    t, w = b.encoder_threads, b.decode_workers
    configs = [("budget", t, w, None), ("budget, no spinning", t, w, False), ("1 worker", t, 1, None),
               ("1 worker, no spinning", t, 1, False), (f"{2 * w} workers", t, 2 * w, None)]
    if cores > 1:
        configs.append(("one core left to decode", cores - 1, w, None))
    return configs


def bench_split(repo: Path, model: str, engines: list[str], slides: list[tuple[str, Path]], cores: int,
                repeat: int) -> list[dict]:
    from histosurv.runtime.pipeline import SlideConfig, featurize_slide, plan_slide

    rows = []
    for engine in engines:
        configs = configurations(cores)
        encoders = {(t, s): load(repo, model, engine, t, s) for _, t, _, s in configs}
        for name, path in slides:
            any_encoder = next(iter(encoders.values()))
            plan = plan_slide(path, any_encoder.patch_size, any_encoder.mpp)
            featurize_slide(path, any_encoder, SlideConfig(), plan=plan)  # warm-up: page cache, first runs
            best: dict[str, float] = {}
            for _ in range(repeat):
                for label, threads, workers, spinning in configs:
                    config = SlideConfig(num_workers=workers, batch_size=32)
                    result = featurize_slide(path, encoders[threads, spinning], config, plan=plan)
                    seconds = result.seconds["total"] - plan.seconds.get("total", 0.0)
                    best[label] = min(best.get(label, np.inf), seconds)
            for label, threads, workers, spinning in configs:
                rows.append({"part": "split", "engine": engine, "slide": name, "patches": len(plan.grid), "config": label,
                             "threads": threads, "workers": workers, "spinning": spinning,
                             "patches_per_s": len(plan.grid) / best[label], "vs_budget": best["budget"] / best[label]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from histosurv.runtime.cpu_budget import cpu_budget, usable_cores

    args = parse_args(argv)
    cores = usable_cores()
    print(f"{host_facts()}; load {format_load_average(load_average())}")
    print(f"cpu_budget here: {cpu_budget().describe()}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="histosurv-cpu-budget-") as tmp:
        workdir = args.workdir or Path(tmp)
        repo = workdir / "bench_repository"
        model = ensure_encoder(repo, args.encoder, log=print)
        engines = ["onnxruntime"] + ([] if args.no_int8 or not _ensure_int8(repo, model, args.svs) else ["onnxruntime_int8"])
        synthetic = workdir / f"synthetic_{args.width}x{args.height}_q90.tif"
        tissue_slide(synthetic, args.width, args.height)
        slides = [("svs", args.svs), (f"synthetic {args.width}x{args.height}", synthetic)]
        if "batch" in args.parts:
            encoder = load(repo, model, "onnxruntime", cores, None)
            patches = slide_patches(synthetic, encoder, args.patches)
            batches = [int(b) for b in args.batches.split(",")]
            batch_rows = bench_batch(repo, model, engines, patches, batches, cores, args.repeat)
            print(f"\nencoder alone ({args.encoder}, {args.patches} patches of the synthetic slide, {cores} threads); "
                  "vs 32 = patches/s over batch 32's\n")
            print_rows(batch_rows, [("engine", lambda r: r["engine"]), ("batch", lambda r: str(r["batch"])),
                                    ("patches/s", lambda r: cell(r["patches_per_s"])),
                                    ("vs 32", lambda r: cell(r["vs_32"], ".2f", "x"))], left=("engine",))
            rows += batch_rows
        if "split" in args.parts:
            split_rows = bench_split(repo, model, engines, slides, cores, args.repeat)
            print(f"\nslide -> features ({args.encoder}, mask and grid excluded, batch 32); vs budget = patches/s over "
                  "the 'budget' row's (what histosurv picks here)\n")
            print_rows(split_rows, [("engine", lambda r: r["engine"]), ("slide", lambda r: r["slide"]),
                                    ("patches", lambda r: str(r["patches"])), ("config", lambda r: r["config"]),
                                    ("threads", lambda r: str(r["threads"])), ("workers", lambda r: str(r["workers"])),
                                    ("patches/s", lambda r: cell(r["patches_per_s"])),
                                    ("vs budget", lambda r: cell(r["vs_budget"], ".2f", "x"))],
                       left=("engine", "slide", "config"))
            rows += split_rows
    if args.json:
        write_json(args.json, {"cores": cores, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
