"""``histosurv.json``: what a model repository entry holds, beyond what Triton's config.pbtxt says.

The manifest is the contract between ``histosurv.export`` (which writes it) and ``histosurv.runtime``
(which reads nothing else to serve a model). Model-level fields describe the tensor interface that
every version shares (as config.pbtxt does for Triton); each numeric version records its
architecture, gene list and scaler, patch encoder, engine files with their sha256, and the parity
figures measured against PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..data.atomic import write_text_atomic
from ..errors import RepositoryError

__all__ = ["SCHEMA", "TensorSpec", "VersionInfo", "ModelManifest", "DATATYPES"]

SCHEMA = "histosurv.manifest/1"

# KServe v2 datatype names, as Triton and tritonclient spell them.
DATATYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32, "UINT8": np.uint8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # a KServe v2 datatype: FP32, FP16, INT64, UINT8, ...
    shape: tuple[int, ...]  # -1 = variable

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

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        if d["datatype"] not in DATATYPES:
            raise RepositoryError(f"tensor {d['name']!r}: unknown datatype {d['datatype']!r}")
        return cls(d["name"], d["datatype"], tuple(int(x) for x in d["shape"]))


@dataclass
class VersionInfo:
    architecture: str
    config: dict
    survival_head: str
    genes: dict  # {"names": [...], "mean": [...], "scale": [...], "standardised_in_graph": true}
    patch_encoder: dict
    engines: dict  # backend name -> {"file": ..., other facts about that artifact}
    files: dict  # file name (relative to the version folder) -> sha256
    reference: dict = field(default_factory=dict)  # the PyTorch weights verify compares against
    parity: dict = field(default_factory=dict)  # backend -> figures from `histosurv verify`
    training: dict = field(default_factory=dict)
    created: str = ""
    histosurv_version: str = ""
    # input name -> "required", "optional" (absent genes are fed as an all-NaN vector, which the
    # graph treats as missing) or "not used"; empty in manifests written before the model zoo
    modalities: dict = field(default_factory=dict)
    not_built: dict = field(default_factory=dict)  # artifact -> why this architecture cannot have it

    @property
    def gene_names(self) -> list[str]:
        return list(self.genes.get("names", []))

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

    def to_json(self) -> str:
        d = {
            "schema": self.schema,
            "name": self.name,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "versions": {str(v): asdict(info) for v, info in sorted(self.versions.items())},
        }
        return json.dumps(d, indent=1)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelManifest":
        path = Path(path)
        if not path.is_file():
            raise RepositoryError(f"{path}: no manifest; was this model written by 'histosurv export'?")
        try:
            d = json.loads(path.read_text())
            if d.get("schema") != SCHEMA:
                raise RepositoryError(f"{path}: manifest schema {d.get('schema')!r}, this histosurv reads {SCHEMA!r}")
            return cls(
                name=d["name"],
                inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
                outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
                versions={int(v): VersionInfo(**info) for v, info in d["versions"].items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RepositoryError(f"{path}: damaged manifest ({type(e).__name__}: {e})") from e
