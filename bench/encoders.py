"""Patch encoders: patches per second and peak memory of each exported engine against the eager model.

For each encoder (``--encoders``) the script exports it once into a model repository (seeded weights:
no published file can be downloaded here, and the weights do not change the arithmetic), then runs
batches of ``--batch`` uint8 patches, each (encoder, engine) in a fresh process, and prints:

* patches/s: ``--batch`` / the median seconds of one call over ``--repeat`` calls after a warm-up;
* peak memory: the process's resident memory above its level before the warm-up (CPU), or the torch
  allocator's peak (GPU; ONNX Runtime's and TensorRT's own device memory is not in it);
* vs eager: patches/s divided by the eager model's, measured in the same run (above 1 is faster);
* parity against the eager FP32 model on the same patches: the largest relative difference and the
  smallest per-patch cosine similarity (``histosurv verify``'s rules: 1e-4 relative for FP32 engines,
  cosine >= 0.999 for FP16 and BF16 ones; a row over its rule makes the run exit 1).

The baseline (``eager``) is the model as TRIDENT runs it (mahmoodlab/TRIDENT, patch_encoder_models):
eager torch under ``torch.inference_mode()``, FP32 on a CPU, and on a GPU under ``torch.autocast``
in the precision TRIDENT gives that encoder (``TRIDENT_PRECISION``). It is histosurv's own network
with the same weights and the same preprocessing inside it (resize, crop, mean/std), so every row
does the same work from uint8 patches to features.

Engines: ``onnxruntime`` (model.onnx, FP32, fused attention), ``torch`` (AOTInductor package for the
CPU), ``torch_bf16`` (the same in bfloat16 after an FP32 preprocessing: native on CPUs with AVX512-BF16
or AMX; nothing to gain on others), and on a GPU ``torch_cuda_fp16`` (AOTInductor, FP16) and
``onnxruntime_fp16`` where ONNX Runtime has its CUDA provider; an engine this machine cannot build or
run becomes a row saying why. (No TensorRT row: histosurv builds no encoder plan yet; the opset-23
graph it would be built from is exported and verified.)

    python bench/encoders.py                                   # CPU: uni and phikon_v2 at batch 16
    python bench/encoders.py --encoders uni --engines onnxruntime --repeat 3
    python bench/encoders.py --device cuda --batch 256         # every encoder on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _cli import args_json, choice_list
from _isolated import run_measurement
from _machine import cpu_model, host_facts, now, package_version
from _report import cell, mb, print_rows, problems_line, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_ENCODERS = ["uni", "phikon_v2"]
CPU_ENGINES = ["eager", "onnxruntime", "torch", "torch_bf16"]
GPU_ENGINES = ["eager", "torch_cuda_fp16", "onnxruntime_fp16"]
# What TRIDENT's loaders give each encoder on a GPU (patch_encoder_models/load.py, `precision`)
TRIDENT_PRECISION = {
    "uni": "fp16", "uni2_h": "bf16", "virchow2": "fp16", "h_optimus_0": "fp16", "gigapath": "fp16",
    "conch_v1_5": "fp16", "phikon_v2": "fp32", "ctranspath": "fp32", "resnet18": "fp32", "resnet50_trunc": "fp32",
}
FP32_TOLERANCE = 1e-4  # relative, as histosurv verify allows an FP32 engine
FP16_MIN_COSINE = 0.999  # per patch, as histosurv verify allows an FP16 engine
SEED = 7


def parse_args(argv=None) -> argparse.Namespace:
    from histosurv.export.models.encoders import ENCODERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--encoders", type=choice_list(ENCODERS, "encoders"),
                   help=f"comma-separated (default: {','.join(CPU_ENCODERS)} on the CPU, every encoder on a GPU)")
    p.add_argument("--engines", type=choice_list(["eager", *CPU_ENGINES, *GPU_ENGINES], "engines"),
                   help="comma-separated; eager is always measured (default: every engine for the device)")
    p.add_argument("--batch", type=int, default=16, help="patches per call")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per engine (median reported)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per engine (0: every core)")
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed calls per engine at most")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the exported repository here")
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--worker", nargs=2, metavar=("ENCODER", "ENGINE"), help=argparse.SUPPRESS)
    p.add_argument("--repo", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--features-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.encoders is None:
        args.encoders = CPU_ENCODERS if args.device == "cpu" else sorted(ENCODERS)
    known = CPU_ENGINES if args.device == "cpu" else GPU_ENGINES
    args.engines = ["eager", *[e for e in (args.engines or known) if e != "eager"]]
    if args.threads <= 0:
        import os

        args.threads = len(os.sched_getaffinity(0))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args, *args.worker)))
        return 0
    print(f"{now()}  {cpu_model()}, {args.threads} threads; torch {package_version('torch')}, "
          f"onnxruntime {package_version('onnxruntime', missing='not installed')}; device {args.device}, "
          f"batch {args.batch}, median of {args.repeat}")
    rows, facts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = args.workdir or Path(tmp) / "repo"
        for encoder in args.encoders:
            facts[encoder] = prepare(repo, encoder, args)
            features = Path(tmp) / encoder
            features.mkdir(exist_ok=True)
            for engine in args.engines:
                rows.append(measure(repo, encoder, engine, features, args))
                print(progress(rows[-1]), flush=True)
            add_ratios([r for r in rows if r["encoder"] == encoder], features)
    print()
    print_rows(rows, COLUMNS, left=LEFT)
    problems = parity_problems(rows)
    print(problems_line(problems))
    if args.json:
        write_json(args.json, {"args": args_json(args, ("worker", "repo", "features_out")), "host": host_facts(),
                               "encoders": facts, "rows": rows})
    return 1 if problems else 0


def prepare(repo: Path, encoder: str, args) -> dict:
    """Exports ``encoder`` into ``repo`` unless it is there, and the engines the run needs that are
    built on the target (AOTInductor packages); returns the export facts for the JSON."""
    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.repository_writer import add_engine
    from histosurv.runtime.repository import ModelRepository

    model = f"{encoder}_encoder"
    timings = {}
    if not (repo / model).is_dir() or not ModelRepository(repo).manifest(model).versions:
        print(f"exporting {encoder} into {repo} (once, not timed) ...")
        t = time.perf_counter()
        # only the graphs this run measures (the FP16 and opset-23 graphs of a ViT-g take minutes)
        wanted = {"onnxruntime_fp16": "onnxruntime_fp16"}
        export_encoder(repo, encoder, artifacts=tuple(wanted[e] for e in args.engines if e in wanted))
        timings["export_s"] = round(time.perf_counter() - t, 1)
    packages = {"torch": {"device": "cpu"}, "torch_bf16": {"device": "cpu", "precision": "bf16"},
                "torch_cuda_fp16": {"device": "cuda", "precision": "fp16"}}
    for key in (e for e in args.engines if e in packages):
        if key not in ModelRepository(repo).version(model).info.engines:
            print(f"compiling the {key} package of {encoder} (once, not timed) ...")
            t = time.perf_counter()
            try:
                add_engine(repo, model, "torch", **packages[key])
                timings[f"{key}_compile_s"] = round(time.perf_counter() - t, 1)
            except Exception as e:  # noqa: BLE001 - the row says why; the other engines still run
                timings[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    mv = ModelRepository(repo).version(model)
    from histosurv.data.typed_json import to_json_dict

    return {"engines": sorted(mv.info.engines), "record": to_json_dict(mv.info.encoder), **timings}


def measure(repo: Path, encoder: str, engine: str, features: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", encoder, engine, "--repo", str(repo),
           "--device", args.device, "--batch", str(args.batch), "--repeat", str(args.repeat),
           "--threads", str(args.threads), "--budget", str(args.budget), "--features-out", str(features / f"{engine}.npy")]
    result = run_measurement(cmd, args.threads, timeout=args.budget * 2 + 600)
    return {"encoder": encoder, "engine": engine, "batch": args.batch, **result}


def worker(args, encoder: str, engine: str) -> dict:
    """One (encoder, engine) in this fresh process: load, warm up, time, keep the features."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import measure as timed
    from histosurv.export.encoder_export import encoder_from_version, example_patches
    from histosurv.runtime.repository import ModelRepository

    torch.set_num_threads(args.threads)
    mv = ModelRepository(args.repo).version(f"{encoder}_encoder")
    patches = example_patches(args.batch, mv.info.encoder.patch_size, seed=SEED)
    if engine == "eager":
        run, extra = eager_runner(encoder_from_version(mv), patches, args.device, TRIDENT_PRECISION.get(encoder, "fp32"))
    else:
        from histosurv.runtime.engines import load_engine

        backend = mv.info.engines[engine].backend if engine in mv.info.engines else None
        options = {"threads": args.threads} if backend in ("onnxruntime", "torch") else {}
        loaded = load_engine(mv, engine, **options)
        if args.device == "cuda" and not str(loaded.device).startswith("cuda"):  # ORT falls back to its CPU provider
            raise SystemExit(f"{engine} would run on {loaded.device}, not the GPU (ONNX Runtime without its CUDA provider)")
        feeds = {"patches": patches.numpy()}
        run = lambda: loaded.run(feeds)["features"]  # noqa: E731
        extra = {k: v for k, v in loaded.describe().items() if k != "engine"}
    out = {}
    result = timed(lambda: out.__setitem__("features", run()), args.repeat, args.budget, args.device == "cuda")
    np.save(args.features_out, np.asarray(out["features"], dtype=np.float32))
    result["patches_per_s"] = args.batch / (result["median_ms"] / 1e3)
    return {**extra, **result}


def eager_runner(model, patches, device: str, precision: str):
    """The baseline as TRIDENT runs it: inference_mode, autocast in its precision on a GPU, FP32 on a CPU.
    The features it keeps for parity come from an FP32 pass, the reference every engine is held to."""
    import torch

    model = model.to(device)
    x = patches.to(device)
    with torch.inference_mode():
        reference = model(x).float().cpu().numpy()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if device == "cuda" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        autocast = torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            model(x)
        sync()
        return reference

    return run, {"device": device, "precision": precision if dtype is not None else "fp32"}


def add_ratios(rows: list[dict], features: Path) -> None:
    """vs eager and parity, for one encoder's rows (the eager row is the reference)."""
    eager = next((r for r in rows if r["engine"] == "eager" and r["status"] == "ok"), None)
    if eager is None:
        return
    reference = np.load(features / "eager.npy")
    for r in rows:
        if r["status"] != "ok":
            continue
        r["vs_eager"] = r["patches_per_s"] / eager["patches_per_s"]
        got = np.load(features / f"{r['engine']}.npy")
        r["max_rel"] = float(np.abs(got - reference).max() / max(float(np.abs(reference).max()), 1e-12))
        cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
        r["min_cosine"] = float(cos.min())


def progress(row: dict) -> str:
    if row["status"] != "ok":
        return f"  {row['encoder']} {row['engine']}: {row['status']} ({row.get('detail', '')})"
    return f"  {row['encoder']} {row['engine']}: {row['patches_per_s']:.2f} patches/s ({row['median_ms']:.0f} ms per batch)"


def parity_problems(rows: list[dict]) -> dict:
    problems = {}
    for r in rows:
        name = f"{r['encoder']}/{r['engine']}"
        if r["status"] != "ok":
            if r["engine"] != "onnxruntime_fp16":  # needs onnxruntime-gpu, which the box may lack
                problems[name] = r["status"]
        elif r["engine"] != "eager":
            low = r.get("precision") in ("fp16", "bf16")
            ok = r.get("min_cosine", 0) >= FP16_MIN_COSINE if low else r.get("max_rel", 1) <= FP32_TOLERANCE
            if not ok:
                problems[name] = "over tolerance"
    return problems


LEFT = ("encoder", "engine", "precision")
COLUMNS = [
    ("encoder", lambda r: r["encoder"]),
    ("engine", lambda r: r["engine"] if r["status"] == "ok" else f"{r['engine']} ({r['status']}: {r.get('detail', '')[:80]})"),
    ("precision", lambda r: r.get("precision", "-")),
    ("batch", lambda r: str(r["batch"])),
    ("patches/s", lambda r: cell(r.get("patches_per_s"), ".2f")),
    ("ms/batch", lambda r: cell(r.get("median_ms"), ".0f")),
    ("peak MB", lambda r: mb(r["gpu_extra_bytes"]) if "gpu_extra_bytes" in r else
        (mb(r["extra_rss_bytes"]) if "extra_rss_bytes" in r else "-")),
    ("vs eager", lambda r: cell(r.get("vs_eager"), ".2f", "x")),
    ("max rel", lambda r: cell(r.get("max_rel"), ".1e")),
    ("min cosine", lambda r: cell(r.get("min_cosine"), ".6f")),
]


if __name__ == "__main__":
    sys.exit(main())
