"""``histosurv export --encoder``: a patch-encoder family -> a new version of a model in the repository.

Encoders are models of the repository like the survival models, with the same files (``model.onnx``,
reference ``model.safetensors``, manifest, config.pbtxt), so the server, Triton and ``verify`` treat
them alike. The version carries the encoder's record (architecture, width, patch size and µm/px,
preprocessing, feature, the digest of its weights): the same record ``tile`` writes into every bag, that
training copies into a survival model, and that the runtime checks before it lets this encoder's
features reach a model.

The ONNX graph takes uint8 ``patches`` [-1, H, W, 3] with a dynamic batch and returns ``features``
[-1, D]. Beside it, by default: an FP16 copy for ONNX Runtime's GPU providers (``model.fp16.onnx``, made
from model.onnx; preprocessing, normalisations and the residual stream stay FP32, see :mod:`.fp16`), and
the same network at opset 23 with one standard ``Attention`` node per attention (``model.opset23.onnx``,
what TensorRT builds from). Before a version is published, each graph is run in ONNX Runtime at batch 1
and 3: torch.export treats sizes 0 and 1 specially, and a graph that only works at the example's batch
must never reach the repository. (``histosurv verify`` then measures parity properly.)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..data.atomic import atomic_dir, atomic_path
from ..data.encoder_record import WeightsIdentity
from ..data.weights_digest import tensor_digest
from ..errors import HistosurvError, InputError
from ..runtime.manifest import EngineEntry, ReferenceWeights, TensorSpec, VersionInfo
from ..runtime.repository import ModelVersion, sha256_file
from .artifacts import BuildContext, artifact, artifacts_for, default_artifacts
from .models.encoders import EncoderFamily, build_encoder, family
from .models.resnet import read_weights_file
from .onnx_export import _quiet_exporter
from .repository_writer import REFERENCE_WEIGHTS, prepare_version, publish_version, write_reference

__all__ = [
    "export_encoder",
    "export_encoder_onnx",
    "export_encoder_onnx_fp16",
    "export_encoder_onnx_standard",
    "encoder_specs",
    "encoder_from_version",
    "example_patches",
    "ENCODER_OPSET",
    "ENCODER_STANDARD_OPSET",
    "EncoderExportError",
]

ENCODER_OPSET = 20
ENCODER_STANDARD_OPSET = 23  # the first opset with the standard Attention op
EXAMPLE_BATCH = 3  # any batch >= 2 (torch.export specialises sizes 0 and 1)
SMOKE_BATCHES = (1, 3)
SMOKE_TOLERANCE = 1e-3  # a gross-error guard only; verify measures against 1e-4
SMOKE_COSINE = 0.99  # the FP16 graph's guard, per patch; verify measures against 0.999
# protobuf caps one file at 2 GB: above this the weights go to model.onnx.data (UNI2-h, Virchow2, the ViT-gs)
EXTERNAL_DATA_ABOVE = 1 << 30


class EncoderExportError(HistosurvError, RuntimeError):
    """The exported graph does not run, or gives other features than PyTorch, at some batch size."""


def encoder_specs(spec: EncoderFamily, patch_size: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (
        [TensorSpec("patches", "UINT8", (-1, patch_size, patch_size, 3))],
        [TensorSpec("features", "FP32", (-1, spec.feature_dim))],
    )


def export_encoder(
    repository: str | os.PathLike,
    encoder: str,
    name: str | None = None,
    weights: str | os.PathLike | None = None,
    patch_size: int | None = None,
    version: int | None = None,
    seed: int = 0,
    log=lambda _: None,
    mpp: float | None = None,
    artifacts: tuple[str, ...] | None = None,
) -> ModelVersion:
    """Exports encoder family ``encoder`` (see ``ENCODERS``) as ``repository/<name>/<version>``; ``name``
    defaults to ``<encoder>_encoder``, ``patch_size`` and ``mpp`` to the family's. Without ``weights``
    the encoder keeps its seeded initialisation, and its record says so. Builds model.onnx and
    ``artifacts`` (default: every ``default`` encoder artifact, the FP16 and opset-23 graphs)."""
    chosen = default_artifacts("encoder") if artifacts is None else tuple(artifacts)
    for name_ in set(chosen) - set(default_artifacts("encoder")):
        if artifact(name_, "encoder").when == "on_target":  # an unknown name is refused inside, naming the known
            raise InputError(f"{name_} is built on the serving machine, into a published version: "
                             f"histosurv export --add-engine {name_}")
    spec = family(encoder)
    patch_size = spec.patch_size if patch_size is None else int(patch_size)
    spec.check_patch_size(patch_size)
    mpp = spec.mpp if mpp is None else float(mpp)
    if not mpp > 0:
        raise InputError(f"µm per pixel must be positive, got {mpp}")
    model = build_encoder(encoder, seed)
    if weights is not None:
        spec.load_weights(model, read_weights_file(weights), str(weights))
    name = name or f"{encoder}_encoder"
    inputs, outputs = encoder_specs(spec, patch_size)
    model_dir, manifest, version = prepare_version(repository, name, inputs, outputs, version)
    engines = {}
    with atomic_dir(model_dir / str(version)) as tmp:
        context = BuildContext(tmp, options={"patch_size": patch_size}, log=log, _model=model)
        for entry in artifacts_for("encoder"):
            if entry.when == "on_target" or (entry.when == "default" and entry.name not in chosen):
                continue
            key, file = entry.target()
            engines[key] = entry.build(context, tmp / file)
        files = write_reference(tmp, spec.weights_of(model))
        identity = _weights_identity(weights, seed, tmp / REFERENCE_WEIGHTS)
    info = VersionInfo(
        architecture=encoder,
        config={"description": spec.summary, "weights_format": spec.weights_format},
        engines=engines,
        files=files,
        reference=ReferenceWeights(REFERENCE_WEIGHTS, f"safetensors state_dict ({spec.weights_format})"),
        encoder=spec.record(patch_size, mpp, identity),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        histosurv_version=__version__,
    )
    return publish_version(repository, manifest, version, info)


def _weights_identity(weights, seed: int, reference: Path) -> WeightsIdentity:
    digest = tensor_digest(reference)
    if weights is None:
        return WeightsIdentity(digest, "seeded", f"seed {seed}, no pretrained weights")
    return WeightsIdentity(digest, "file", f"{Path(weights).name} (file sha256 {sha256_file(weights)[:12]})")


def encoder_from_version(mv: ModelVersion) -> torch.nn.Module:
    """The PyTorch encoder a version was exported from (for ``verify``)."""
    from safetensors.torch import load_file

    spec = family(mv.info.architecture)
    model = build_encoder(mv.info.architecture)
    path = mv.path / mv.info.reference.file
    spec.load_weights(model, load_file(str(path)), str(path))
    return model.eval()


def example_patches(batch: int, patch_size: int, seed: int = 0) -> torch.Tensor:
    """uint8 patches with some structure (smooth colour fields plus noise), not flat noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, 256, (batch, 3, 8, 8), generator=g).float()
    smooth = torch.nn.functional.interpolate(low, size=(patch_size, patch_size), mode="bilinear", align_corners=False)
    noise = torch.randint(-20, 21, (batch, 3, patch_size, patch_size), generator=g)
    return (smooth + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def export_encoder_onnx(
    model: torch.nn.Module, path: Path, patch_size: int, log=lambda _: None, external_above: int = EXTERNAL_DATA_ABOVE,
    reference: dict | None = None,
) -> EngineEntry:
    """The encoder's ONNX graph at ``path``, checked on ONNX Runtime before it is kept; weights above
    ``external_above`` bytes go to ``<path>.data`` beside it. ``reference``: PyTorch's features by smoke
    batch, shared between the graphs of one export (filled on first use)."""
    log(f"exporting the ONNX graph of the encoder ({patch_size} px patches) ...")
    entry = _export_onnx(model, path, patch_size, external_above)
    log(f"checking the graph in ONNX Runtime at batch {' and '.join(map(str, SMOKE_BATCHES))} ...")
    _check_onnx_runs(model, path, patch_size, reference=reference)
    return entry


def export_encoder_onnx_standard(
    model: torch.nn.Module, path: Path, patch_size: int, log=lambda _: None, external_above: int = EXTERNAL_DATA_ABOVE,
    reference: dict | None = None,
) -> EngineEntry:
    """The encoder at opset 23, every attention one standard ``ai.onnx::Attention`` node and every
    LayerNorm an ``ai.onnx::LayerNormalization`` (no ONNX Runtime fusions): the graph TensorRT 10.14+
    builds from. Checked on ONNX Runtime's CPU provider like the fused graph; not served as is."""
    log(f"exporting the opset-{ENCODER_STANDARD_OPSET} graph of the encoder (standard Attention, for TensorRT) ...")
    entry = _export_onnx(model, path, patch_size, external_above, opset=ENCODER_STANDARD_OPSET, fuse=False)
    _check_onnx_runs(model, path, patch_size, reference=reference)
    # no backend: an input to engine builds, which verify checks on ONNX Runtime's CPU provider
    return dataclasses.replace(entry, backend=None, details={**entry.details, "for": "tensorrt>=10.14"})


def export_encoder_onnx_fp16(
    model: torch.nn.Module, source: Path, path: Path, patch_size: int, log=lambda _: None,
    external_above: int = EXTERNAL_DATA_ABOVE, reference: dict | None = None,
) -> EngineEntry:
    """An FP16 copy of the fused graph at ``source`` (model.onnx), for ONNX Runtime's GPU providers:
    uint8 ``patches`` in, FP32 ``features`` out; the preprocessing, every LayerNormalization and
    SkipLayerNormalization (hence the residual stream) and what follows the last norm stay FP32
    (:func:`.fp16.encoder_fp32_nodes`). Weights above ``external_above`` bytes go to ``<path>.data``."""
    import onnx

    from .fp16 import NORMALIZATION_OPS, encoder_fp32_nodes, to_fp16

    log("writing the FP16 graph of the encoder (for GPU providers) ...")
    proto = onnx.load(str(source))  # with its external data, if any
    keep = encoder_fp32_nodes(proto.graph)
    kept = collections.Counter(n.op_type for n in proto.graph.node if n.name in keep)
    proto = to_fp16(proto, keep)
    weights = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weights > external_above
    if external:  # written in place, as model.onnx's data: the version folder is itself atomic
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        onnx.checker.check_model(str(path))
    else:
        with atomic_path(path, suffix=".onnx") as tmp:
            onnx.save_model(proto, str(tmp))
            onnx.checker.check_model(str(tmp))
    del proto
    ops, digest = _op_counts(path)
    _check_fused(model, path, ops, "com.microsoft::MultiHeadAttention")
    log(f"checking the FP16 graph in ONNX Runtime at batch {' and '.join(map(str, SMOKE_BATCHES))} ...")
    _check_onnx_runs(model, path, patch_size, precision="fp16", reference=reference)
    details = {
        "opset": ENCODER_OPSET,
        "ops": dict(sorted(ops.items())),
        "max_batch": 1 << 16,
        "graph_sha256": digest,
        "external_data": f"{path.name}.data" if external else None,
        "attention": "com.microsoft.MultiHeadAttention" if getattr(model, "attention_ops", 0) else None,
        "fp32_nodes": dict(sorted(kept.items())),
        "residual_stream": "fp32" if any(kept[op] for op in NORMALIZATION_OPS) else "fp16",
        "for": "ONNX Runtime CUDA / TensorRT providers",
    }
    return EngineEntry(path.name, "onnxruntime", "fp16", details=details)


def _reference_features(model: torch.nn.Module, patch_size: int, batch: int, reference: dict | None):
    key = (patch_size, batch)
    if reference is not None and key in reference:
        return reference[key]
    patches = example_patches(batch, patch_size, seed=100 + batch)
    with torch.inference_mode():
        expected = model(patches).numpy()
    if reference is not None:
        reference[key] = (patches, expected)
    return patches, expected


def _check_onnx_runs(
    model: torch.nn.Module, path: Path, patch_size: int, precision: str = "fp32", reference: dict | None = None
) -> None:
    """Runs the graph at ``path`` at the smoke batches against PyTorch: FP32 graphs within
    ``SMOKE_TOLERANCE`` (relative), FP16 graphs at a cosine of at least ``SMOKE_COSINE`` per patch."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in SMOKE_BATCHES:
        patches, expected = _reference_features(model, patch_size, batch, reference)
        try:
            (got,) = session.run(["features"], {"patches": patches.numpy()})
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; the batch is what matters
            raise EncoderExportError(f"{path.name}: ONNX Runtime cannot run the graph at batch {batch}: {e}") from e
        if got.shape != expected.shape:
            raise EncoderExportError(f"{path.name}: features of shape {got.shape} at batch {batch}, expected {expected.shape}")
        rel = float(np.abs(got - expected).max() / max(float(np.abs(expected).max()), 1e-12))
        if precision == "fp16":
            cosine = float(cosine_per_patch(got, expected).min())
            if not cosine >= SMOKE_COSINE:  # also catches NaN
                raise EncoderExportError(
                    f"{path.name}: ONNX Runtime's features differ from PyTorch's: cosine {cosine:.6f} (relative "
                    f"difference {rel:.2e}) at batch {batch}"
                )
        elif not rel <= SMOKE_TOLERANCE:  # also catches NaN
            raise EncoderExportError(
                f"{path.name}: ONNX Runtime's features differ from PyTorch's by {rel:.2e} (relative) at batch {batch}"
            )


def cosine_per_patch(got, expected):
    """Cosine similarity of each row of ``got`` with the same row of ``expected`` (NaN where ``got`` is
    not finite), in float64."""
    import numpy as np

    a, b = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (a * b).sum(axis=1) / norms
    return np.where(np.isfinite(a).all(axis=1), cosine, np.nan)


def _op_counts(path: Path) -> tuple[collections.Counter, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in proto.graph.node)
    return ops, hashlib.sha256(proto.graph.SerializeToString()).hexdigest()[:16]


def _check_fused(model: torch.nn.Module, path: Path, ops: collections.Counter, op: str) -> None:
    attentions = getattr(model, "attention_ops", 0)
    if ops[op] < attentions:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        raise EncoderExportError(
            f"{path.name}: {ops[op]} {op} nodes for the encoder's {attentions} attentions; "
            "one was left as MatMul and Softmax"
        )


def _export_onnx(
    model: torch.nn.Module, path: Path, patch_size: int, external_above: int = EXTERNAL_DATA_ABOVE,
    opset: int = ENCODER_OPSET, fuse: bool = True,
) -> EngineEntry:
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from .fp16 import preprocessing_nodes

    batch = torch.export.Dim("B", min=1, max=1 << 16)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            model,
            (example_patches(EXAMPLE_BATCH, patch_size),),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            input_names=["patches"],
            output_names=["features"],
            optimize=True,
            verbose=False,
        )
        fusions = {}
        if fuse:  # a ViT's attentions become com.microsoft.MultiHeadAttention (LayerNorms and GELUs fused too)
            graph, fusions = optimize_for_ort(program.model)
        else:
            graph = program.model
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    external = weights > external_above
    if external:
        # model.onnx.data beside the graph, which names it: written in place, since the version folder
        # being built is itself written atomically (a renamed graph would lose its data file's name)
        ir.save(graph, path, external_data=f"{path.name}.data")
        onnx.checker.check_model(str(path))
    else:
        with atomic_path(path, suffix=".onnx") as tmp:
            onnx.save_model(ir.serde.serialize_model(graph), str(tmp))
            onnx.checker.check_model(str(tmp))
    del program, graph
    ops, digest = _op_counts(path)
    attention_op = "com.microsoft::MultiHeadAttention" if fuse else "ai.onnx::Attention"
    _check_fused(model, path, ops, attention_op)
    # the position embedding is a constant: the only Resize a graph may hold is the preprocessing's
    structure = onnx.load(str(path), load_external_data=False).graph
    stray = [n.name for n in structure.node if n.op_type == "Resize" and n.name not in preprocessing_nodes(structure)]
    if stray:
        path.unlink(missing_ok=True)
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        raise EncoderExportError(f"{path.name}: Resize outside the preprocessing ({', '.join(stray)}): the position "
                                 "embedding would be interpolated on every call; it must be a constant")
    attentions = getattr(model, "attention_ops", 0)
    details = {
        "opset": opset,
        "ops": dict(sorted(ops.items())),
        "max_batch": 1 << 16,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "graph_sha256": digest,
        "external_data": f"{path.name}.data" if external else None,
        "attention": ("com.microsoft.MultiHeadAttention" if fuse else attention_op) if attentions else None,
    }
    if fuse:
        details["fusions"] = {k: v for k, v in fusions.items() if v}
    return EngineEntry(path.name, "onnxruntime", "fp32", details=details)
