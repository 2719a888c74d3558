"""Build a TensorRT engine (``model.plan``) from a version's opset-23 graph, on the GPU that serves it.

A plan holds kernels chosen for one GPU architecture by one TensorRT release, so it is built where it
runs (as Triton's ``cc_model_filenames`` assumes) and the manifest records the TensorRT version, the
compute capability and the GPU; the runtime refuses a plan whose facts differ from the machine's.

The bag size is dynamic. TensorRT picks kernels for one "opt" shape per optimization profile and
rejects shapes outside every profile, so the plan carries one profile per bag-size bucket (default
1k, 4k, 16k, 64k, capped at ``max_bag``), each optimised at the middle of its range; the runtime
selects the profile whose range holds the bag.

Precision is set through the graph, not builder flags: the network is strongly typed (the only mode
from TensorRT 11), and FP16 plans are parsed from an FP16 copy of the graph that keeps the coordinate
embedding in FP32 (see :mod:`.fp16`). The graph's ``Attention`` nodes become TensorRT's fused
IAttention layers (ONNX parser 10.14 and newer).

TensorRT is an optional extra (``pip install tensorrt``, NVIDIA's index); nothing here imports it at
module level, and the tests skip where ``import tensorrt`` fails.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from ..data.atomic import atomic_path
from ..errors import HistosurvError, InputError
from ..runtime.manifest import BuiltFor, EngineEntry
from ..runtime.repository import ModelVersion

__all__ = ["DEFAULT_BUCKETS", "bag_profiles", "build_plan", "EngineBuildError", "PLAN_FILE"]

PLAN_FILE = "model.plan"
DEFAULT_BUCKETS = (1024, 4096, 16384, 65536)


class EngineBuildError(HistosurvError, RuntimeError):
    pass


def bag_profiles(max_bag: int, buckets=DEFAULT_BUCKETS) -> list[tuple[int, int, int]]:
    """(min, opt, max) bag sizes per optimization profile: consecutive buckets up to ``max_bag``,
    covering every size from 1 to ``max_bag`` exactly once."""
    if max_bag < 1:
        raise ValueError(f"max_bag must be >= 1, got {max_bag}")
    tops = sorted({b for b in buckets if 1 <= b < max_bag} | {max_bag})
    lows = [1] + [t + 1 for t in tops[:-1]]
    return [(lo, (lo + hi) // 2, hi) for lo, hi in zip(lows, tops)]


def build_plan(
    version: ModelVersion,
    path: str | os.PathLike,
    source_key: str = "onnx_opset23",
    max_bag: int = 65536,
    buckets=DEFAULT_BUCKETS,
    precision: str = "fp16",
    workspace_gib: float = 8.0,
    log=lambda _: None,
) -> EngineEntry:
    """Builds and writes ``path`` (atomically); returns its manifest entry."""
    import onnx
    import tensorrt as trt

    from ..runtime.engines.tensorrt import gpu_facts
    from .fp16 import to_fp16

    if precision not in ("fp16", "fp32"):
        raise InputError(f"a TensorRT plan is built in fp16 or fp32, not {precision!r}")
    source = version.engine_file(source_key)
    proto = onnx.load(str(source))
    if precision == "fp16":
        proto = to_fp16(proto)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(proto.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{source}: TensorRT {trt.__version__}'s ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profiles = bag_profiles(max_bag, buckets)
    for lo, opt, hi in profiles:
        profile = builder.create_optimization_profile()
        for spec in version.inputs:
            if spec.shape and spec.shape[0] == -1:  # bag-sized: features, coords
                rest = tuple(spec.shape[1:])
                profile.set_shape(spec.name, (lo, *rest), (opt, *rest), (hi, *rest))
        config.add_optimization_profile(profile)
    log(f"building a {precision} TensorRT {trt.__version__} plan with {len(profiles)} profiles {profiles} ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build a plan from {source} (its log above says why)")
    with atomic_path(path, suffix=".plan") as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    gpu, capability = gpu_facts()
    return EngineEntry(
        Path(path).name,
        "tensorrt",
        precision,
        device="cuda",
        built_for=BuiltFor(tensorrt=trt.__version__, compute_capability=capability, gpu=gpu),
        profiles=tuple(tuple(p) for p in profiles),
        details={"built_from": source.name, "built": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
