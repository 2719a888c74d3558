"""The artifacts a model version can hold, registered by name: what each builds and how it is checked.

The export side's mirror of the runtime's ``ENGINES``: ``histosurv export`` builds the entries of its
model's role (survival model or patch encoder) that are ``always`` or ``default`` built, in order (the
FP16 graph is made from model.onnx, so it comes after it); ``histosurv export --add-engine NAME``
builds any entry into a published version, on the machine that will serve it (``on_target``: a
TensorRT plan or a compiled torch package is tied to that machine); ``histosurv verify`` checks what
each entry says it can be checked with. Adding an artifact kind is adding an entry here (and, for a new
backend, an engine under ``runtime/engines``).

An architecture that cannot have an artifact says so in its ``unsupported_artifacts`` (MoME: no
AOTInductor package); export records the reason in the manifest's ``not_built`` instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..runtime.manifest import EngineEntry
from ..runtime.repository import ModelVersion

__all__ = ["Artifact", "BuildContext", "ARTIFACTS", "artifact", "artifact_of_key", "artifacts_for", "default_artifacts"]


@dataclass
class BuildContext:
    """What a builder may need: the PyTorch model (built on first use from the version's reference
    weights when the caller did not pass one), the folder the files go to, the published version
    (``add_engine`` only), the builder's options and a log."""

    folder: Path
    version: ModelVersion | None = None
    options: dict = field(default_factory=dict)
    log: Callable[[str], None] = lambda _: None
    _model: object = None
    shared: dict = field(default_factory=dict)  # what builders of one export share (an encoder's reference features)

    @property
    def model(self):
        if self._model is None:
            if self.version.is_encoder:
                from .encoder_export import encoder_from_version

                self._model = encoder_from_version(self.version)
            else:
                from .verify import reference_model

                self._model = reference_model(self.version)
        return self._model


@dataclass(frozen=True)
class Artifact:
    name: str  # what --artifacts and --add-engine take
    role: str  # "survival" or "encoder"
    summary: str
    when: str  # "always" (every export), "default" (unless --artifacts leaves it out), "on_target" (--add-engine)
    build: Callable[[BuildContext, Path], EngineEntry]
    files: Callable[[dict], tuple[str, str]]  # (manifest key, file name) it writes, given its options
    options: tuple[str, ...] = ()  # the builder options it takes (--add-engine flags)
    keys: tuple[str, ...] = ()  # the manifest keys it may write (default: its name)
    checked_with: str | None = "engine"  # how verify checks it: "engine" (as served), "onnxruntime" (a graph not served as is), None
    max_checked_bag: int | None = None  # graphs that hold N x N scores are checked at small bags only

    def target(self, options: dict | None = None) -> tuple[str, str]:
        return self.files(options or {})

    def writes(self, key: str) -> bool:
        return key in (self.keys or (self.name,))


def _fixed(key: str, file: str) -> Callable[[dict], tuple[str, str]]:
    return lambda _options: (key, file)


def _torch_files(options: dict) -> tuple[str, str]:
    """The package for this machine's device (or the one asked for): a CPU build cannot run on a GPU."""
    return ("torch", "model.pt2") if _torch_device(options) == "cpu" else ("torch_cuda", "model.cuda.pt2")


def _torch_device(options: dict) -> str:
    import torch

    return options.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


def _build_onnx(ctx: BuildContext, path: Path) -> EngineEntry:
    from .onnx_export import export_onnx

    ctx.log("exporting the ONNX graph (fused attention, for ONNX Runtime) ...")
    return export_onnx(ctx.model, path)


def _build_opset23(ctx: BuildContext, path: Path) -> EngineEntry:
    from .onnx_export import export_onnx_standard

    ctx.log("exporting the opset-23 graph (standard Attention, for TensorRT) ...")
    return export_onnx_standard(ctx.model, path)


def _build_fp16(ctx: BuildContext, path: Path) -> EngineEntry:
    from .onnx_export import export_onnx_fp16

    ctx.log("writing the FP16 graph (for GPU providers) ...")
    return export_onnx_fp16(ctx.model, ctx.folder / "model.onnx", path)


def _build_torch(ctx: BuildContext, path: Path) -> EngineEntry:
    from .torch_export import export_pt2

    device = _torch_device(ctx.options)
    ctx.log(f"compiling {path.name} with AOTInductor for {device} (about a minute) ...")
    return export_pt2(ctx.model, path, device=device, kernels=ctx.options.get("kernels"))


def _build_tensorrt(ctx: BuildContext, path: Path) -> EngineEntry:
    from .tensorrt_build import build_plan

    if ctx.version is None:
        raise InputError("a TensorRT plan is built into a published version, on the serving GPU (--add-engine tensorrt)")
    if "onnx_opset23" not in ctx.version.info.engines:
        raise InputError(f"{ctx.version.path}: a TensorRT plan is built from the opset-23 graph, which this version was "
                         "exported without: add it first with --add-engine onnx_opset23")
    options = {k: v for k, v in ctx.options.items() if k in ("max_bag", "precision")}
    return build_plan(ctx.version, path, log=ctx.log, **options)


def _encoder_patch_size(ctx: BuildContext) -> int:
    return ctx.options.get("patch_size") or ctx.version.patch_size


def _build_encoder_onnx(ctx: BuildContext, path: Path) -> EngineEntry:
    from .encoder_export import export_encoder_onnx

    reference = ctx.shared.setdefault("reference_features", {})
    return export_encoder_onnx(ctx.model, path, _encoder_patch_size(ctx), ctx.log, reference=reference)


def _build_encoder_fp16(ctx: BuildContext, path: Path) -> EngineEntry:
    from .encoder_export import export_encoder_onnx_fp16

    reference = ctx.shared.setdefault("reference_features", {})
    return export_encoder_onnx_fp16(ctx.model, ctx.folder / "model.onnx", path, _encoder_patch_size(ctx), ctx.log,
                                    reference=reference)


def _build_encoder_opset23(ctx: BuildContext, path: Path) -> EngineEntry:
    from .encoder_export import export_encoder_onnx_standard

    reference = ctx.shared.setdefault("reference_features", {})
    return export_encoder_onnx_standard(ctx.model, path, _encoder_patch_size(ctx), ctx.log, reference=reference)


def _encoder_torch_files(options: dict) -> tuple[str, str]:
    device, precision = _torch_device(options), options.get("precision") or "fp32"
    prefix = ("torch", "model") if device == "cpu" else ("torch_cuda", "model.cuda")
    if precision == "fp32":
        return prefix[0], f"{prefix[1]}.pt2"
    return f"{prefix[0]}_{precision}", f"{prefix[1]}.{precision}.pt2"


def _build_encoder_torch(ctx: BuildContext, path: Path) -> EngineEntry:
    from .torch_export import export_encoder_pt2

    device, precision = _torch_device(ctx.options), ctx.options.get("precision") or "fp32"
    ctx.log(f"compiling {path.name} with AOTInductor for {device}, {precision} (a minute or two) ...")
    return export_encoder_pt2(ctx.model, path, ctx.version.patch_size, device=device, precision=precision)


def _build_encoder_int8(ctx: BuildContext, path: Path) -> EngineEntry:
    from .quantize import build_int8_encoder

    if ctx.version is None:
        raise InputError("an INT8 encoder is built into a published version: histosurv export --add-engine "
                         "onnxruntime_int8 --calibration SLIDES (or export --encoder NAME --int8 --calibration SLIDES)")
    gates = {k: ctx.options[k] for k in ("min_cosine", "min_spearman", "fp32_fallback", "bias_correction",
                                            "weight_rounding")
             if ctx.options.get(k) is not None}
    return build_int8_encoder(ctx.version, path, ctx.options.get("calibration"), ctx.options.get("calibration_patches"),
                              force=bool(ctx.options.get("force")), log=ctx.log, **gates)


ARTIFACTS: tuple[Artifact, ...] = (
    Artifact("onnxruntime", "survival", "ONNX graph, every attention com.microsoft.MultiHeadAttention, dynamic bag size",
             "always", _build_onnx, _fixed("onnxruntime", "model.onnx")),
    # default, not always: only a TensorRT plan is built from it, on the serving GPU, and for models with
    # control flow (MoME's router) it is half the export's time; --artifacts none leaves it out, --add-engine adds it
    Artifact("onnx_opset23", "survival", "the same at opset 23 with standard Attention nodes: what TensorRT builds from",
             "default", _build_opset23, _fixed("onnx_opset23", "model.opset23.onnx"),
             checked_with="onnxruntime", max_checked_bag=300),
    Artifact("onnxruntime_fp16", "survival", "the ONNX graph in FP16 (inputs, outputs and coordinates FP32), for GPU providers",
             "default", _build_fp16, _fixed("onnxruntime_fp16", "model.fp16.onnx")),
    Artifact("torch", "survival", "AOTInductor package for this machine's device (model.pt2, or model.cuda.pt2 on a GPU)",
             "default", _build_torch, _torch_files, options=("device", "kernels"), keys=("torch", "torch_cuda")),
    Artifact("tensorrt", "survival", "TensorRT plan built from the opset-23 graph on the serving GPU",
             "on_target", _build_tensorrt, _fixed("tensorrt", "model.plan"), options=("max_bag", "precision")),
    Artifact("onnxruntime", "encoder", "ONNX graph: uint8 patches -> features, preprocessing inside, dynamic batch",
             "always", _build_encoder_onnx, _fixed("onnxruntime", "model.onnx")),
    # default, not always: no histosurv engine is built from the encoder's opset-23 graph yet, and a ViT-g's
    # is 4.5 GB; it can be left out (export_encoder(artifacts=...)) and added later (--add-engine)
    Artifact("onnxruntime_fp16", "encoder", "the encoder's ONNX graph in FP16 for GPU providers (uint8 patches in, FP32 "
             "features out; preprocessing, LayerNorms and the residual stream FP32)",
             "default", _build_encoder_fp16, _fixed("onnxruntime_fp16", "model.fp16.onnx")),
    Artifact("onnx_opset23", "encoder", "the encoder at opset 23 with standard Attention nodes: what TensorRT builds from",
             "default", _build_encoder_opset23, _fixed("onnx_opset23", "model.opset23.onnx"), checked_with="onnxruntime"),
    Artifact("torch", "encoder", "AOTInductor package of the encoder for this machine's device (model.pt2, model.cuda.pt2; "
             "model.cuda.fp16.pt2 with --precision fp16; model.bf16.pt2 with --precision bf16 on a CPU with AVX512-BF16 or AMX): "
             "a GPU encoder where ONNX Runtime has no CUDA provider, a CPU encoder at twice FP32's speed",
             "on_target", _build_encoder_torch, _encoder_torch_files, options=("device", "precision"),
             keys=("torch", "torch_bf16", "torch_cuda", "torch_cuda_fp16", "torch_cuda_bf16")),
    Artifact("onnxruntime_int8", "encoder", "the encoder's ONNX graph in INT8 for CPUs (QDQ, per-channel weights), "
             "calibrated on tissue patches of --calibration's slides; kept only where its accuracy gates pass (or "
             "--force, recorded), served by auto only where they passed",
             "on_target", _build_encoder_int8, _fixed("onnxruntime_int8", "model.int8.onnx"),
             options=("calibration", "calibration_patches", "force", "min_cosine", "min_spearman", "fp32_fallback",
                      "bias_correction", "weight_rounding")),
)


def artifacts_for(role: str) -> list[Artifact]:
    return [a for a in ARTIFACTS if a.role == role]


def default_artifacts(role: str = "survival") -> tuple[str, ...]:
    """What ``export`` builds besides the ``always`` entries unless told otherwise."""
    return tuple(a.name for a in artifacts_for(role) if a.when == "default")


def artifact(name: str, role: str) -> Artifact:
    for a in artifacts_for(role):
        if a.name == name:
            return a
    known = ", ".join(a.name for a in artifacts_for(role))
    raise InputError(f"no artifact {name!r} for a {role} model; artifacts: {known}")


def artifact_of_key(key: str, role: str) -> Artifact | None:
    """The entry that writes manifest key ``key`` (None: an artifact this histosurv does not know)."""
    return next((a for a in artifacts_for(role) if a.writes(key)), None)
