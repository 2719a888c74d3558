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
from .onnx_export import export_onnx, export_onnx_fp16, export_onnx_standard
from .run import load_run

__all__ = [
    "export_run",
    "export_model",
    "add_engine",
    "tensor_specs",
    "REFERENCE_WEIGHTS",
    "prepare_version",
    "publish_version",
    "write_reference",
    "ARTIFACTS",
]

REFERENCE_WEIGHTS = "model.safetensors"
STANDARD_GRAPH = "model.opset23.onnx"  # TensorRT builds model.plan from it on the serving GPU
STANDARD_ENGINE_KEY = "onnx_opset23"
FP16_GRAPH = "model.fp16.onnx"
# What `export` writes besides model.onnx and the opset-23 graph; "torch" compiles for ~1 minute.
ARTIFACTS = ("onnxruntime_fp16", "torch")


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
    artifacts=ARTIFACTS,
) -> ModelVersion:
    """Exports the run's model as ``repository/name/<version>`` (default: one above the highest):
    the fused ONNX graph and the opset-23 graph always, plus ``artifacts`` (see ARTIFACTS)."""
    model, run_config = load_run(run_dir)
    return export_model(model, run_config, repository, name, version, log, artifacts, run_dir=run_dir)


def export_model(
    model: torch.nn.Module,
    run_config: dict,
    repository: str | os.PathLike,
    name: str,
    version: int | None = None,
    log=lambda _: None,
    artifacts=ARTIFACTS,
    run_dir: str | os.PathLike | None = None,
) -> ModelVersion:
    """``export_run`` for a model in memory; ``run_config`` needs ``architecture``, ``model`` (its
    config) and ``genes`` (names), as a run's config.json has them."""
    unknown = set(artifacts) - set(ARTIFACTS)
    if unknown:
        raise RepositoryError(f"unknown artifacts {sorted(unknown)}; export writes {list(ARTIFACTS)}")
    model = model.eval()
    inputs, outputs = tensor_specs(model)
    model_dir, manifest, version = prepare_version(repository, name, inputs, outputs, version)
    engines = {}
    with atomic_dir(model_dir / str(version)) as tmp:
        log(f"exporting ONNX graph of {run_config['architecture']} ...")
        engines["onnxruntime"] = export_onnx(model, tmp / "model.onnx")
        log("exporting the opset-23 graph (standard Attention, for TensorRT) ...")
        engines[STANDARD_ENGINE_KEY] = export_onnx_standard(model, tmp / STANDARD_GRAPH)
        if "onnxruntime_fp16" in artifacts:
            log("writing the FP16 graph (for GPU providers) ...")
            engines["onnxruntime_fp16"] = export_onnx_fp16(model, tmp / "model.onnx", tmp / FP16_GRAPH)
        not_built = {a: why for a, why in getattr(model, "unsupported_artifacts", {}).items() if a in artifacts}
        for artifact, why in not_built.items():
            log(f"not building {artifact}: {why}")
        if "torch" in artifacts and "torch" not in not_built:
            key, file, device = _torch_artifact()
            log(f"compiling {file} with AOTInductor for {device} (about a minute) ...")
            from .torch_export import export_pt2

            engines[key] = export_pt2(model, tmp / file, device=device)
        files = write_reference(tmp, model.state_dict())
    info = _version_info(model, run_config, run_dir, engines, files)
    info.not_built = not_built
    return publish_version(repository, manifest, version, info)


def add_engine(
    repository, name: str, engine: str, version: int | None = None, replace: bool = False, log=lambda _: None, **options
) -> tuple[ModelVersion, str]:
    """Builds a machine-specific artifact into an existing version, on the machine that will run it:
    ``tensorrt`` (model.plan from the opset-23 graph) or ``torch`` (model.pt2, or model.cuda.pt2 on a
    GPU, compiled from the reference weights). Other files of the version are left as they are.
    Returns the version and the manifest key of the new engine."""
    from .verify import reference_model

    repo = ModelRepository(repository)
    mv = repo.version(name, version)
    if engine == "tensorrt":
        from .tensorrt_build import PLAN_FILE, build_plan

        key, file = "tensorrt", PLAN_FILE
        build = lambda path: build_plan(mv, path, log=log, **options)  # noqa: E731
    elif engine == "torch":
        from .torch_export import export_pt2

        if any(t.name == "patches" for t in mv.inputs):
            raise RepositoryError(f"{mv.path}: patch encoders are served by ONNX Runtime; no torch package for them")
        why = mv.info.not_built.get("torch")
        if why:
            raise RepositoryError(f"{mv.path}: no torch package for {mv.info.architecture}: {why}")
        key, file, device = _torch_artifact(options.pop("device", None))
        log(f"compiling {file} with AOTInductor for {device} (about a minute) ...")
        build = lambda path: export_pt2(reference_model(mv), path, device=device, **options)  # noqa: E731
    else:
        raise RepositoryError(f"--add-engine builds tensorrt or torch artifacts, not {engine!r}")
    if key in mv.info.engines and not replace:
        raise RepositoryError(f"{mv.path / file} already exists (engine {key!r}); pass --replace to rebuild it")
    entry = build(mv.path / file)  # written atomically beside the other files
    manifest = repo.manifest(name)
    info = manifest.versions[mv.version]
    info.engines[key] = entry
    info.files[file] = sha256_file(mv.path / file)
    info.parity.pop(key, None)  # figures of a replaced artifact no longer hold
    return publish_version(repository, manifest, mv.version, info), key


def _torch_artifact(device: str | None = None) -> tuple[str, str, str]:
    """(manifest key, file, device) of the AOTInductor package this machine builds: CUDA where a GPU is."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return ("torch", "model.pt2", "cpu") if device == "cpu" else ("torch_cuda", "model.cuda.pt2", device)


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


def _version_info(model, run_config: dict, run_dir, engines: dict, files: dict) -> VersionInfo:
    genes = {"names": run_config["genes"], "standardised_in_graph": True}
    if getattr(model, "genes", None) is not None:
        genes.update(mean=model.genes.mean.tolist(), scale=model.genes.scale.tolist())
    training = {"run": str(Path(run_dir).resolve()) if run_dir else None, "train": run_config.get("train", {})}
    if run_dir and (Path(run_dir) / "metrics.json").is_file():
        training["metrics"] = json.loads((Path(run_dir) / "metrics.json").read_text())
    return VersionInfo(
        architecture=run_config["architecture"],
        config=run_config["model"],
        survival_head=model.cfg.survival_head,
        genes=genes,
        patch_encoder=run_config.get("patch_encoder", {}),
        engines=engines,
        files=files,
        reference={"file": REFERENCE_WEIGHTS, "format": "safetensors state_dict"},
        training=training,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        histosurv_version=__version__,
        modalities=modalities_of(model),
    )


def modalities_of(model) -> dict[str, str]:
    """What the model needs of each input, for the manifest and the runtime's checks."""
    optional = set(getattr(model, "optional_inputs", ()))
    found = {name: "optional" if name in optional else "required" for name in model.input_names}
    for name in ("features", "genes"):
        found.setdefault(name, "not used")
    return found
