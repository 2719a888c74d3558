"""``histosurv export``: a training run -> a new numeric version in a model repository.

The version folder is built in a temporary directory and renamed into place, then the manifest and
config.pbtxt are replaced atomically, so readers see either the old repository or the new one.
Versions of one model must share its tensor interface (Triton's config.pbtxt is per model); a run
with another interface is refused with the difference named.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..data.atomic import atomic_dir, write_text_atomic
from ..errors import RepositoryError
from ..runtime.manifest import ModelManifest, TensorSpec, VersionInfo
from ..runtime.repository import MANIFEST, ModelRepository, ModelVersion, sha256_file
from ..runtime.triton_config import render_config_pbtxt
from .onnx_export import export_onnx, export_onnx_standard
from .run import load_run

__all__ = ["export_run", "tensor_specs", "REFERENCE_WEIGHTS", "prepare_version", "publish_version", "write_reference"]

REFERENCE_WEIGHTS = "model.safetensors"
STANDARD_GRAPH = "model.opset23.onnx"  # TensorRT builds model.plan from it on the serving GPU
STANDARD_ENGINE_KEY = "onnx_opset23"


def tensor_specs(model: torch.nn.Module) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The DESIGN.md tensor interface of ``model``: features/coords/genes -> risk/attention."""
    cfg = model.cfg
    all_inputs = {
        "features": TensorSpec("features", "FP32", (-1, cfg.feature_dim)),
        "coords": TensorSpec("coords", "INT64", (-1, 2)),
        "genes": TensorSpec("genes", "FP32", (cfg.n_genes,)),
    }
    inputs = [all_inputs[n] for n in model.input_names]
    outputs = [TensorSpec("risk", "FP32", (1,))]
    if "features" in model.input_names:
        outputs.append(TensorSpec("attention", "FP32", (-1,)))
    return inputs, outputs


def export_run(
    run_dir: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    log=lambda _: None,
) -> ModelVersion:
    """Exports the run's model as ``repository/name/<version>`` (default: one above the highest)."""
    model, run_config = load_run(run_dir)
    inputs, outputs = tensor_specs(model)
    model_dir, manifest, version = prepare_version(repository, name, inputs, outputs, version)
    with atomic_dir(model_dir / str(version)) as tmp:
        log(f"exporting ONNX graph of {run_config['architecture']} ...")
        onnx_info = export_onnx(model, tmp / "model.onnx")
        log("exporting the opset-23 graph (standard Attention, for TensorRT) ...")
        standard_info = export_onnx_standard(model, tmp / STANDARD_GRAPH)
        files = write_reference(tmp, model.state_dict())
    info = _version_info(model, run_config, run_dir, onnx_info, files)
    info.engines[STANDARD_ENGINE_KEY] = standard_info
    return publish_version(repository, manifest, version, info)


def prepare_version(repository, name: str, inputs, outputs, version: int | None) -> tuple[Path, ModelManifest, int]:
    """(model folder, its manifest (new or checked against this interface), the version to write)."""
    model_dir = Path(repository) / name
    manifest = _existing_manifest(model_dir, name, inputs, outputs)
    version = _next_version(model_dir, manifest) if version is None else int(version)
    if version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version}")
    if (model_dir / str(version)).exists():
        raise RepositoryError(f"{model_dir / str(version)} already exists; versions are immutable, export a new one")
    return model_dir, manifest, version


def write_reference(version_dir: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Saves the reference weights ``verify`` compares engines against, then hashes every file of the
    (not yet published) version folder: the manifest's sha256 must cover exactly what is served."""
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(version_dir / REFERENCE_WEIGHTS))
    return {p.name: sha256_file(p) for p in sorted(version_dir.iterdir())}


def publish_version(repository, manifest: ModelManifest, version: int, info: VersionInfo) -> ModelVersion:
    """Records a version folder already in place in the manifest and config.pbtxt (each replaced atomically)."""
    model_dir = Path(repository) / manifest.name
    manifest.versions[version] = info
    manifest.save(model_dir / MANIFEST)
    write_text_atomic(model_dir / "config.pbtxt", render_config_pbtxt(manifest))
    return ModelRepository(repository).version(manifest.name, version)


def _existing_manifest(model_dir: Path, name: str, inputs, outputs) -> ModelManifest:
    if not (model_dir / MANIFEST).is_file():
        return ModelManifest(name, inputs, outputs)
    manifest = ModelManifest.load(model_dir / MANIFEST)
    if (manifest.inputs, manifest.outputs) != (inputs, outputs):
        raise RepositoryError(
            f"{model_dir}: this run's tensors {[asdict(t) for t in inputs + outputs]} differ from the model's "
            f"{[asdict(t) for t in manifest.inputs + manifest.outputs]}; export it under another model name"
        )
    return manifest


def _next_version(model_dir: Path, manifest: ModelManifest) -> int:
    # Count folders too: a folder left by an interrupted export must not be reused silently.
    on_disk = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max([0, *manifest.versions, *on_disk]) + 1


def _version_info(model, run_config: dict, run_dir, onnx_info: dict, files: dict) -> VersionInfo:
    genes = {"names": run_config["genes"], "standardised_in_graph": True}
    if getattr(model, "genes", None) is not None:
        genes.update(mean=model.genes.mean.tolist(), scale=model.genes.scale.tolist())
    metrics_path = Path(run_dir) / "metrics.json"
    training = {"run": str(Path(run_dir).resolve()), "train": run_config.get("train", {})}
    if metrics_path.is_file():
        training["metrics"] = json.loads(metrics_path.read_text())
    return VersionInfo(
        architecture=run_config["architecture"],
        config=run_config["model"],
        survival_head=model.cfg.survival_head,
        genes=genes,
        patch_encoder=run_config.get("patch_encoder", {}),
        engines={"onnxruntime": onnx_info},
        files=files,
        reference={"file": REFERENCE_WEIGHTS, "format": "safetensors state_dict"},
        training=training,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        histosurv_version=__version__,
    )
