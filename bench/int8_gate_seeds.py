"""How reliably an INT8 encoder meets its gates: the export's INT8 build repeated with other calibration
samples, per weight rounding.

The gate figures are measured on a quarter of the tissue patches held back from calibration; which
quarter is the calibration seed's draw. A graph whose figure sits near the threshold passes for some
draws and fails for others, so one build says little. For each seed and each ``--weight-rounding``
(GPTQ, the export's default, and nearest rounding) this builds the INT8 graph exactly as ``histosurv
export --add-engine onnxruntime_int8`` does (FP32 fallback included, ``force`` so that a failed one is
reported rather than raised) and prints its held-back figures, how many ops the fallback kept FP32, and
the pass count. No timing: the graphs' speed is bench/int8_encoders.py's.

    python bench/int8_gate_seeds.py --svs ~/.cache/histosurv/cmu_small_region.svs --encoder resnet50_trunc --seeds 0,1,2,3,4,5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from _machine import format_load_average, host_facts, load_average  # noqa: E402
from _report import cell, print_rows, write_json  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--svs", type=Path, required=True, help="the calibration slide")
    p.add_argument("--encoder", default="resnet50_trunc", help="encoder family (default resnet50_trunc)")
    p.add_argument("--weights", help="pretrained weights for it (default: seeded)")
    p.add_argument("--seeds", default="0,1,2,3,4,5", help="calibration seeds, comma-separated (default 0-5)")
    p.add_argument("--roundings", default="gptq,nearest", help="weight roundings, comma-separated (default gptq,nearest)")
    p.add_argument("--calibration-patches", type=int, default=None, help="as export's --calibration-patches")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.quantize import build_int8_encoder

    args = parse_args(argv)
    print(f"{host_facts()}; load {format_load_average(load_average())}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="histosurv-int8-seeds-") as tmp:
        print(f"exporting {args.encoder} ({'weights ' + args.weights if args.weights else 'seeded weights'}) ...", flush=True)
        version = export_encoder(Path(tmp) / "repository", args.encoder, weights=args.weights, artifacts=())
        for rounding in args.roundings.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                t = time.perf_counter()
                entry = build_int8_encoder(version, Path(tmp) / f"{rounding}-{seed}.onnx", args.svs,
                                           args.calibration_patches, force=True, weight_rounding=rounding, seed=seed)
                details, gate = entry.details, entry.details["gate"]
                fallback = details["fp32_fallback"]
                first = fallback.get("all_int8", {}).get("spearman", gate["downstream"]["spearman"])
                rows.append({
                    "rounding": rounding, "seed": seed, "held_out": gate["held_out_patches"],
                    "all_int8_spearman": first, "fp32_ops": len(fallback["fp32_ops"]), "cosine_min": gate["cosine_min"],
                    "spearman": gate["downstream"]["spearman"], "spearman_min": gate["downstream"]["spearman_min"],
                    "c_index_change": gate["downstream"]["c_index_change"], "passed": gate["passed"],
                    "seconds": time.perf_counter() - t,
                })
                print(f"  {rows[-1]}", flush=True)
    print(f"\n{args.encoder} INT8, built as the export builds it, once per calibration seed (which quarter of the tissue "
          f"patches of {args.svs.name} is held back for the gates)\n")
    print_rows(rows, [
        ("rounding", lambda r: r["rounding"]), ("seed", lambda r: str(r["seed"])), ("held back", lambda r: str(r["held_out"])),
        ("all-INT8 Spearman", lambda r: cell(r["all_int8_spearman"], ".4f")), ("ops kept FP32", lambda r: str(r["fp32_ops"])),
        ("cosine min", lambda r: cell(r["cosine_min"], ".5f")), ("Spearman", lambda r: cell(r["spearman"], ".4f")),
        ("worst", lambda r: cell(r["spearman_min"], ".4f")), ("Δ c-index", lambda r: cell(r["c_index_change"], "+.4f")),
        ("gates", lambda r: "passed" if r["passed"] else "failed"), ("build s", lambda r: cell(r["seconds"], ".0f")),
    ], left=("rounding", "gates"))
    print()
    for rounding in args.roundings.split(","):
        mine = [r for r in rows if r["rounding"] == rounding]
        print(f"{rounding}: gates passed for {sum(r['passed'] for r in mine)} of {len(mine)} seeds; all-INT8 passed for "
              f"{sum(r['fp32_ops'] == 0 and r['passed'] for r in mine)}")
    if args.json:
        write_json(args.json, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
