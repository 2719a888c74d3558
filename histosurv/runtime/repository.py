"""Reading a model repository (Triton's layout plus ``histosurv.json``).

    model_repository/<model>/config.pbtxt, histosurv.json, <version>/model.onnx, ...

Before a version is used, every file the manifest lists is checked against its sha256, so a
half-copied or edited artifact is refused by name instead of serving wrong risks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.encoder_record import EncoderRecord
from ..errors import InputError, RepositoryError
from .manifest import ModelManifest, TensorSpec, VersionInfo

__all__ = ["MANIFEST", "ModelRepository", "ModelVersion", "check_model_name", "sha256_file"]

MANIFEST = "histosurv.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One version of one model, and the serving facts every entry point reads from it (nothing
    re-derives them from tensor names)."""

    name: str
    version: int
    path: Path  # the numeric version folder
    manifest: ModelManifest

    @property
    def info(self) -> VersionInfo:
        return self.manifest.versions[self.version]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def takes(self, tensor: str) -> bool:
        return self.manifest.input(tensor) is not None

    @property
    def is_encoder(self) -> bool:
        return self.info.is_encoder

    @property
    def encoder_record(self) -> EncoderRecord:
        """What this patch encoder is, with its repository name and version as provenance."""
        if self.info.encoder is None:
            raise RepositoryError(f"model {self.name!r} is not a patch encoder")
        return self.info.encoder.with_provenance(self.name, self.version)

    @property
    def feature_dim(self) -> int | None:
        """Width of the features an encoder makes, or a survival model takes (None: it takes none)."""
        spec = self.manifest.output("features") if self.is_encoder else self.manifest.input("features")
        return int(spec.shape[-1]) if spec is not None else None

    @property
    def patch_size(self) -> int:
        return int(self.encoder_record.patch_size)

    @property
    def trained_on(self) -> EncoderRecord | None:
        """A survival model's record of the encoder its training bags came from (None: not recorded)."""
        return self.info.trained_on

    @property
    def gene_names(self) -> list[str]:
        return self.info.gene_names

    def engine_file(self, key: str) -> Path:
        entry = self.info.engines.get(key)
        if entry is None:
            present = ", ".join(sorted(self.info.engines)) or "none"
            raise RepositoryError(f"{self.path}: no {key} engine in this version (present: {present})")
        return self.path / entry.file

    def verify_files(self) -> None:
        for name, digest in self.info.files.items():
            path = self.path / name
            if not path.is_file():
                raise RepositoryError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != digest:
                raise RepositoryError(f"{path}: sha256 does not match the manifest; the file was changed or cut short")


def check_model_name(name: str) -> None:
    """Refuses a model name that is not one plain folder name: a request naming ``../x`` or an absolute
    path must not make the server load a model from outside its repository."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\x00"):
        raise InputError(
            f"model name {name!r} is not the name of a folder of the model repository "
            "(no '/', '\\', '..' or absolute paths)"
        )


class ModelRepository:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: model repository not found")

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def manifest(self, name: str) -> ModelManifest:
        check_model_name(name)
        path = self.root / name / MANIFEST
        # only a folder of this repository: a name reached through a symlink the operator placed is one
        if not path.is_file() or name not in self.models():
            known = ", ".join(self.models()) or "none"
            raise RepositoryError(f"{self.root}: no model {name!r} (models here: {known})")
        return ModelManifest.load(path)

    def version(self, name: str, version: int | None = None, verify: bool = True) -> ModelVersion:
        """The pinned version, or the highest one; with ``verify`` its files' sha256 are checked."""
        manifest = self.manifest(name)
        v = manifest.latest if version is None else int(version)
        if v not in manifest.versions:
            raise RepositoryError(f"model {name!r} has no version {v} (versions: {sorted(manifest.versions)})")
        mv = ModelVersion(name, v, self.root / name / str(v), manifest)
        if verify:
            mv.verify_files()
        return mv

    def latest_versions(self) -> list[ModelVersion]:
        """The highest version of every model whose manifest reads (files not checked: a listing)."""
        found = []
        for name in self.models():
            try:
                found.append(self.version(name, verify=False))
            except RepositoryError:
                continue  # a damaged model is reported when it is asked for by name
        return found

    def encoders(self) -> list[ModelVersion]:
        return [mv for mv in self.latest_versions() if mv.is_encoder]

    def default_model(self) -> str:
        """The repository's survival model, when it holds exactly one (else the names to choose from)."""
        names = [mv.name for mv in self.latest_versions() if not mv.is_encoder]
        if len(names) == 1:
            return names[0]
        if not names:
            raise RepositoryError(f"{self.root}: no survival model here (models: {', '.join(self.models()) or 'none'})")
        raise RepositoryError(f"{self.root}: several survival models ({', '.join(names)}); choose one with --model")
