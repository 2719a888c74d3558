"""bench/slides.py --clam: histosurv's CPU slide path, FP32 and INT8, against the real CLAM recipe.

CLAM's extract_features_fp.py, as it runs on a box without a GPU: one OpenSlide ``read_region`` per patch
at level 0 (a 512 px window for 256 px at 0.5 µm/px on a 0.25 µm/px slide), PIL resize to 224, eager
PyTorch FP32, one process. histosurv: the same grid of tissue patches (same coordinates), cuCIM batched
reads with read-ahead, the encoder in ONNX Runtime (FP32 ``onnxruntime``, INT8 ``onnxruntime_int8``).
The INT8 row is the all-INT8 graph, kept whatever its gates say (INT8 at its fastest); ``--int8-gated``
adds the graph ``histosurv export --int8`` keeps: the FP32 fallback, refused where its gates fail
(built in a second repository, as a version holds one INT8 graph).
The tissue mask and grid are made once and excluded from every row; the rows are interleaved (CLAM,
FP32, INT8, twice) and the best of the two passes is kept, so the ratios come from one run. CLAM's
network sees 224 px patches and histosurv's 256 px (as each is run), so CLAM does 23% fewer FLOPs a patch.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from _report import print_rows


def _plan(path: Path, patch_size: int, mpp: float, count: int):
    from histosurv.runtime.pipeline import plan_slide

    plan = plan_slide(path, patch_size, mpp)
    pick = np.unique(np.linspace(0, len(plan.grid) - 1, min(count, len(plan.grid))).astype(int))
    return replace(plan, grid=replace(plan.grid, coords=plan.grid.coords[pick], tissue=plan.grid.tissue[pick]))


def clam_recipe(path: Path, coords: np.ndarray, size0: int, model, batch_size: int) -> float:
    import openslide
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    slide = openslide.OpenSlide(str(path))
    for start in range(0, len(coords), batch_size):
        patches = [np.asarray(slide.read_region((int(x), int(y)), 0, (size0, size0)).convert("RGB")
                              .resize((224, 224), Image.Resampling.BILINEAR)) for x, y in coords[start:start + batch_size]]
        with torch.inference_mode():
            model(torch.from_numpy(np.stack(patches)))  # uint8 NHWC; the model normalises inside, as CLAM's transform
    slide.close()
    return time.perf_counter() - t0


def _ensure_int8(repo: Path, model: str, calibration: Path | None, log=print, gated: bool = False) -> bool:
    """Builds the INT8 encoder into ``repo`` unless it is there: the all-INT8 graph, kept whatever its gates
    say, or (``gated``) the graph the export keeps, with its FP32 fallback. False where it cannot be built
    (no calibration slides; a gated graph whose gates failed)."""
    from histosurv.export.quantize import QuantizationGateError
    from histosurv.export.repository_writer import add_engine
    from histosurv.runtime.repository import ModelRepository

    if "onnxruntime_int8" in ModelRepository(repo).version(model).info.engines:
        return True
    if calibration is None:
        log("no --svs or --int8-calibration: no INT8 rows")
        return False
    kind = "the gated INT8 graph (FP32 fallback)" if gated else "the all-INT8 graph"
    log(f"building {kind} of {model}, calibrated on {calibration} (once, not timed) ...")
    if not gated:
        # these benches time the slide path with INT8 at its fastest; what the gates and the FP32 fallback
        # cost is bench/int8_encoders.py's and --int8-gated's to measure
        add_engine(repo, model, "onnxruntime_int8", calibration=calibration, force=True, fp32_fallback=0, log=log)
        return True
    try:
        add_engine(repo, model, "onnxruntime_int8", calibration=calibration, log=log)
    except QuantizationGateError as e:
        log(f"no gated INT8 row: {e}")
        return False
    return True


def _fallback_label(gate) -> str:
    fallback = (gate.details or {}).get("fp32_fallback") or {}
    kept = len(fallback.get("fp32_ops") or [])
    total = fallback.get("of_ops")
    return f"{kept} of {total} ops FP32" if total else f"{kept} ops FP32"


def bench_clam(path: Path, repo: Path, encoder: str, slide_name: str, count: int, batch_size: int, workers: int,
               calibration: Path | None, gated: bool = False, passes: int = 2) -> list[dict]:
    from _fixtures import ensure_encoder
    from histosurv.export.encoder_export import encoder_from_version
    from histosurv.runtime.pipeline import PatchEncoder, SlideConfig, featurize_slide
    from histosurv.runtime.repository import ModelRepository

    model = ensure_encoder(repo, encoder, log=print)
    labels = {"histosurv FP32": (repo, "onnxruntime")}
    if _ensure_int8(repo, model, calibration):
        labels["histosurv INT8"] = (repo, "onnxruntime_int8")
    gated_repo = repo.with_name(repo.name + "_gated")
    if gated and ensure_encoder(gated_repo, encoder, log=print) and _ensure_int8(gated_repo, model, calibration, gated=True):
        gate = ModelRepository(gated_repo).version(model).info.engines["onnxruntime_int8"]
        labels[f"histosurv INT8 gated ({_fallback_label(gate)})"] = (gated_repo, "onnxruntime_int8")
    encoders = {label: PatchEncoder.from_repository(where, model, engine=key) for label, (where, key) in labels.items()}
    mv = ModelRepository(repo).version(model)
    torch_model = encoder_from_version(mv)
    first = encoders["histosurv FP32"]
    plan = _plan(path, first.patch_size, first.mpp, count)
    config = SlideConfig(batch_size=batch_size, num_workers=workers)
    size0 = plan.grid.size_level0
    best: dict[str, float] = {}
    for _ in range(max(2, passes)):  # interleaved; the first also warms the page cache and the sessions
        best["CLAM recipe (torch FP32)"] = min(best.get("CLAM recipe (torch FP32)", 1e9),
                                               clam_recipe(path, plan.grid.coords, size0, torch_model, batch_size))
        for label, enc in encoders.items():
            t0 = time.perf_counter()
            featurize_slide(path, enc, config, plan=plan)
            best[label] = min(best.get(label, 1e9), time.perf_counter() - t0)
    base = best["CLAM recipe (torch FP32)"]
    rows = [{"part": "clam", "slide": slide_name, "method": k, "patches": len(plan.grid), "level": plan.grid.level,
             "read_px": plan.grid.read_size, "total_s": v, "patches_per_s": len(plan.grid) / v, "vs_clam": base / v}
            for k, v in best.items()]
    for label, (where, key) in labels.items():
        if key == "onnxruntime_int8":
            built = ModelRepository(where).version(model).info.engines[key]
            print(f"{label}: gate {built.details.get('gate')}")
    return rows


def print_clam_table(rows: list[dict], passes: int = 2) -> None:
    print("\nslide -> features on the CPU, the same tissue patches (mask and grid excluded); vs CLAM = CLAM's time / "
          f"this row's, best of {max(2, passes)} interleaved passes\n")
    print_rows(rows, [
        ("slide", lambda r: r["slide"]),
        ("method", lambda r: r["method"]),
        ("patches", lambda r: str(r["patches"])),
        ("read (level, px)", lambda r: f"{r['level']}, {r['read_px']}"),
        ("total s", lambda r: f"{r['total_s']:.2f}"),
        ("patches/s", lambda r: f"{r['patches_per_s']:.1f}"),
        ("vs CLAM", lambda r: f"{r['vs_clam']:.2f}x"),
    ], left=("slide", "method"))
