"""ONNX Runtime backend.

ONNX Runtime accepts a provider list and silently drops the providers it cannot load (onnxruntime-gpu
without CUDA libraries runs on the CPU without raising). The engine compares what it asked for with
``get_providers()`` and, unless ``allow_fallback``, refuses to pretend: a box that should be on the
GPU fails loudly instead of being 30x slower in silence.

The CPU memory arena is off by default: it keeps every block it ever allocated, so a server's resident
memory would stay at the largest bag it has seen (AMMASurv at N = 16k: 1.11 GB peak with the arena,
0.81 GB without, at the same speed; measured with ORT 1.32 on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..cpu_budget import env_threads, usable_cores
from ..manifest import EngineEntry
from ..repository import ModelVersion
from .base import Engine, EngineUnavailable, register_engine, warn_fallback

__all__ = ["OnnxRuntimeEngine", "default_providers"]


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu is installed *and* an NVIDIA device exists: onnxruntime-gpu
    lists the CUDA provider even on machines without a GPU (shared/research/deps.md section 2)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidia0").exists():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@register_engine
class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    priority = 20
    install_hint = "pip install onnxruntime (CPU) or onnxruntime-gpu"

    def __init__(
        self,
        version: ModelVersion,
        key: str | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        allow_fallback: bool = False,
        memory_arena: bool = False,
        spinning: bool | None = None,
    ):
        super().__init__(version, key)
        import onnxruntime as ort

        self.requested = list(providers or default_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = memory_arena
        # ORT sizes its pool from the host's cores; a container's quota or affinity mask may allow fewer
        options.intra_op_num_threads = int(threads or env_threads() or usable_cores())
        if spinning is not None:  # idle pool threads spin by default, taking the cores from a decoder beside them
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 3  # provider load failures are reported below, by us
        self.session = ort.InferenceSession(str(self.path), options, providers=self.requested)
        self.providers = self.session.get_providers()
        dropped = [p for p in self.requested if p not in self.providers]
        if dropped:
            message = f"ONNX Runtime could not load {dropped} and runs on {self.providers}"
            if not allow_fallback:
                raise EngineUnavailable(message + " (pass allow_fallback=True to accept this)")
            warn_fallback(message)
        self._output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def is_installed(cls) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    @classmethod
    def preferred_here(cls, entry: EngineEntry) -> bool:
        on_cpu = default_providers()[0] == "CPUExecutionProvider"
        if entry.precision == "int8":
            # a CPU graph, chosen only where the accuracy gates measured at export passed (not --force)
            return on_cpu and (entry.details.get("gate") or {}).get("passed") is True
        # ORT's CPU kernels for FP16 mostly cast back and forth: the FP16 graph is for GPU providers
        return entry.precision == "fp32" or not on_cpu

    @classmethod
    def precision_rank(cls, entry: EngineEntry) -> int:
        # an INT8 graph that auto may pick (its gates passed, on a CPU) is 2-3x as fast as FP32 there
        return -1 if entry.precision == "int8" else super().precision_rank(entry)

    @classmethod
    def runs_on_gpu(cls, entry: EngineEntry) -> bool:
        return default_providers()[0] != "CPUExecutionProvider"

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values))

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}
