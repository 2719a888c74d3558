"""The code that runs inside the benchmark's fresh subprocesses: the one-off export and one measurement each.

The parent (fusion.py) never imports this module. A child's ``ru_maxrss`` starts at the parent's own
peak (Linux carries the high-water mark across fork and exec), so a parent that had loaded torch or
run the export would inflate every worker's peak.
"""

from __future__ import annotations

import gc
import importlib.metadata
import resource
import statistics
import time

import psutil
import torch
from torch import nn

from histosurv.export.models import build_model
from histosurv.export.models.ammasurv import AMMASurvConfig
from histosurv.export.onnx_export import example_inputs, export_onnx

CONFIG = AMMASurvConfig(n_genes=200, feature_dim=512)  # paper defaults: d = 512 + 32, 8 heads, 2 layers
TORCH_ENGINES = ("naive", "sdpa")


def build(attention_impl: str) -> nn.Module:
    torch.manual_seed(0)  # every process, and the exported graph, must hold the same weights
    return build_model("ammasurv", CONFIG, attention_impl=attention_impl).eval()


def prepare(onnx_path: str | None) -> dict:
    """Facts the parent needs for its header and estimates; exports the ONNX file when asked."""
    model = build("sdpa")
    encoder = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    facts = {
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "config": CONFIG.to_dict(),
        "dim": CONFIG.dim,
        "heads": CONFIG.heads,
        "depth": CONFIG.depth,
        "gene_tokens": CONFIG.gene_groups,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_linear_params": sum(p.numel() for m in encoder for p in m.parameters()),
    }
    if onnx_path:
        facts["onnx"] = export_onnx(model, onnx_path)
    return facts


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def worker(engine: str, n: int, onnx_path: str | None, repeat: int, threads: int) -> dict:
    """One (engine, N) measurement in this process; returns the JSON-able result."""
    if engine in TORCH_ENGINES:
        run, extra = _torch_runner(engine, n, threads)
    elif engine == "onnxruntime":
        run, extra = _ort_runner(onnx_path, n, threads)
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    return {"engine": engine, "n": n, "threads": threads, **extra, **measure(run, repeat)}


def _torch_runner(engine: str, n: int, threads: int):
    torch.set_num_threads(threads)
    model = build(engine)
    batched = {k: v[None] for k, v in example_inputs(model, n=n, seed=0).items()}

    def run():
        with torch.inference_mode():
            model(**batched, return_attention=True)

    return run, {"intra_op_threads": torch.get_num_threads()}


def _ort_runner(onnx_path: str | None, n: int, threads: int):
    import onnxruntime as ort

    if not onnx_path:
        raise SystemExit("the onnxruntime engine needs the exported ONNX path")
    # Inputs come from the torch model (same generator, same gene scaler); drop it before the session
    # so its weights are not resident next to the session's copy.
    model = build("sdpa")
    feeds = {k: v.numpy() for k, v in example_inputs(model, n=n, seed=0).items()}
    del model
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # as histosurv's engine runs it (runtime/engines/ort.py)
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    providers = session.get_providers()
    if providers[0] != "CPUExecutionProvider":
        raise SystemExit(f"ONNX Runtime runs on {providers}, not the CPU provider this benchmark is about")
    return (lambda: session.run(None, feeds)), {"providers": providers}


def measure(run, repeat: int) -> dict:
    """Median wall time of ``repeat`` runs after one warm-up, and the process's peak RSS around them."""
    gc.collect()
    peak_reset = reset_peak_rss()
    baseline = psutil.Process().memory_info().rss
    run()  # warm-up: first-call allocations, kernel selection, ORT's lazy initialisation
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "median_ms": statistics.median(times),
        "times_ms": times,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "extra_rss_bytes": peak - baseline,
        "peak_reset": peak_reset,
    }


def reset_peak_rss() -> bool:
    """Forgets the peak so far (Linux >= 4.0), so transients while loading (torch's import, ORT's graph
    optimiser) are not counted as the forward pass's memory. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
