"""INT8 patch encoders, one row per architecture: the accuracy gates and the speed over FP32.

For each encoder: exported with seeded weights (pretrained files are not downloadable here; give
``--weights NAME=FILE`` where you have them), its INT8 graph built as ``histosurv export --add-engine
onnxruntime_int8 --calibration SLIDE --force`` builds it (kept whatever the gates say, so that a failed
one can be timed), then FP32 and INT8 ONNX Runtime on the same tissue patches at ``--batch``, every
usable core, interleaved over ``--repeat`` passes (best kept): patches/s and INT8 over FP32.

    python bench/int8_encoders.py --svs ~/.cache/histosurv/cmu_small_region.svs
    python bench/int8_encoders.py --svs ~/.cache/histosurv/cmu_small_region.svs --encoders ctranspath,uni --patches 32
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
from _machine import format_load_average, host_facts, load_average  # noqa: E402
from _report import cell, print_rows, write_json  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--svs", type=Path, required=True, help="the calibration slide (and the timed patches' source)")
    p.add_argument("--encoders", default="resnet18,resnet50_trunc,ctranspath,uni",
                   help="encoder families, comma-separated (default: resnet18,resnet50_trunc,ctranspath,uni)")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=FILE", help="pretrained weights for NAME")
    p.add_argument("--calibration-patches", type=int, default=None, help="as export's --calibration-patches")
    p.add_argument("--fp32-fallback", type=float, default=None, help="as export's --fp32-fallback (default 0.5)")
    p.add_argument("--no-bias-correction", action="store_true", help="as export's --no-bias-correction")
    p.add_argument("--weight-rounding", choices=("gptq", "nearest"), help="as export's --weight-rounding (default gptq)")
    p.add_argument("--batch", type=int, default=32, help="patches per call when timed (default 32)")
    p.add_argument("--patches", type=int, default=64, help="patches timed per pass (default 64)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the repository here")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def timed_patches(version, svs: Path, count: int) -> np.ndarray:
    from histosurv.export.quantize import calibration_patches

    record = version.encoder_record
    patches, _ = calibration_patches(svs, record.patch_size, record.mpp, count, seed=1, log=lambda _: None)
    return patches[np.arange(count) % len(patches)]


def measure(repo: Path, model: str, svs: Path, batch: int, count: int, repeat: int) -> dict:
    from histosurv.runtime.pipeline import PatchEncoder
    from histosurv.runtime.repository import ModelRepository

    mv = ModelRepository(repo).version(model)
    entry = mv.info.engines["onnxruntime_int8"]
    gate, details = entry.details["gate"], entry.details
    patches = timed_patches(mv, svs, count)
    encoders = {key: PatchEncoder.from_repository(repo, model, engine=key) for key in ("onnxruntime", "onnxruntime_int8")}
    best = dict.fromkeys(encoders, np.inf)
    for encoder in encoders.values():
        encoder.encode(patches[:2])  # first-run allocations
    for _ in range(repeat):
        for key, encoder in encoders.items():
            t = time.perf_counter()
            for start in range(0, len(patches), batch):
                encoder.encode(patches[start : start + batch])
            best[key] = min(best[key], time.perf_counter() - t)
    down = gate["downstream"]
    return {
        "encoder": model.removesuffix("_encoder"),
        "quantized_ops": ", ".join(f"{k} {v}" for k, v in sorted(details["quantized_ops"].items())),
        "float_ops": details["float_matmul_or_conv_ops"],
        "fallback_ops": len(details.get("fp32_fallback", {}).get("fp32_ops", [])),
        "bias_corrected": (details.get("bias_correction") or {}).get("ops", 0),
        "gptq": (details.get("weight_rounding") or {}).get("ops", 0),
        "cosine_min": gate["cosine_min"], "cosine_p1": gate["cosine_p1"], "spearman": down["spearman"],
        "spearman_min": down["spearman_min"], "c_index_change": down["c_index_change"], "passed": gate["passed"],
        "failed": gate.get("failed", []), "held_out": gate["held_out_patches"],
        "fp32_per_s": count / best["onnxruntime"], "int8_per_s": count / best["onnxruntime_int8"],
        "speedup": best["onnxruntime"] / best["onnxruntime_int8"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.repository_writer import add_engine
    from histosurv.runtime.cpu_budget import usable_cores
    from histosurv.runtime.repository import ModelRepository

    args = parse_args(argv)
    weights = dict(w.split("=", 1) for w in args.weights)
    print(f"{host_facts()}; load {format_load_average(load_average())}; {usable_cores()} ONNX Runtime threads")
    rows = []
    with tempfile.TemporaryDirectory(prefix="histosurv-int8-") as tmp:
        repo = (args.workdir or Path(tmp)) / "repository"
        for name in args.encoders.split(","):
            model = f"{name}_encoder"
            if not (repo / model).is_dir():
                print(f"exporting {name} ({'weights ' + weights[name] if name in weights else 'seeded weights'}) ...", flush=True)
                export_encoder(repo, name, weights=weights.get(name), artifacts=())
            if "onnxruntime_int8" not in ModelRepository(repo).version(model).info.engines:
                t = time.perf_counter()
                add_engine(repo, model, "onnxruntime_int8", calibration=args.svs, calibration_patches=args.calibration_patches,
                           fp32_fallback=args.fp32_fallback, bias_correction=False if args.no_bias_correction else None,
                           weight_rounding=args.weight_rounding,
                           force=True, log=lambda m: print(f"  {m}", flush=True))
                print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
            rows.append(measure(repo, model, args.svs, args.batch, args.patches, args.repeat))
            print(f"  {rows[-1]}", flush=True)
    print(f"\nINT8 vs FP32, ONNX Runtime, batch {args.batch}, {args.patches} tissue patches of {args.svs.name}; gates on the "
          "held-back calibration patches (cosine >= 0.99 per patch, downstream risk Spearman >= 0.99)\n")
    print_rows(rows, [
        ("encoder", lambda r: r["encoder"]), ("quantised", lambda r: r["quantized_ops"]),
        ("left FP32", lambda r: str(r["float_ops"])), ("of which fallback", lambda r: str(r["fallback_ops"])),
        ("GPTQ-rounded", lambda r: str(r["gptq"])), ("bias-corrected", lambda r: str(r["bias_corrected"])),
        ("cosine min", lambda r: cell(r["cosine_min"], ".5f")), ("cosine p1", lambda r: cell(r["cosine_p1"], ".5f")),
        ("Spearman", lambda r: cell(r["spearman"], ".4f")), ("worst", lambda r: cell(r["spearman_min"], ".4f")),
        ("Δ c-index", lambda r: cell(r["c_index_change"], "+.4f")), ("gates", lambda r: "passed" if r["passed"] else "failed"),
        ("FP32 /s", lambda r: cell(r["fp32_per_s"])), ("INT8 /s", lambda r: cell(r["int8_per_s"])),
        ("INT8/FP32", lambda r: cell(r["speedup"], ".2f", "x")),
    ], left=("encoder", "quantised", "gates"))
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
