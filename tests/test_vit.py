"""The foundation-model ViTs (UNI, UNI2-h, Virchow2, H-optimus-0, Prov-GigaPath) against timm's own models.

tests/golden/vit.json was written by tests/golden/make_vit.py with timm 1.0.31 (in a venv of its own):
each model as its authors create it, its full-size key names and shapes, and the features of a 2-block
copy at weights seeded from the key names. Here histosurv's plain-torch ViT is built the same way,
loads the same seeded weights strictly, and must give the same features; at full size (on the meta
device) it must have exactly the published layout, so the authors' files load as they are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from histosurv.errors import InputError
from histosurv.export.encoder_export import _check_onnx_runs, export_encoder_onnx
from histosurv.export.models.encoders import ENCODERS, VITS, build_vit
from histosurv.export.models.resnet import read_weights_file
from .golden import load_golden, seeded_state_dict, shapes_of

GOLDEN = load_golden("vit")
NAMES = sorted(VITS)


@pytest.fixture(scope="module", params=NAMES)
def small(request):
    """(name, 2-block encoder with the golden seeded weights, its state_dict)."""
    model = build_vit(request.param, depth=GOLDEN["depth"])
    weights = seeded_state_dict(shapes_of(model.trunk.state_dict()), GOLDEN["seed"])
    ENCODERS[request.param].load_weights(model, weights, "seeded")
    return request.param, model, weights


def test_every_golden_encoder_is_registered():
    assert set(GOLDEN["models"]) == set(VITS)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_layout_is_the_published_one(name):
    with torch.device("meta"):
        model = build_vit(name)
    ours = {k: list(v.shape) for k, v in model.trunk.state_dict().items()}
    assert ours == GOLDEN["models"][name]["layout"]


def test_features_match_timm_at_seeded_weights(small):
    name, model, _ = small
    golden = GOLDEN["models"][name]
    size = golden["image_size"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(GOLDEN["seed"]))
    with torch.no_grad():
        got = model.trunk(images)
    want = torch.tensor(golden["features"])
    assert got.shape == want.shape == (2, ENCODERS[name].feature_dim)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), float((got - want).abs().max())


def test_published_files_load_as_they_are_and_wrong_ones_are_refused_by_name(small, tmp_path):
    from safetensors.torch import save_file

    name, model, weights = small
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}
    other = build_vit(name, depth=GOLDEN["depth"])
    ENCODERS[name].load_weights(other, wrapped, "wrapped.pth")
    assert all(torch.equal(a, b) for a, b in zip(other.trunk.state_dict().values(), model.trunk.state_dict().values()))
    missing = {k: v for k, v in weights.items() if k != "norm.weight"}
    with pytest.raises(InputError, match=f"missing.pth: not {name} weights \\(timm layout\\): missing 1 keys \\(norm.weight\\)"):
        ENCODERS[name].load_weights(other, missing, "missing.pth")
    shaped = {**weights, "pos_embed": weights["pos_embed"][:, :-1]}
    with pytest.raises(InputError, match="wrong shapes \\(pos_embed: "):
        ENCODERS[name].load_weights(other, shaped, "shaped.pth")
    save_file(weights, str(tmp_path / "w.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "w.safetensors").read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated.safetensors: not a readable weights file"):
        read_weights_file(truncated)


def test_another_encoders_weights_are_refused():
    uni = build_vit("uni", depth=2)
    gigapath = build_vit("gigapath", depth=2)
    with pytest.raises(InputError, match="gigapath.bin: not gigapath weights \\(timm layout\\): wrong shapes"):
        ENCODERS["gigapath"].load_weights(gigapath, uni.trunk.state_dict(), "gigapath.bin")


@pytest.mark.parametrize("name", ["uni", "gigapath"])
def test_resize_and_crop_in_the_graph_are_what_pil_does(name):
    """The authors' torchvision transforms resize with PIL (antialiased); the graph must see the same pixels."""
    family = ENCODERS[name]
    prep = family.preprocessing
    g = np.random.default_rng(0)
    low = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth content, as tissue is at this scale
    patch = np.array(Image.fromarray(low).resize((family.patch_size,) * 2, Image.BILINEAR))
    filt = {"bilinear-antialias": Image.BILINEAR, "bicubic-antialias": Image.BICUBIC}[prep.resize_filter]
    pil = Image.fromarray(patch).resize((prep.resize, prep.resize), filt)
    top = (prep.resize - prep.crop) // 2
    want = np.asarray(pil)[top:top + prep.crop, top:top + prep.crop].astype(np.float32) / 255
    model = build_vit(name, depth=1)
    with torch.no_grad():
        got = model.preprocess(torch.from_numpy(patch)[None])[0] * model.preprocess.std[0] + model.preprocess.mean[0]
    got = got.permute(1, 2, 0).numpy()
    assert got.shape == want.shape == (prep.crop, prep.crop, 3)
    assert np.abs(got - want).max() <= 1.5 / 255  # PIL rounds to whole levels


def test_a_vit_exports_to_onnx_with_its_preprocessing_and_matches_pytorch(small, tmp_path):
    name, model, _ = small
    if name not in ("uni", "virchow2"):
        pytest.skip("one resize family and one native-size family keep the suite short")
    path = tmp_path / "model.onnx"
    # the weights beside the graph, as the ViT-H and ViT-g encoders (over 2 GB) need; runs it at batch 1 and 3
    entry = export_encoder_onnx(model, path, ENCODERS[name].patch_size, external_above=1 << 20)
    assert entry.details["ops"].get("ai.onnx::Resize", 0) == (1 if ENCODERS[name].preprocessing.resize else 0)
    assert entry.details["external_data"] == "model.onnx.data" and (tmp_path / "model.onnx.data").stat().st_size > 1 << 20
    assert entry.details["ops"]["com.microsoft::MultiHeadAttention"] == GOLDEN["depth"]  # every attention fused
    assert path.stat().st_size < 1 << 20
    other = build_vit(name, depth=GOLDEN["depth"])  # other weights: the check must notice
    with pytest.raises(Exception, match="differ from PyTorch's"):
        _check_onnx_runs(other, path, ENCODERS[name].patch_size)


def test_full_size_uni_exports_fused_verifies_and_tiles_the_real_slide(cmu_svs, tmp_path):
    """The one full-size export of the suite (303 M parameters, about two minutes): every attention
    fused, ONNX Runtime against PyTorch, then `tile` on the real SVS through the exported graph."""
    import h5py

    from histosurv.data.encoder_record import EncoderRecord
    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.verify import verify_version

    from .conftest import run_cli

    repo = tmp_path / "repo"
    mv = export_encoder(repo, "uni")
    entry = mv.info.engines["onnxruntime"]
    assert entry.details["ops"]["com.microsoft::MultiHeadAttention"] == 24
    assert entry.details["external_data"] == "model.onnx.data" and "model.onnx.data" in mv.info.files  # 1.2 GB: beside the graph, checksummed
    (report,) = verify_version(repo, "uni_encoder", sizes=(1, 4))
    assert report.passed and max(row["features_rel"] for row in report.rows) <= 1e-4
    out = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5", "--batch-size", "16")
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "cmu.h5") as f:
        features, attrs = f["features"][()], dict(f.attrs)
    record = EncoderRecord.from_json(attrs["encoder_record"])
    assert features.shape == (34, 1024) and np.isfinite(features).all()  # the demo's 34 tissue patches
    assert (record.architecture, record.feature, record.patch_size, record.input_size) == ("uni", "cls", 256, 224)
    assert record.preprocessing.resize_filter == "bilinear-antialias"
