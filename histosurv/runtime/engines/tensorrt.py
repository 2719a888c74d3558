"""TensorRT backend: runs a ``model.plan`` built by ``histosurv export --add-engine tensorrt``.

The plan is checked against the machine before TensorRT deserialises it: a plan from another
TensorRT release or another GPU architecture is refused with both facts named (TensorRT itself would
fail with a less helpful message, or not at all across minor versions with hardware compatibility).
Device buffers are torch CUDA tensors, so this backend needs torch with CUDA beside TensorRT.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ...errors import InputError
from ..manifest import EngineEntry
from ..repository import ModelVersion
from .base import Engine, EngineUnavailable, register_engine

__all__ = ["TensorRTEngine", "gpu_facts", "plan_incompatibility"]


def gpu_facts() -> tuple[str | None, str | None]:
    """(GPU name, compute capability 'major.minor') of the current CUDA device, or (None, None)."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def plan_incompatibility(entry: EngineEntry, tensorrt_version: str | None, gpu: str | None, capability: str | None) -> str | None:
    """Why a plan described by ``entry`` cannot run with this TensorRT and GPU, or None."""
    built_for = entry.built_for
    if capability is None:
        return f"a TensorRT plan for a {built_for.gpu} GPU; this machine has no CUDA device"
    if tensorrt_version is None:
        return "TensorRT is not installed here"
    built = built_for.tensorrt
    if built != tensorrt_version:
        return (
            f"built by TensorRT {built}, this is TensorRT {tensorrt_version}; plans run only on the release that "
            "built them (rebuild it here: histosurv export --add-engine tensorrt)"
        )
    if built_for.compute_capability != capability:
        return (
            f"built for GPU compute capability {built_for.compute_capability} ({built_for.gpu}), this GPU "
            f"({gpu}) is {capability}; rebuild it here: histosurv export --add-engine tensorrt"
        )
    return None


@register_engine
class TensorRTEngine(Engine):
    name = "tensorrt"
    priority = 10  # where a plan for this GPU exists it is the fastest engine
    install_hint = "pip install tensorrt (NVIDIA's index) and torch with CUDA"

    def __init__(self, version: ModelVersion, key: str | None = None):
        super().__init__(version, key)
        import tensorrt as trt
        import torch

        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineUnavailable(f"{self.path}: TensorRT could not deserialise the plan (its log says why)")
        self.context = self.engine.create_execution_context()
        self.profiles = [tuple(p) for p in self.entry.profiles]
        self.stream = torch.cuda.Stream()
        self._profile: int | None = None
        self._dtypes = {
            self.engine.get_tensor_name(i): np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.engine.get_tensor_name(i))))
            for i in range(self.engine.num_io_tensors)
        }

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("torch") is not None

    @classmethod
    def incompatibility(cls, entry: EngineEntry) -> str | None:
        try:
            import tensorrt as trt

            version = trt.__version__
        except ImportError:
            version = None
        return plan_incompatibility(entry, version, *gpu_facts())

    @property
    def device(self) -> str:
        return f"cuda:{self._torch.cuda.current_device()}"

    def _select_profile(self, n: int) -> int:
        for index, (lo, _, hi) in enumerate(self.profiles):
            if lo <= n <= hi:
                return index
        raise InputError(
            f"a bag of {n} patches is outside this plan's profiles {self.profiles} ({self.path}); "
            "rebuild it with a larger --max-bag"
        )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        bag = next((v.shape[0] for k, v in inputs.items() if k in ("features", "coords")), 1)
        profile = self._select_profile(bag)
        with torch.cuda.stream(self.stream):
            if profile != self._profile:
                self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
                self._profile = profile
            keep = []  # device tensors must outlive the asynchronous execution
            for name, array in inputs.items():
                tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=self._dtypes[name])).cuda()
                self.context.set_input_shape(name, tuple(tensor.shape))
                self.context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            outputs = {}
            for spec in self.version.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                dtype = getattr(torch, self._dtypes[spec.name].name)
                outputs[spec.name] = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(spec.name, outputs[spec.name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"{self.path}: TensorRT execution failed (its log says why)")
        self.stream.synchronize()
        return {name: t.cpu().numpy() for name, t in outputs.items()}

    def describe(self) -> dict:
        return {**super().describe(), "tensorrt": self.entry.built_for.tensorrt, "profiles": self.profiles}
