"""``histosurv.json``: what a model repository entry holds, beyond what Triton's config.pbtxt says.

The manifest is the contract between ``histosurv.export`` (which writes it) and ``histosurv.runtime``
(which reads nothing else to serve a model), and the one place serving facts live. Model-level fields
describe the tensor interface every version shares (as config.pbtxt does for Triton); each numeric
version is a typed record:

* a patch encoder carries its :class:`EncoderRecord` (``encoder``): architecture, width, patch size and
  µm/px, preprocessing, feature, weights identity;
* a survival model carries the record of the encoder its training bags were made with (``trained_on``),
  its genes (:class:`GeneSpec`) and survival head (:class:`SurvivalHead`);
* every version lists its artifacts as :class:`EngineEntry` (backend, file, precision, device, the
  machine it was built for), the sha256 of every file, and the parity figures of ``histosurv verify``.

Schema 1 manifests (histosurv before the typed records) are read and upgraded in memory; what they did
not record (an encoder's µm/px and weights digest, the encoder architecture behind a model's bags) is
left unknown, which the runtime reports as a warning, not an error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.atomic import write_text_atomic
from ..data.covariates import ClinicalSpec
from ..data.encoder_record import EncoderRecord
from ..data.typed_json import FieldError, from_json_dict, to_json_dict
from ..errors import RepositoryError
from .manifest_v1 import SCHEMA_V1, upgrade_v1

__all__ = [
    "SCHEMA",
    "DATATYPES",
    "TensorSpec",
    "GeneSpec",
    "SurvivalHead",
    "BuiltFor",
    "EngineEntry",
    "ReferenceWeights",
    "VersionInfo",
    "ModelManifest",
]

SCHEMA = "histosurv.manifest/2"

# KServe v2 datatype names, as Triton and tritonclient spell them.
DATATYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # a KServe v2 datatype: FP32, FP16, INT64, UINT8, ...
    shape: tuple[int, ...]  # -1 = variable

    def __post_init__(self):
        if self.datatype not in DATATYPES:
            raise RepositoryError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DATATYPES[self.datatype])

    def check(self, array: np.ndarray) -> str | None:
        """None if ``array`` fits this spec, else what is wrong with it."""
        if array.ndim != len(self.shape):
            return f"'{self.name}' must have {len(self.shape)} dimensions {list(self.shape)}, got shape {list(array.shape)}"
        for got, want in zip(array.shape, self.shape):
            if want != -1 and got != want:
                return f"'{self.name}' must have shape {list(self.shape)}, got {list(array.shape)}"
        return None


@dataclass(frozen=True)
class GeneSpec:
    """The genes a model reads, in the order callers send them, and the standardisation fitted at
    training (inside the graph, so callers send raw expression values)."""

    names: tuple[str, ...]
    mean: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None
    standardised_in_graph: bool = True


@dataclass(frozen=True)
class SurvivalHead:
    kind: str  # "cox" (one log-hazard) or "discrete" (hazard logits over time bins)
    n_bins: int | None = None  # discrete heads
    time_bins: tuple[float, ...] | None = None  # bin edges in months, where training recorded them
    risk: str = ""  # what the served risk is, its sign and unit (risk_definition); empty in older manifests
    # What the risk means in time, fitted on the training patients at export (absent in older versions,
    # which then return risk only): the months S(t) is reported at, in the 'survival' output ...
    times: tuple[float, ...] | None = None
    baseline_hazard: tuple[float, ...] | None = None  # Cox heads: Breslow's H0 at ``times``
    # ... and the risk groups of the 'risk_group' output: group k holds cutoffs[k-1] < risk <= cutoffs[k]
    grouping: str | None = None  # "median" or "tertiles"
    groups: tuple[str, ...] | None = None  # labels, lowest risk first
    cutoffs: tuple[float, ...] | None = None
    reference_curve: dict | None = None  # the training patients' Kaplan-Meier curve: {"time": [...], "survival": [...]}
    fitted_on: str = ""  # which patients, how many, how many events

    @property
    def risk_scale(self) -> str:
        """A short name of the risk's unit, for table columns."""
        return risk_scale(self.kind, self.n_bins)

    @property
    def risk_definition(self) -> str:
        return self.risk or risk_definition(self.kind, self.n_bins)

    @property
    def has_curves(self) -> bool:
        """Whether the version returns 'survival' and 'risk_group' (fitted at export from a training run)."""
        return bool(self.times) and bool(self.cutoffs)


def risk_scale(kind: str, n_bins: int | None = None) -> str:
    return "log_hazard_ratio" if kind == "cox" else f"minus_summed_survival_{n_bins or 'k'}_bins"


def risk_definition(kind: str, n_bins: int | None = None) -> str:
    """The served risk in words: higher is always worse, but the unit depends on the survival head."""
    if kind == "cox":
        return ("Cox log relative hazard (log hazard ratio against the training cohort's baseline, unbounded): "
                "higher = worse prognosis; a difference of 1 multiplies the hazard by e = 2.72")
    return (f"minus the sum of the predicted survival probabilities over the model's {n_bins or 'k'} time bins "
            f"(between -{n_bins or 'k'} and 0): higher = worse prognosis; -k means surviving every bin")


@dataclass(frozen=True)
class BuiltFor:
    """The machine facts an artifact is tied to; a field left None ties it to nothing."""

    torch: str | None = None  # AOTInductor packages run only on the torch release that compiled them
    tensorrt: str | None = None  # TensorRT plans run only on the TensorRT release that built them
    compute_capability: str | None = None  # GPU architecture of CUDA builds, "major.minor"
    gpu: str | None = None  # the GPU it was built on (for messages)


@dataclass(frozen=True)
class EngineEntry:
    file: str  # relative to the version folder
    backend: str | None  # the runtime backend that serves it; None: an input to builds (TensorRT's graph)
    precision: str = "fp32"
    device: str = "any"  # "cpu", "cuda", or "any" (ONNX graphs run on every provider)
    built_for: BuiltFor = BuiltFor()
    kernels: str | None = None  # torch packages: histosurv kernels compiled in ("triton" | "cuda")
    profiles: tuple[tuple[int, int, int], ...] = ()  # TensorRT: (min, opt, max) bag sizes per profile
    details: dict = field(default_factory=dict)  # the builder's record for people: opset, op counts, ...

    @property
    def servable(self) -> bool:
        return self.backend is not None


@dataclass(frozen=True)
class ReferenceWeights:
    file: str  # the PyTorch weights the artifacts were exported from (what verify compares against)
    format: str


@dataclass
class VersionInfo:
    architecture: str
    config: dict  # the architecture's hyper-parameters, as its config dataclass has them
    engines: dict[str, EngineEntry]  # manifest key -> artifact
    files: dict[str, str]  # file name (relative to the version folder) -> sha256
    reference: ReferenceWeights
    encoder: EncoderRecord | None = None  # set on patch encoders: what this encoder is
    trained_on: EncoderRecord | None = None  # survival models: the encoder their training bags came from
    genes: GeneSpec | None = None
    # clinical covariates (the 'clinical' input): names, kinds, scalers and categories, in wire order
    clinical: ClinicalSpec | None = None
    survival: SurvivalHead | None = None
    # input name -> "required", "optional" (absent genes are fed as an all-NaN vector, which the
    # graph treats as missing) or "not used"
    modalities: dict[str, str] = field(default_factory=dict)
    parity: dict = field(default_factory=dict)  # engine key -> figures from `histosurv verify`
    training: dict = field(default_factory=dict)
    not_built: dict[str, str] = field(default_factory=dict)  # artifact -> why this architecture cannot have it
    created: str = ""
    histosurv_version: str = ""

    @property
    def is_encoder(self) -> bool:
        return self.encoder is not None

    @property
    def gene_names(self) -> list[str]:
        return list(self.genes.names) if self.genes is not None else []

    @property
    def optional_inputs(self) -> list[str]:
        return [name for name, how in self.modalities.items() if how == "optional"]


@dataclass
class ModelManifest:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    versions: dict[int, VersionInfo] = field(default_factory=dict)
    schema: str = SCHEMA

    @property
    def latest(self) -> int:
        if not self.versions:
            raise RepositoryError(f"model {self.name!r} has no versions")
        return max(self.versions)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def to_json(self) -> str:
        d = {
            "schema": SCHEMA,
            "name": self.name,
            "inputs": to_json_dict(self.inputs),
            "outputs": to_json_dict(self.outputs),
            "versions": {str(v): to_json_dict(info) for v, info in sorted(self.versions.items())},
        }
        return json.dumps(d, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        for version, info in self.versions.items():
            problem = consistency_problem(self, info)
            if problem:
                raise RepositoryError(f"{path}: version {version}: {problem}")
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelManifest":
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"{path}: no manifest; was this model written by 'histosurv export'?")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RepositoryError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict):
            raise RepositoryError(f"{path}: damaged manifest (not a JSON object)")
        schema = d.get("schema")
        if schema == SCHEMA_V1:
            try:
                d = upgrade_v1(d)
            except (KeyError, AttributeError, TypeError) as e:  # a field of the wrong kind, or missing
                raise RepositoryError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from e
        elif schema != SCHEMA:
            raise RepositoryError(
                f"{path}: manifest schema {schema!r}; this histosurv reads {SCHEMA!r} and {SCHEMA_V1!r}. "
                "Export the model again with this histosurv (histosurv export --run RUN or --encoder NAME)"
            )
        manifest = _from_dict(d, path)
        for version, info in manifest.versions.items():
            problem = consistency_problem(manifest, info)
            if problem:
                raise RepositoryError(f"{path}: version {version}: {problem}")
        return manifest


def _from_dict(d: dict, path: Path) -> ModelManifest:
    try:
        for key in ("name", "inputs", "outputs", "versions"):
            if key not in d:
                raise FieldError(key, "missing")
        return ModelManifest(
            name=from_json_dict(str, d["name"], "name"),
            inputs=[from_json_dict(TensorSpec, t, f"inputs[{i}]") for i, t in enumerate(d["inputs"])],
            outputs=[from_json_dict(TensorSpec, t, f"outputs[{i}]") for i, t in enumerate(d["outputs"])],
            versions={_version_number(v): from_json_dict(VersionInfo, info, f"versions.{v}") for v, info in d["versions"].items()},
        )
    except (FieldError, RepositoryError, TypeError, AttributeError) as e:
        raise RepositoryError(f"{path}: damaged manifest: {e}") from e


def _version_number(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise FieldError(f"versions.{text}", "version keys are positive integers")
    return int(text)


def consistency_problem(manifest: ModelManifest, info: VersionInfo) -> str | None:
    """What in ``info`` contradicts the model's tensors (a hand-edited or mixed-up manifest), or None."""
    patches, features_in = manifest.input("patches"), manifest.input("features")
    features_out, genes = manifest.output("features"), manifest.input("genes")
    if patches is not None:
        if info.encoder is None:
            return "the model takes 'patches' but the version has no encoder record"
        if features_out is None or info.encoder.feature_dim != features_out.shape[-1]:
            return f"encoder record says {info.encoder.feature_dim}-d features, the 'features' output is {features_out and list(features_out.shape)}"
        if info.encoder.patch_size != patches.shape[1]:
            return f"encoder record says {info.encoder.patch_size} px patches, the 'patches' input is {list(patches.shape)}"
    elif info.encoder is not None:
        return "an encoder record on a model that takes no 'patches'"
    if features_in is not None and info.trained_on is not None and info.trained_on.feature_dim not in (None, features_in.shape[-1]):
        return f"trained on {info.trained_on.feature_dim}-d features, the 'features' input is {list(features_in.shape)}"
    if genes is not None and len(info.gene_names) != genes.shape[0]:
        return f"{len(info.gene_names)} gene names for a 'genes' input of {list(genes.shape)}"
    clinical = manifest.input("clinical")
    if (clinical is None) != (info.clinical is None):
        return "a 'clinical' input without the covariates' record, or the record without the input"
    if clinical is not None and len(info.clinical.covariates) != clinical.shape[0]:
        return f"{len(info.clinical.covariates)} covariates for a 'clinical' input of {list(clinical.shape)}"
    for key, entry in info.engines.items():
        if entry.file not in info.files:
            return f"engine {key!r}: file {entry.file!r} is not among the version's files"
    return None
