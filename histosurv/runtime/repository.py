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

from ..errors import RepositoryError
from .manifest import ModelManifest, TensorSpec, VersionInfo

__all__ = ["MANIFEST", "ModelRepository", "ModelVersion", "sha256_file"]

MANIFEST = "histosurv.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
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

    def engine_file(self, backend: str) -> Path:
        entry = self.info.engines.get(backend)
        if entry is None:
            present = ", ".join(sorted(self.info.engines)) or "none"
            raise RepositoryError(f"{self.path}: no {backend} engine in this version (present: {present})")
        return self.path / entry["file"]

    def verify_files(self) -> None:
        for name, digest in self.info.files.items():
            path = self.path / name
            if not path.is_file():
                raise RepositoryError(f"{path}: listed in the manifest but missing")
            if sha256_file(path) != digest:
                raise RepositoryError(f"{path}: sha256 does not match the manifest; the file was changed or cut short")


class ModelRepository:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: model repository not found")

    def models(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def manifest(self, name: str) -> ModelManifest:
        path = self.root / name / MANIFEST
        if not path.is_file():
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
