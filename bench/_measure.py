"""The code that runs inside the benchmark's fresh subprocesses: the one-off export and one measurement each.

The parent (engines.py) never imports this module. A child's ``ru_maxrss`` starts at the parent's own
peak (Linux carries the high-water mark across fork and exec), so a parent that had loaded torch or
run the export would inflate every worker's peak.

Engines other than the two eager torch baselines are the artifacts of a real model repository, loaded
with ``histosurv.runtime.engines.load_engine`` exactly as ``histosurv predict`` and the server load them.
"""

from __future__ import annotations

import gc
import statistics

import torch
from torch import nn

from _isolated import peak_rss_bytes, reset_peak_rss, rss_bytes, time_calls
from _machine import package_version
from histosurv.export.models import build_model
from histosurv.export.models.ammasurv import AMMASurvConfig
from histosurv.export.onnx_export import example_inputs

CONFIG = AMMASurvConfig(n_genes=200, feature_dim=512)  # paper defaults: d = 512 + 32, 8 heads, 2 layers
EAGER = ("naive", "sdpa")
MODEL = "ammasurv"


def build(attention_impl: str) -> nn.Module:
    torch.manual_seed(0)  # every process, and the exported artifacts, must hold the same weights
    return build_model("ammasurv", CONFIG, attention_impl=attention_impl).eval()


def prepare(repo: str | None, keys: list[str], max_bag: int) -> dict:
    """Facts for the header and estimates; exports the artifacts ``keys`` into ``repo`` when asked."""
    model = build("sdpa")
    encoder = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    facts = {
        "torch": torch.__version__,
        "onnxruntime": package_version("onnxruntime", missing="not installed"),
        "tensorrt": package_version("tensorrt", missing="not installed"),
        "config": CONFIG.to_dict(),
        "dim": CONFIG.dim,
        "heads": CONFIG.heads,
        "depth": CONFIG.depth,
        "gene_tokens": CONFIG.gene_groups,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_linear_params": sum(p.numel() for m in encoder for p in m.parameters()),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if repo and keys:
        from histosurv.export.repository_writer import add_engine, export_model

        artifacts = [a for a in ("onnxruntime_fp16", "torch") if a in keys or (a == "torch" and "torch_cuda" in keys)]
        run_config = {"architecture": "ammasurv", "model": CONFIG.to_dict(), "genes": [f"g{i}" for i in range(200)]}
        device = "cuda" if "torch_cuda" in keys else "cpu"  # the package the run measures, not this box's default
        mv = export_model(model, run_config, repo, MODEL, artifacts=artifacts, options={"device": device})
        if "tensorrt" in keys:
            mv, _ = add_engine(repo, MODEL, "tensorrt", max_bag=max_bag)
        facts["engines"] = {k: _engine_facts(e) for k, e in mv.info.engines.items()}
        facts["onnx_ops"] = mv.info.engines["onnxruntime"].details["ops"]
    return facts


def _engine_facts(entry) -> dict:
    """An engine's manifest entry for the results JSON, without its op counts (reported once, as onnx_ops)."""
    from histosurv.data.typed_json import to_json_dict

    facts = to_json_dict(entry)
    facts["details"] = {k: v for k, v in facts["details"].items() if k != "ops"}
    return facts


def worker(engine: str, n: int, repo: str | None, device: str, repeat: int, threads: int, budget_s: float) -> dict:
    """One (engine, N) measurement in this process; returns the JSON-able result."""
    torch.set_num_threads(threads)
    if engine in EAGER:
        run, extra = _eager_runner(engine, n, device)
    else:
        run, extra = _engine_runner(engine, n, repo, threads)
    cuda = extra.get("device", "cpu").startswith("cuda")
    return {"engine": engine, "n": n, "threads": threads, **extra, **measure(run, repeat, budget_s, cuda)}


def _eager_runner(engine: str, n: int, device: str):
    model = build(engine).to(device)
    batched = {k: v[None].to(device) for k, v in example_inputs(model, n=n, seed=0).items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        with torch.inference_mode():
            model(**batched, return_attention=True)
        sync()

    return run, {"device": device, "intra_op_threads": torch.get_num_threads()}


def _engine_runner(key: str, n: int, repo: str | None, threads: int):
    from histosurv.runtime.engines import load_engine
    from histosurv.runtime.repository import ModelRepository

    if not repo:
        raise SystemExit(f"engine {key!r} needs the benchmark's model repository")
    # Inputs come from the torch model (same generator, same gene scaler); drop it before loading the
    # engine so its weights are not resident next to the engine's copy.
    model = build("sdpa")
    feeds = {k: v.numpy() for k, v in example_inputs(model, n=n, seed=0).items()}
    del model
    gc.collect()
    mv = ModelRepository(repo).version(MODEL)
    backend = mv.info.engines[key].backend
    options = {"threads": threads} if backend in ("onnxruntime", "torch") else {}
    engine = load_engine(mv, key, **options)
    described = engine.describe()
    return (lambda: engine.run(feeds)), {k: v for k, v in described.items() if k != "engine"}


def measure(run, repeat: int, budget_s: float, cuda: bool) -> dict:
    """Median wall time of up to ``repeat`` runs after one warm-up (fewer once ``budget_s`` is spent,
    at least one), and the process's peak RSS (and CUDA allocator peak) around them."""
    gc.collect()
    peak_reset = reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_bytes()
    gpu_baseline = torch.cuda.memory_allocated() if cuda else 0
    run()  # warm-up: first-call allocations, kernel selection, ORT's lazy initialisation
    times = time_calls(run, repeat, budget_s)
    peak = peak_rss_bytes()
    result = {
        "median_ms": statistics.median(times),
        "times_ms": times,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "extra_rss_bytes": peak - baseline,
        "peak_reset": peak_reset,
    }
    if cuda:  # torch's allocator only: ONNX Runtime's and TensorRT's own device memory is not in it
        result["gpu_extra_bytes"] = torch.cuda.max_memory_allocated() - gpu_baseline
    return result
