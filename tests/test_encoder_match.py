"""A model is served only with the encoder and µm/px of its training bags (DESIGN.md, Principles).

The choice rule is tested on manifests built in memory (every case, fast); then the refusals and the
overrides on the paths users take: the CLI (predict from a slide and from h5 bags, score), the
server (ScoreSlide) and training (bags of two encoders).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import grpc
import h5py
import numpy as np
import pytest

from histosurv.data.cohort import load_cohort
from histosurv.data.encoder_record import IMAGENET_MEAN, IMAGENET_STD, EncoderRecord, Preprocessing, WeightsIdentity
from histosurv.data.features import Bag, read_bag, write_bag
from histosurv.errors import InputError, MismatchError, RepositoryError
from histosurv.runtime.encoder_match import check_bag, choose_encoder
from histosurv.runtime.manifest import (
    EngineEntry,
    ModelManifest,
    ReferenceWeights,
    SurvivalHead,
    TensorSpec,
    VersionInfo,
)
from histosurv.runtime.repository import ModelRepository, ModelVersion

from .conftest import run_cli

RESNET18 = EncoderRecord(
    architecture="resnet18", feature_dim=512, patch_size=256, mpp=0.5, input_size=256,
    preprocessing=Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD), feature="pooled",
    weights=WeightsIdentity("a" * 64, "seeded", "seed 0"),
)
OTHER_WEIGHTS = dataclasses.replace(RESNET18, weights=WeightsIdentity("b" * 64, "file", "resnet18-imagenet.pth"))


def encoder(name: str, record: EncoderRecord, version: int = 1) -> ModelVersion:
    manifest = ModelManifest(
        name,
        [TensorSpec("patches", "UINT8", (-1, record.patch_size, record.patch_size, 3))],
        [TensorSpec("features", "FP32", (-1, record.feature_dim))],
        {version: VersionInfo(record.architecture, {}, {"onnxruntime": EngineEntry("model.onnx", "onnxruntime")},
                              {"model.onnx": "0" * 64}, ReferenceWeights("model.safetensors", "safetensors"), encoder=record)},
    )
    return ModelVersion(name, version, Path("/nowhere") / name / str(version), manifest)


def model(trained_on: EncoderRecord | None, width: int = 512) -> ModelVersion:
    manifest = ModelManifest(
        "abmil",
        [TensorSpec("features", "FP32", (-1, width))],
        [TensorSpec("risk", "FP32", (1,)), TensorSpec("attention", "FP32", (-1,))],
        {1: VersionInfo("abmil", {}, {}, {}, ReferenceWeights("model.safetensors", "safetensors"), trained_on=trained_on,
                        survival=SurvivalHead("discrete", 4))},
    )
    return ModelVersion("abmil", 1, Path("/nowhere/abmil/1"), manifest)


# --- the rule -------------------------------------------------------------------------------------


def test_the_training_encoder_is_found_by_its_record_among_encoders_of_the_same_width():
    mine, other = encoder("resnet18_encoder", RESNET18), encoder("resnet18_imagenet", OTHER_WEIGHTS)
    assert choose_encoder([other, mine], model(RESNET18)).encoder is mine
    assert choose_encoder([other, mine], model(OTHER_WEIGHTS)).encoder is other
    choice = choose_encoder([other, mine], model(RESNET18))
    assert (choice.mpp, choice.overrides, choice.notes) == (0.5, {}, ())


@pytest.mark.parametrize(
    "changed,field",
    [
        (dict(weights=WeightsIdentity("b" * 64, "file", "x.pth")), "weights: sha256 aaaaaaaaaaaa expected, sha256 bbbbbbbbbbbb here"),
        (dict(architecture="resnet50_trunc"), "architecture: resnet18 expected, resnet50_trunc here"),
        (dict(preprocessing=Preprocessing(resize=224, resize_filter="bilinear-antialias")), "preprocessing"),
        (dict(feature="cls"), "feature: pooled expected, cls here"),
        (dict(input_size=224), "input_size: 256 expected, 224 here"),
    ],
)
def test_an_encoder_that_differs_from_the_training_one_is_refused_naming_the_field(changed, field):
    served = encoder("resnet18_encoder", dataclasses.replace(RESNET18, **changed))
    with pytest.raises(MismatchError, match=f"no encoder matches the bags model abmil v1 was trained on.*{field}"):
        choose_encoder([served], model(RESNET18))
    with pytest.raises(MismatchError, match=f"differs: {field}"):  # named explicitly: still refused
        choose_encoder([served], model(RESNET18), name="resnet18_encoder")
    choice = choose_encoder([served], model(RESNET18), allow_mismatch=True)
    assert choice.encoder is served and field.split(":")[0] in choice.overrides["encoder"]
    assert any(n.startswith("override: model abmil v1 was trained on features of resnet18") for n in choice.notes)


def test_width_is_checked_even_with_the_override():
    wide = encoder("resnet50_trunc_encoder", dataclasses.replace(RESNET18, architecture="resnet50_trunc", feature_dim=1024))
    with pytest.raises(RepositoryError, match="no patch encoder gives the 512-d features abmil v1 takes"):
        choose_encoder([wide], model(RESNET18), allow_mismatch=True)
    with pytest.raises(MismatchError, match="gives 1024-d features; model abmil v1 takes 512-d"):
        choose_encoder([wide], model(RESNET18), name="resnet50_trunc_encoder", allow_mismatch=True)


def test_patches_are_cut_at_the_training_scale_and_an_mpp_override_is_recorded():
    trained_at_40x = dataclasses.replace(RESNET18, mpp=0.25)  # bags tiled at 0.25 µm/px by the same encoder
    choice = choose_encoder([encoder("resnet18_encoder", RESNET18)], model(trained_at_40x))
    assert choice.mpp == 0.25 and choice.overrides == {} and choice.record.mpp == 0.25
    choice = choose_encoder([encoder("resnet18_encoder", RESNET18)], model(trained_at_40x), mpp=0.5)
    assert choice.mpp == 0.5 and choice.overrides == {"mpp": "0.5 µm/px instead of 0.25"}
    assert "override: cutting patches at 0.5 µm/px; model abmil v1 was trained on patches cut at 0.25" in choice.notes[0]
    same = choose_encoder([encoder("resnet18_encoder", RESNET18)], model(trained_at_40x), mpp=0.25)
    assert same.overrides == {}  # asking for the training scale is no override


def test_what_is_not_recorded_is_reported_not_treated_as_a_match():
    partial = EncoderRecord(architecture=None, feature_dim=512, patch_size=256, name="resnet18_encoder")  # a CLAM cohort
    choice = choose_encoder([encoder("resnet18_encoder", RESNET18)], model(partial))
    assert choice.encoder.name == "resnet18_encoder" and choice.overrides == {}
    assert any("not recorded, so not checked" in n and "architecture" in n and "weights" in n for n in choice.notes)
    unrecorded = choose_encoder([encoder("resnet18_encoder", RESNET18)], model(None))
    assert "does not record its training encoder" in unrecorded.notes[0]
    two = [encoder("a", RESNET18), encoder("b", OTHER_WEIGHTS)]
    with pytest.raises(RepositoryError, match="several encoders give 512-d features \\(a, b\\); choose one with --encoder"):
        choose_encoder(two, model(None))


def test_without_a_model_the_only_encoder_is_used_at_its_own_scale():
    choice = choose_encoder([encoder("resnet18_encoder", RESNET18)], None, mpp=0.25)
    assert choice.mpp == 0.25 and "encoder resnet18_encoder v1 is meant for 0.5" in choice.notes[0]
    with pytest.raises(RepositoryError, match="no patch encoder; add one with 'histosurv export --encoder resnet18'"):
        choose_encoder([], None)
    with pytest.raises(RepositoryError, match="no patch encoder .nope. \\(encoders: resnet18_encoder\\)"):
        choose_encoder([encoder("resnet18_encoder", RESNET18)], None, name="nope")


def test_bags_are_checked_against_the_training_bags():
    trained = model(RESNET18)
    features, coords = np.ones((3, 512), np.float32), np.zeros((3, 2), np.int64)
    good = Bag(features, coords, {"encoder_record": RESNET18.with_provenance("resnet18_encoder", 2).to_json()}, "good.h5")
    assert check_bag(good, trained) == ([], {})  # another version of the same encoder: same record
    other = Bag(features, coords, {"encoder_record": OTHER_WEIGHTS.to_json()}, "other.h5")
    with pytest.raises(MismatchError, match="other.h5: made differently .* weights: sha256 aaaaaaaaaaaa expected"):
        check_bag(other, trained)
    notes, overrides = check_bag(other, trained, allow_mismatch=True)
    assert "weights" in overrides["encoder"] and notes[0].startswith("override: features made differently")
    at_40x = Bag(features, coords, {"encoder_record": dataclasses.replace(RESNET18, mpp=0.25).to_json()}, "40x.h5")
    with pytest.raises(MismatchError, match="µm/px: 0.5 expected, 0.25 here"):
        check_bag(at_40x, trained)
    clam = Bag(features, coords, {"patch_size": 256, "patch_level": 0}, "clam.h5")  # CLAM writes no encoder
    notes, _ = check_bag(clam, trained)
    assert notes == ["some bags record no encoder (older or CLAM h5 files); only their width could be checked"]
    scanner_rounding = Bag(features, coords, {"encoder_record": dataclasses.replace(RESNET18, mpp=0.499).to_json()}, "x.h5")
    assert check_bag(scanner_rounding, trained) == ([], {})


def test_training_refuses_bags_made_by_two_encoders(tmp_path):
    from histosurv.data.synth import SynthConfig, write_synthetic_cohort

    config = SynthConfig(n_patients=8, n_genes=6, n_signal_genes=2, feature_dim=512, min_patches=4, max_patches=6)
    cohort = write_synthetic_cohort(tmp_path / "cohort", config, encoder_record=RESNET18)
    loaded = load_cohort(cohort / "clinical.csv", cohort / "genes.csv", cohort / "features")
    assert loaded.encoder == RESNET18 and loaded.encoder_notes == []
    last = sorted((cohort / "features").glob("*.h5"))[-1]
    with h5py.File(last, "r+") as f:
        f.attrs["encoder_record"] = OTHER_WEIGHTS.to_json()
    with pytest.raises(InputError, match=f"and {re.escape(str(last))} were made differently \\(weights: sha256 aaaa.*one encoder"):
        load_cohort(cohort / "clinical.csv", cohort / "genes.csv", cohort / "features")


# --- the paths users take -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_repo(slide_repo, tmp_path_factory):
    """The slide repository's model beside a ResNet18 encoder with other weights than its bags': a lab
    that exported the wrong encoder under the expected name."""
    from histosurv.export.encoder_export import export_encoder

    repo, cohort_dir, case = slide_repo
    foreign = tmp_path_factory.mktemp("foreign") / "repo"
    shutil.copytree(repo / "ammasurv", foreign / "ammasurv")
    export_encoder(foreign, "resnet18", seed=1)
    return foreign, cohort_dir, case


def test_predict_refuses_a_slide_through_another_encoder_and_records_the_override(foreign_repo, cmu_svs):
    repo, cohort_dir, case = foreign_repo
    args = ("predict", "--repo", repo, "--case-id", case, "--genes", cohort_dir / "genes.csv", "--slide", cmu_svs)
    refused = run_cli(*args)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "no encoder matches the bags model ammasurv v1 was trained on" in refused.stderr
    assert "resnet18_encoder v1: weights: sha256" in refused.stderr and "--allow-encoder-mismatch" in refused.stderr
    allowed = run_cli(*args, "--allow-encoder-mismatch", "--mpp", "0.55")
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(allowed.stdout)
    assert set(report["overrides"]) == {"encoder", "mpp"} and report["patch_mpp"] == 0.55
    assert report["slides"][0]["mpp"] == pytest.approx(0.55, rel=0.02)
    assert "warning: override: cutting patches at 0.55 µm/px" in allowed.stderr


def test_predict_refuses_bags_tiled_by_another_encoder(foreign_repo, slide_repo, cmu_svs, tmp_path):
    repo, cohort_dir, case = foreign_repo
    tiled = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5")  # no model: the only encoder
    assert tiled.returncode == 0, tiled.stderr
    args = ("predict", "--repo", slide_repo[0], "--case-id", case, "--genes", cohort_dir / "genes.csv",
            "--features", tmp_path / "cmu.h5")
    refused = run_cli(*args)
    assert refused.returncode == 2 and "cmu.h5: made differently from the bags model ammasurv v1 was trained on" in refused.stderr
    allowed = run_cli(*args, "--allow-encoder-mismatch")
    assert allowed.returncode == 0 and "weights" in json.loads(allowed.stdout[: allowed.stdout.rindex("}") + 1])["overrides"]["encoder"]


def test_tile_for_a_model_cuts_at_its_training_scale(slide_repo, cmu_svs, tmp_path):
    repo, _, _ = slide_repo
    out = run_cli("tile", cmu_svs, "--repo", repo, "--model", "ammasurv", "--out", tmp_path / "cmu.h5", "--mpp", "0.6")
    assert out.returncode == 0 and "override: cutting patches at 0.6 µm/px; model ammasurv v1 was trained" in out.stderr
    bag = read_bag(tmp_path / "cmu.h5")
    assert EncoderRecord.from_json(bag.attrs["encoder_record"]).mpp == 0.6
    assert bag.attrs["override_mpp"] == "0.6 µm/px instead of 0.5"


def test_score_refuses_the_run_before_any_slide(foreign_repo, cmu_svs, tmp_path):
    repo, cohort_dir, case = foreign_repo
    (tmp_path / "slides.csv").write_text(f"path,slide_id,case_id\n{cmu_svs},s1,{case}\n")
    args = ("score", tmp_path / "slides.csv", "--repo", repo, "--genes", cohort_dir / "genes.csv")
    refused = run_cli(*args, "--out", tmp_path / "run")
    assert refused.returncode == 2 and "no encoder matches" in refused.stderr and not (tmp_path / "run").exists()
    allowed = run_cli(*args, "--out", tmp_path / "run2", "--allow-encoder-mismatch")
    assert allowed.returncode == 0, allowed.stderr
    record = json.loads((tmp_path / "run2" / "results" / "s1.json").read_text())
    assert record["status"] == "scored" and "weights" in record["overrides"]["encoder"]


def test_score_slide_refuses_then_accepts_the_override(foreign_repo, cmu_svs):
    from histosurv.runtime.server._proto import slide_service_pb2 as spb
    from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
    from histosurv.runtime.server.models import ModelStore
    from histosurv.runtime.server.security import SlideRoots
    from histosurv.runtime.server.slide_service import SlideServiceConfig

    from .serving import RunningServer

    repo, cohort_dir, case = foreign_repo
    store = ModelStore(repo)
    store.load_all()
    genes = read_genes(cohort_dir, case, ModelRepository(repo).version("ammasurv").gene_names)
    server = RunningServer(store, slides=SlideServiceConfig(roots=SlideRoots([cmu_svs.parent])))
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = spb_grpc.SlideServiceStub(channel)
            request = spb.ScoreSlideRequest(slide_uri=cmu_svs.name, model_name="ammasurv", genes=genes)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ScoreSlide(request, timeout=120))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "weights: sha256" in refused.value.details()
            request.allow_encoder_mismatch = True
            result = list(stub.ScoreSlide(request, timeout=300))[-1].result
            assert np.isfinite(result.risk) and "weights" in result.overrides["encoder"] and result.patch_mpp == 0.5
    finally:
        server.stop()
        store.close()


def read_genes(cohort_dir: Path, case: str, names: list[str]) -> list[float]:
    from histosurv.data.tables import GeneTable

    return GeneTable.read(cohort_dir / "genes.csv").vectors([case], names)[0].tolist()


def test_h5_attributes_where_clam_and_trident_write_them(tmp_path):
    """A CLAM patch file puts its attributes on 'coords', TRIDENT its encoder on 'features'; both are read."""
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.ones((2, 8), np.float32)).attrs["encoder"] = "uni_v1"
        coords = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int32))
        coords.attrs.update(patch_size=512, patch_level=0, downsample=np.array([1.0, 1.0]), name="clam")
        coords.attrs["target_magnification"] = 20
    bag = read_bag(path)
    assert (bag.attrs["patch_size"], bag.attrs["patch_level"], bag.attrs["encoder"]) == (512, 0, "uni_v1")
    from histosurv.data.encoder_record import record_from_attrs

    record, complete = record_from_attrs(bag.attrs, bag.dim, str(path))
    assert not complete and (record.name, record.mpp, record.patch_size, record.architecture) == ("uni_v1", 0.5, 512, None)
    written = tmp_path / "ours.h5"
    write_bag(written, Bag(bag.features, bag.coords, {"patch_size": 256, "read_size": 512, "patch_level": 0,
                                                      "patch_size_level0": 512, "encoder": "resnet18_encoder"}))
    with h5py.File(written) as f:
        assert dict(f["coords"].attrs)["patch_size"] == 512 and list(f["coords"].attrs["downsample"]) == [1.0, 1.0]
        assert f.attrs["patch_size"] == 256  # histosurv's own: the side as encoded
    assert read_bag(written).attrs["patch_size"] == 256
