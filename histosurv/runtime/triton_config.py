"""Triton's ``config.pbtxt`` for a histosurv model, so the same repository loads in Triton unchanged.

Bags have no batch dimension (``max_batch_size: 0``): one call scores one slide, whose bag size is
the variable first dimension of ``features`` and ``coords``.

The serving facts a client needs to make inputs the model takes (gene order, the encoder record of
the training bags and their µm/px) go into the config's ``parameters`` under ``histosurv.`` keys, as
strings (JSON where structured): the same parameters the server's ModelConfig returns, so a client
reads them alike from histosurv and from Triton serving the same repository.
"""

from __future__ import annotations

import json

from ..data.typed_json import to_json_dict
from .manifest import ModelManifest, TensorSpec, VersionInfo

__all__ = ["render_config_pbtxt", "serving_parameters", "patch_mpp", "PLATFORMS"]

# Triton platform of each histosurv engine whose artifact Triton can load directly.
PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def _tensor(spec: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in spec.shape)
    return f'  {{\n    name: "{spec.name}"\n    data_type: TYPE_{spec.datatype}\n    dims: [ {dims} ]\n  }}'


def patch_mpp(info: VersionInfo) -> float | None:
    """The µm/px slides are cut at for this version: its training bags', else (an encoder) its own."""
    record = info.trained_on if info.trained_on is not None else info.encoder
    return record.mpp if record is not None else None


def serving_parameters(info: VersionInfo) -> dict[str, str]:
    """The version's serving facts as Triton model parameters (``histosurv.*`` keys, string values)."""
    params = {
        "histosurv.kind": "patch_encoder" if info.is_encoder else "survival_model",
        "histosurv.architecture": info.architecture,
    }
    if info.genes is not None:
        params["histosurv.gene_names"] = json.dumps(list(info.genes.names))
    if info.clinical is not None:
        params["histosurv.clinical"] = json.dumps(to_json_dict(info.clinical), sort_keys=True)
    if info.modalities:
        params["histosurv.modalities"] = json.dumps(info.modalities, sort_keys=True)
    if info.survival is not None:
        params["histosurv.survival_head"] = json.dumps(to_json_dict(info.survival), sort_keys=True)
    if info.encoder is not None:
        params["histosurv.encoder_record"] = info.encoder.to_json()
    if info.trained_on is not None:
        params["histosurv.trained_on"] = info.trained_on.to_json()
    mpp = patch_mpp(info)
    if mpp is not None:
        params["histosurv.patch_mpp"] = f"{mpp:g}"
    return params


def render_config_pbtxt(manifest: ModelManifest, backend: str = "onnxruntime") -> str:
    platform, filename = PLATFORMS[backend]
    inputs = ",\n".join(_tensor(t) for t in manifest.inputs)
    outputs = ",\n".join(_tensor(t) for t in manifest.outputs)
    parameters = serving_parameters(manifest.versions[manifest.latest]) if manifest.versions else {}
    rendered = "".join(
        f'parameters: {{ key: "{key}" value: {{ string_value: {json.dumps(value, ensure_ascii=False)} }} }}\n' for key, value in parameters.items()
    )
    return (
        f'name: "{manifest.name}"\n'
        f'platform: "{platform}"\n'
        f'default_model_filename: "{filename}"\n'
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"{rendered}"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )
