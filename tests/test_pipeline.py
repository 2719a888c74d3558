"""Slide to risk through the CLI on the real SVS: tile, predict --slide, and what bad slides give."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from histosurv.errors import EmptySlideError
from histosurv.runtime.pipeline import PatchEncoder, SlideConfig, featurize_slide
from histosurv.data.encoder_record import EncoderRecord
from histosurv.runtime.repository import ModelRepository, sha256_file
from histosurv.runtime.slides import open_slide

from .conftest import run_cli


def test_featurize_matches_encoding_the_grid_patches_directly(slide_repo, cmu_svs):
    repo, _, _ = slide_repo
    encoder = PatchEncoder.from_repository(repo, "resnet18_encoder")
    result = featurize_slide(cmu_svs, encoder, SlideConfig(batch_size=8))
    bag, grid = result.bag, result.grid
    assert len(bag) == len(grid) > 20 and bag.dim == 512
    assert np.array_equal(bag.coords, grid.coords)
    with open_slide(cmu_svs, "openslide") as slide:  # the other reader: same pixels, same features
        picks = [0, len(grid) // 2, len(grid) - 1]
        patches = np.stack([slide.read_region(tuple(int(v) for v in grid.coords[i]), (256, 256), 0) for i in picks])
    np.testing.assert_allclose(encoder.encode(patches), bag.features[picks], rtol=0, atol=1e-5)
    assert set(result.seconds) >= {"open", "mask", "grid", "read", "encode", "total"}
    assert result.bag.attrs["slide_sha256"] == sha256_file(cmu_svs)


def test_tile_writes_a_clam_h5(slide_repo, cmu_svs, tmp_path):
    repo, _, _ = slide_repo
    out = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5", "--batch-size", "16")
    assert out.returncode == 0, out.stderr
    assert "patches/s" in out.stdout
    with h5py.File(tmp_path / "cmu.h5") as f:
        features, coords, attrs = f["features"][()], f["coords"][()], dict(f.attrs)
    assert features.dtype == np.float32 and features.shape[1] == 512 and coords.shape == (len(features), 2)
    assert np.isfinite(features).all()
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0 and attrs["mpp"] == pytest.approx(0.499)
    assert attrs["encoder"] == "resnet18_encoder" and attrs["slide_sha256"] == sha256_file(cmu_svs)
    assert (coords % 256 == 0).all()
    record = EncoderRecord.from_json(attrs["encoder_record"])  # what training copies into a model
    assert (record.architecture, record.feature_dim, record.patch_size, record.mpp) == ("resnet18", 512, 256, 0.5)
    assert record.weights.sha256 == ModelRepository(repo).version("resnet18_encoder").encoder_record.weights.sha256
    with h5py.File(tmp_path / "cmu.h5") as f:  # where CLAM's and TRIDENT's readers look
        clam = dict(f["coords"].attrs)
        assert (clam["patch_size"], clam["patch_level"], clam["patch_size_level0"], clam["name"]) == (256, 0, 256, "cmu")
        assert list(clam["downsample"]) == [1.0, 1.0] and f["features"].attrs["encoder"] == "resnet18_encoder"
    again = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5")
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_predict_from_a_slide_equals_predict_from_its_features(slide_repo, cmu_svs, tmp_path):
    repo, cohort_dir, case = slide_repo
    genes = cohort_dir / "genes.csv"
    tiled = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5")
    assert tiled.returncode == 0, tiled.stderr
    from_slide = run_cli("predict", "--repo", repo, "--case-id", case, "--genes", genes, "--slide", cmu_svs)
    assert from_slide.returncode == 0, from_slide.stderr
    report = json.loads(from_slide.stdout)
    assert set(report["seconds"]) >= {"mask", "read", "encode", "fuse", "total"}
    assert report["encoder"] == "resnet18_encoder v1" and report["slides"][0]["reader"] == "cucim"
    from_h5 = run_cli("predict", "--repo", repo, "--case-id", case, "--genes", genes, "--features", tmp_path / "cmu.h5")
    assert from_h5.returncode == 0, from_h5.stderr
    h5_risk = json.loads(from_h5.stdout[: from_h5.stdout.rindex("}") + 1])["risk"]
    assert np.isfinite(report["risk"]) and report["risk"] == pytest.approx(h5_risk, rel=1e-6)


def test_a_slide_smaller_than_one_patch_is_refused_for_that_reason(slide_repo, tmp_path):
    """200 x 150 px of tissue at 0.5 µm/px cannot hold one 256 px patch at 0.5 µm/px (issue 22): the
    refusal says so, not that the tissue mask covers 0% of the slide."""
    import tifffile

    repo, cohort_dir, case = slide_repo
    rng = np.random.default_rng(1)
    tissue = np.clip(rng.normal((180, 90, 170), 20, (150, 200, 3)), 0, 255).astype(np.uint8)  # H&E-ish pink
    small = tmp_path / "small.tiff"
    tifffile.imwrite(small, tissue, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    encoder = PatchEncoder.from_repository(repo, "resnet18_encoder")
    with pytest.raises(EmptySlideError, match=r"smaller than one patch: 200 x 150 px at 0\.5 µm/px, and a 256 px patch at 0\.5 µm/px is 256 px a side") as caught:
        featurize_slide(small, encoder)
    assert "tissue mask covers" not in str(caught.value)


def test_no_tissue_is_an_empty_bag_not_a_nan(slide_repo, tmp_path):
    import tifffile

    repo, cohort_dir, case = slide_repo
    rng = np.random.default_rng(0)
    glass = np.clip(236 + rng.normal(0, 2, (1024, 1536, 3)), 0, 255).astype(np.uint8)
    blank = tmp_path / "blank.tiff"
    tifffile.imwrite(blank, glass, tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    encoder = PatchEncoder.from_repository(repo, "resnet18_encoder")
    with pytest.raises(EmptySlideError, match="no tissue patches"):
        featurize_slide(blank, encoder)
    out = run_cli("tile", blank, "--repo", repo, "--out", tmp_path / "blank.h5")
    assert out.returncode == 2 and "empty bag" in out.stderr
    out = run_cli("predict", "--repo", repo, "--case-id", case, "--genes", cohort_dir / "genes.csv", "--slide", blank)
    assert out.returncode == 2 and "no tissue patches" in out.stderr and "nan" not in out.stdout.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.tiff"]


@pytest.mark.parametrize("kind", ["missing", "text", "truncated"])
def test_bad_slides_give_a_clear_error_and_no_h5(slide_repo, cmu_svs, tmp_path, kind):
    repo, _, _ = slide_repo
    slide = tmp_path / f"{kind}.svs"
    if kind == "text":
        slide.write_text("not a slide\n")
    elif kind == "truncated":
        slide.write_bytes(cmu_svs.read_bytes()[:900_000])
    out = run_cli("tile", slide, "--repo", repo, "--out", tmp_path / "out")
    assert out.returncode == 2
    assert f"{kind}.svs" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_several_slides_go_on_after_a_failure(slide_repo, cmu_svs, tmp_path):
    repo, _, _ = slide_repo
    (tmp_path / "bad.svs").write_text("nope")
    out = run_cli("tile", tmp_path / "bad.svs", cmu_svs, "--repo", repo, "--out", tmp_path / "features")
    assert out.returncode == 2
    assert "bad.svs: error" in out.stdout and "1 of 2 slides failed" in out.stdout
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["cmu_small_region.h5"]
