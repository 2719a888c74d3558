"""Full-size parity of every patch encoder: exported, fused, and ONNX Runtime against eager PyTorch.

The suite exports full-size UNI only (tests/test_vit.py); the others are too large for CI on two cores
(up to 1.1 B parameters, 4.5 GB of FP32 weights). This script does, for each encoder, what a lab does
with the authors' file (seeded weights here: none can be downloaded), each in a fresh process so one
encoder's memory is gone before the next:

* ``histosurv export --encoder NAME``: the ONNX graph (every attention fused, counted against the
  network's), and with ``--fp16`` the FP16 graph too;
* ``histosurv verify``: each graph against the eager FP32 model at ``--batches`` (FP32 within 1e-4
  relative; FP16 cosine >= 0.999 per patch), in ONNX Runtime's CPU provider.

It prints, per encoder: parameters, export seconds, fused attentions, the graph's size (weights beside
it above 1 GiB), and the largest relative difference (and FP16's smallest cosine) at each batch. A
graph over its tolerance makes the run exit 1.

    python bench/encoder_parity.py                                  # every encoder, about 40 minutes on 2 cores
    python bench/encoder_parity.py --encoders virchow2,gigapath --batches 1,4 --fp16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _cli import choice_list, positive_int_list
from _machine import cpu_model, now, package_version
from _report import print_aligned, problems_line, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from histosurv.export.models.encoders import ENCODERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", type=choice_list(ENCODERS, "encoders"), default=sorted(ENCODERS))
    p.add_argument("--batches", type=positive_int_list, default=[1, 4], help="batch sizes verified")
    p.add_argument("--fp16", action="store_true", help="also export and verify the FP16 graph")
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.repo, args.batches, args.fp16)))
        return 0
    print(f"{now()}  {cpu_model()}; torch {package_version('torch')}, onnxruntime {package_version('onnxruntime')}; "
          f"batches {', '.join(map(str, args.batches))}")
    rows = []
    for name in args.encoders:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--repo", str(Path(tmp) / "repo"),
                   "--batches", ",".join(map(str, args.batches)), *(["--fp16"] if args.fp16 else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                detail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rows.append({"encoder": name, "status": "failed", "detail": detail})
            else:
                rows.append({"encoder": name, "status": "ok", **json.loads(lines[-1])})
        print(line(rows[-1]), flush=True)
    print()
    table(rows, args.batches)
    problems = {r["encoder"]: r.get("detail", "over tolerance") for r in rows if r["status"] != "ok" or not r["passed"]}
    print(problems_line(problems))
    if args.json:
        write_json(args.json, {"batches": args.batches, "rows": rows})
    return 1 if problems else 0


def worker(name: str, repo: Path, batches: list[int], fp16: bool) -> dict:
    from safetensors import safe_open

    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.verify import verify_version

    t = time.perf_counter()
    mv = export_encoder(repo, name, artifacts=("onnxruntime_fp16",) if fp16 else ())
    export_s = time.perf_counter() - t
    entry = mv.info.engines["onnxruntime"]
    files = {f: (mv.path / f).stat().st_size for f in mv.info.files if f.startswith("model.onnx")}
    with safe_open(str(mv.path / mv.info.reference.file), "pt") as f:  # the published tensors: the parameters
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    t = time.perf_counter()
    reports = verify_version(repo, mv.name, sizes=tuple(batches))
    verify_s = time.perf_counter() - t
    out = {"params": params, "export_s": round(export_s, 1), "verify_s": round(verify_s, 1),
           "attention_fused": entry.details["ops"].get("com.microsoft::MultiHeadAttention", 0),
           "graph_bytes": files, "passed": all(r.passed for r in reports), "engines": {}}
    for r in reports:
        out["engines"][r.engine] = {"rows": [{"n": row["n"], "rel": row["features_rel"],
                                               "cosine": row.get("features_cosine_min")} for row in r.rows],
                                    "passed": r.passed}
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def line(row: dict) -> str:
    if row["status"] != "ok":
        return f"  {row['encoder']}: {row['status']} ({row['detail']})"
    fp32 = row["engines"].get("onnxruntime", {}).get("rows", [])
    return (f"  {row['encoder']}: {row['params'] / 1e6:.0f} M parameters, exported in {row['export_s']:.0f} s, "
            f"{row['attention_fused']} fused attentions, FP32 rel {max((r['rel'] for r in fp32), default=float('nan')):.1e}")


def table(rows: list[dict], batches: list[int]) -> None:
    header = ["encoder", "params M", "export s", "fused attn", "graph MB"] + [f"fp32 rel @{b}" for b in batches]
    header += [f"fp16 cos @{b}" for b in batches] if any("onnxruntime_fp16" in r.get("engines", {}) for r in rows) else []
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["encoder"], r["status"], r.get("detail", "")[:40]] + [""] * (len(header) - 3))
            continue
        fp32 = {x["n"]: x["rel"] for x in r["engines"].get("onnxruntime", {}).get("rows", [])}
        fp16 = {x["n"]: x["cosine"] for x in r["engines"].get("onnxruntime_fp16", {}).get("rows", [])}
        cells = [r["encoder"], f"{r['params'] / 1e6:.0f}", f"{r['export_s']:.0f}", str(r["attention_fused"]),
                 f"{sum(r['graph_bytes'].values()) / 1e6:.0f}"]
        cells += [f"{fp32[b]:.1e}" if b in fp32 else "-" for b in batches]
        if len(header) > len(cells):
            cells += [f"{fp16[b]:.6f}" if fp16.get(b) is not None else "-" for b in batches]
        body.append(cells)
    print_aligned(header, body)


if __name__ == "__main__":
    sys.exit(main())
