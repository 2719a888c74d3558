"""Compiled torch backend: an AOTInductor package (``model.pt2``) run by torch, no model source needed.

A package runs only where it was built for: the same device type, the same GPU architecture for CUDA
builds, and the same torch release (the generated library calls torch's C shim of that release).
Those facts are in the manifest entry and are checked before torch loads the library.

A package built with ``--kernels triton`` carries histosurv's Triton kernels compiled inside it and needs
nothing more; one built with ``--kernels cuda`` calls the CUDA C++ ops by name, so this engine loads
``libhistosurv_kernels.so`` first (and reports it unusable where that library is not built).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ..manifest import EngineEntry
from ..repository import ModelVersion
from .base import Engine, register_engine

__all__ = ["TorchEngine", "torch_release"]


def torch_release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13': AOTInductor's generated code is tied to a torch minor release."""
    return ".".join(version.split("+")[0].split(".")[:2])


@register_engine
class TorchEngine(Engine):
    name = "torch"
    priority = 30  # ONNX Runtime is as fast on the CPU and loads in a fraction of the time
    install_hint = "pip install torch"

    def __init__(self, version: ModelVersion, key: str | None = None, threads: int | None = None):
        super().__init__(version, key)
        import torch

        if threads or os.environ.get("HISTOSURV_THREADS"):
            torch.set_num_threads(int(threads or os.environ["HISTOSURV_THREADS"]))
        self._torch = torch
        self._device = torch.device("cuda" if self.entry.device == "cuda" else "cpu")
        # device_index pins a CUDA package to the current device; -1 is the CPU
        index = torch.cuda.current_device() if self._device.type == "cuda" else -1
        if self.entry.kernels == "cuda":  # the package finds histosurv::* ops through torch's dispatcher
            from ...kernels import cuda_ops

            if not cuda_ops.available():
                raise RuntimeError(f"{self.path} calls histosurv's CUDA kernels: {cuda_ops.load_error()}")
        self.model = torch._inductor.aoti_load_package(str(self.path), device_index=index)
        self._output_names = [t.name for t in version.outputs]

    @classmethod
    def is_installed(cls) -> bool:
        return importlib.util.find_spec("torch") is not None

    @classmethod
    def incompatibility(cls, entry: EngineEntry) -> str | None:
        import torch

        built, here = entry.built_for.torch or "?", torch.__version__
        if torch_release(built) != torch_release(here):
            return (
                f"compiled with torch {built}, this is torch {here}; AOTInductor packages run only on the torch "
                "release that built them (rebuild it here: histosurv export --add-engine torch)"
            )
        if entry.device == "cuda":
            if not torch.cuda.is_available():
                return "compiled for a CUDA GPU; this machine has none (rebuild it: histosurv export --add-engine torch)"
            major, minor = torch.cuda.get_device_capability()
            if entry.built_for.compute_capability != f"{major}.{minor}":
                return (
                    f"compiled for GPU compute capability {entry.built_for.compute_capability}, this GPU "
                    f"({torch.cuda.get_device_name()}) is {major}.{minor}"
                )
        if entry.kernels == "cuda":
            from ...kernels import cuda_ops

            if not cuda_ops.available():
                return f"calls histosurv's CUDA C++ kernels, which cannot be loaded here: {cuda_ops.load_error()}"
        return None

    @property
    def device(self) -> str:
        return str(self._device)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self._device) for k, v in inputs.items()}
        with torch.inference_mode():
            values = self.model(**tensors)
        return {name: v.detach().cpu().numpy() for name, v in zip(self._output_names, values)}

    def describe(self) -> dict:
        # plain str, not torch's TorchVersion: these facts end up in h5 attributes and JSON
        return {**super().describe(), "torch": str(self._torch.__version__), "kernels": self.entry.kernels or "none"}
