"""Triton's ``config.pbtxt`` for a histosurv model, so the same repository loads in Triton unchanged.

Bags have no batch dimension (``max_batch_size: 0``): one call scores one slide, whose bag size is
the variable first dimension of ``features`` and ``coords``.
"""

from __future__ import annotations

from .manifest import ModelManifest, TensorSpec

__all__ = ["render_config_pbtxt", "PLATFORMS"]

# Triton platform of each histosurv engine whose artifact Triton can load directly.
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.shape)
    return f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{spec.datatype}\n    dims: [ {dims} ]\n  }}'


def render_config_pbtxt(manifest: ModelManifest, backend: str = "onnxruntime") -> str:
    platform, filename = PLATFORMS[backend]
    inputs = ",\n".join(_tensor(t) for t in manifest.inputs)
    outputs = ",\n".join(_tensor(t) for t in manifest.outputs)
    return (
        f'name: "{manifest.name}"\n'
        f'platform: "{platform}"\n'
        f'default_model_filename: "{filename}"\n'
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )
