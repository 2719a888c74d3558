"""The manifest's typed records: read back exactly as written, checked field by field, and schema-1
manifests (written by histosurv before the records; the two in tests/data/manifest_v1 come from the
demo repository of that version) read and upgraded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from histosurv.data.encoder_record import EncoderRecord
from histosurv.errors import RepositoryError
from histosurv.runtime.manifest import SCHEMA, EngineEntry, ModelManifest
from histosurv.runtime.repository import MANIFEST, ModelRepository

V1 = Path(__file__).parent / "data" / "manifest_v1"


def test_a_manifest_reads_back_as_written(tiny_repo, tmp_path):
    path = tiny_repo / "ammasurv" / MANIFEST
    manifest = ModelManifest.load(path)
    assert manifest.schema == SCHEMA == json.loads(path.read_text())["schema"]
    manifest.save(tmp_path / MANIFEST)
    assert json.loads((tmp_path / MANIFEST).read_text()) == json.loads(path.read_text())
    info = manifest.versions[1]
    assert isinstance(info.engines["onnxruntime"], EngineEntry) and isinstance(info.trained_on, EncoderRecord)
    assert info.survival.kind == "cox" and info.genes.names == tuple(info.gene_names)


def test_schema_1_survival_model_is_upgraded():
    manifest = ModelManifest.load(V1 / "ammasurv.json")
    info = manifest.versions[1]
    assert info.trained_on.architecture == "synthetic" and info.trained_on.feature_dim == 512  # refused any real encoder
    assert info.trained_on.weights is None and info.trained_on.mpp is None
    assert len(info.gene_names) == 200 and len(info.genes.mean) == 200 and info.survival.kind == "cox"
    engines = info.engines
    assert engines["onnx_opset23"].backend is None and not engines["onnx_opset23"].servable
    assert (engines["onnxruntime_fp16"].backend, engines["onnxruntime_fp16"].precision) == ("onnxruntime", "fp16")
    torch_entry = engines["torch"]
    assert (torch_entry.backend, torch_entry.device, torch_entry.built_for.torch) == ("torch", "cpu", "2.13.0+cpu")
    assert engines["onnxruntime"].details["ops"]["com.microsoft::MultiHeadAttention"] == 2
    assert engines["onnxruntime"].built_for.torch is None  # the exporter's torch does not tie an ONNX graph


def test_schema_1_encoder_is_upgraded_with_what_it_did_not_record_left_unknown():
    info = ModelManifest.load(V1 / "resnet18_encoder.json").versions[1]
    record = info.encoder
    assert (record.architecture, record.feature_dim, record.patch_size, record.feature) == ("resnet18", 512, 256, "pooled")
    assert record.mpp is None and record.weights.sha256 is None and record.weights.source == "seeded"
    assert record.preprocessing.mean == (0.485, 0.456, 0.406)


def test_a_manifest_of_another_schema_says_how_to_re_export(tmp_path):
    d = json.loads((V1 / "resnet18_encoder.json").read_text())
    d["schema"] = "histosurv.manifest/9"
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(RepositoryError, match="schema 'histosurv.manifest/9'.*Export the model again with this histosurv"):
        ModelManifest.load(tmp_path / MANIFEST)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda v: v["genes"].update(names="GENE1"), "versions.1.genes.names: expected a list"),
        (lambda v: v["trained_on"].update(mpp="20x"), "versions.1.trained_on.mpp"),
        (lambda v: v["engines"]["onnxruntime"].update(precision=16), "versions.1.engines.onnxruntime.precision: expected str"),
        (lambda v: v.update(colour="blue"), "unknown field\\(s\\) \\['colour'\\] for VersionInfo"),
        (lambda v: v["genes"].update(names=["A", "B"]), "2 gene names for a 'genes' input of \\[24\\]"),
        (lambda v: v["trained_on"].update(feature_dim=64), "trained on 64-d features, the 'features' input is \\[-1, 32\\]"),
        (lambda v: v["engines"]["onnxruntime"].update(file="elsewhere.onnx"), "file 'elsewhere.onnx' is not among"),
    ],
)
def test_a_damaged_or_contradictory_manifest_is_refused_naming_the_field(tiny_repo, tmp_path, edit, message):
    with pytest.raises(RepositoryError, match=message):
        _edited_copy(tiny_repo, "ammasurv", tmp_path, edit).version("ammasurv", verify=False)


def _edited_copy(repo: Path, model: str, tmp_path: Path, edit) -> ModelRepository:
    """A copy of ``model`` whose version-1 manifest entry ``edit`` has changed, as a hand edit would."""
    shutil.copytree(repo / model, tmp_path / model)
    path = tmp_path / model / MANIFEST
    d = json.loads(path.read_text())
    edit(d["versions"]["1"])
    path.write_text(json.dumps(d))
    return ModelRepository(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda v: v["encoder"].update(feature_dim=1024), "encoder record says 1024-d features, the 'features' output is \\[-1, 512\\]"),
        (lambda v: v["encoder"].update(patch_size=224), "encoder record says 224 px patches, the 'patches' input is \\[-1, 256, 256, 3\\]"),
        (lambda v: v.pop("encoder"), "the model takes 'patches' but the version has no encoder record"),
    ],
)
def test_an_encoder_record_must_be_there_and_agree_with_the_tensors(slide_repo, tmp_path, edit, message):
    with pytest.raises(RepositoryError, match=message):
        _edited_copy(slide_repo[0], "resnet18_encoder", tmp_path, edit).version("resnet18_encoder", verify=False)


def test_serving_facts_come_from_the_version(slide_repo):
    repo, _, _ = slide_repo
    repository = ModelRepository(repo)
    model, encoder = repository.version("ammasurv"), repository.version("resnet18_encoder")
    assert (model.is_encoder, model.feature_dim, model.takes("coords"), len(model.gene_names)) == (False, 512, True, 24)
    assert (encoder.is_encoder, encoder.feature_dim, encoder.patch_size) == (True, 512, 256)
    assert model.trained_on.compare(encoder.encoder_record).same  # the fixture's bags are recorded as this encoder's
    assert [mv.name for mv in repository.encoders()] == ["resnet18_encoder"] and repository.default_model() == "ammasurv"
