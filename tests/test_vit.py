"""The foundation-model ViTs against their reference implementations: UNI, UNI2-h, Virchow2, H-optimus-0
and Prov-GigaPath against timm's own models, CONCH v1.5 against TRIDENT's CONCHVisionTower, Phikon-v2
against transformers' Dinov2Model, Phikon against transformers' ViTModel.

tests/golden/vit.json was written by tests/golden/make_vit.py with timm 1.0.31 and transformers 5.25.0
(in a venv of its own): each model as its authors create it, its full-size key names and shapes as
published, and the features of a 2-block copy at weights seeded from the published key names. Here
histosurv's plain-torch ViT is built the same way, loads the same seeded weights strictly through its
family's loader, and must give the same features; at full size (on the meta device) what it would
store (``weights_of``) must be exactly the published layout, so the authors' files load as they are.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from histosurv.data.encoder_record import IMAGENET_MEAN, IMAGENET_STD
from histosurv.errors import InputError
from histosurv.export.encoder_export import _check_onnx_runs, export_encoder_onnx
from histosurv.export.models.encoders import ENCODERS, LAYOUTS, VITS, build_vit
from histosurv.export.models.vit_layouts import TIMM
from histosurv.export.models.resnet import read_weights_file
from .golden import load_golden, seeded_state_dict, shapes_of

GOLDEN = load_golden("vit")
NAMES = sorted(VITS)
# per layout: a key every file has (the last norm's gain) and the position embedding, as the authors name them
NORM_KEY = {"conch_v1_5": "ln_contrast.weight", "phikon_v2": "layernorm.weight", "phikon": "layernorm.weight"}
POS_KEY = {"conch_v1_5": "trunk.pos_embed", "phikon_v2": "embeddings.position_embeddings",
           "phikon": "embeddings.position_embeddings"}


@pytest.fixture(scope="module", params=NAMES)
def small(request):
    """(name, 2-block encoder with the golden seeded weights, its state_dict)."""
    model = build_vit(request.param, depth=GOLDEN["depth"])
    weights = seeded_state_dict(shapes_of(ENCODERS[request.param].weights_of(model)), GOLDEN["seed"])
    ENCODERS[request.param].load_weights(model, weights, "seeded")
    return request.param, model, weights


def _what(name: str) -> str:
    return re.escape(f"not {name} weights ({LAYOUTS.get(name, TIMM).description}): ")


def test_every_golden_encoder_is_registered():
    assert set(GOLDEN["models"]) == set(VITS)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_layout_is_the_published_one(name):
    with torch.device("meta"):
        model = build_vit(name)
    ours = {k: list(v.shape) for k, v in ENCODERS[name].weights_of(model).items()}
    layout = LAYOUTS.get(name, TIMM)
    # keys the published file also carries that the feature never uses (Phikon's pooler): accepted, not stored
    unused = {k: list(v.shape) for k, v in (layout.unused(model) if layout.unused else {}).items()}
    assert sorted(unused) == GOLDEN["models"][name].get("unused", [])
    assert {**ours, **unused} == GOLDEN["models"][name]["layout"]


def test_features_match_the_reference_at_seeded_weights(small):
    name, model, _ = small
    golden = GOLDEN["models"][name]
    size = golden["image_size"]
    assert size == model.trunk.cfg.img_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(GOLDEN["seed"]))
    with torch.no_grad():
        got = model.features(images)
    want = torch.tensor(golden["features"])
    assert got.shape == want.shape == (2, ENCODERS[name].feature_dim)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), float((got - want).abs().max())


def test_published_files_load_as_they_are_and_wrong_ones_are_refused_by_name(small, tmp_path):
    from safetensors.torch import save_file

    name, model, weights = small
    family = ENCODERS[name]
    stored = family.weights_of(model)  # what a version's reference file holds: the published layout, bit for bit
    assert stored.keys() == weights.keys() and all(torch.equal(stored[k], weights[k]) for k in weights)
    save_file(stored, str(tmp_path / "w.safetensors"))
    other = build_vit(name, depth=GOLDEN["depth"])
    family.load_weights(other, read_weights_file(tmp_path / "w.safetensors"), "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}
    family.load_weights(other, wrapped, "wrapped.pth")
    norm, pos = NORM_KEY.get(name, "norm.weight"), POS_KEY.get(name, "pos_embed")
    missing = {k: v for k, v in weights.items() if k != norm}
    with pytest.raises(InputError, match=f"missing.pth: {_what(name)}missing 1 keys \\({re.escape(norm)}\\)"):
        family.load_weights(other, missing, "missing.pth")
    extra = {**weights, "head.weight": torch.zeros(2, 2)}
    with pytest.raises(InputError, match=f"extra.pth: {_what(name)}unexpected 1 keys \\(head.weight\\)"):
        family.load_weights(other, extra, "extra.pth")
    shaped = {**weights, pos: weights[pos][:, :-1]}
    with pytest.raises(InputError, match=f"shaped.pth: {_what(name)}wrong shapes \\({re.escape(pos)}: "):
        family.load_weights(other, shaped, "shaped.pth")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "w.safetensors").read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated.safetensors: not a readable weights file"):
        read_weights_file(truncated)


@pytest.mark.parametrize("name, given, problem", [
    ("gigapath", "uni", "wrong shapes"),  # the same key names, other widths
    ("conch_v1_5", "uni", "missing 44 keys (attn_pool_contrast.ln_k.bias"),  # a timm trunk without TRIDENT's prefix and pooler
    ("phikon_v2", "uni", "missing 43 keys (embeddings.cls_token"),  # timm names for transformers'
    ("uni", "phikon_v2", "missing 34 keys (blocks.0.attn.proj.bias"),
    ("conch_v1_5", "phikon_v2", "missing 44 keys (attn_pool_contrast.ln_k.bias"),
    ("phikon", "uni", "missing 38 keys (embeddings.cls_token"),
    ("uni", "phikon", "missing 34 keys (blocks.0.attn.proj.bias"),
    # DINOv2's names beside ViTModel's: the renamed blocks and the mask token are named, not only the widths
    ("phikon", "phikon_v2", "missing 16 keys (encoder.layer.0.intermediate.dense.bias"),
    ("phikon_v2", "phikon", "missing 21 keys (embeddings.mask_token"),
])
def test_another_encoders_weights_are_refused(name, given, problem):
    source = ENCODERS[given].weights_of(build_vit(given, depth=2))
    with pytest.raises(InputError, match=f"{name}.bin: {_what(name)}{re.escape(problem)}"):
        ENCODERS[name].load_weights(build_vit(name, depth=2), source, f"{name}.bin")


@pytest.mark.parametrize("name", ["uni", "gigapath", "conch_v1_5"])
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


@pytest.mark.parametrize("name", ["phikon_v2", "phikon"])
def test_phikons_take_their_224_px_tiles_as_cut(name):
    """Owkin's tiles are 224 px at 20x, fed as cut (TRIDENT's Resize(224) + CenterCrop(224) is then the
    identity): the graph only scales to [0, 1] and normalises with ImageNet's mean and std."""
    model = build_vit(name, depth=1)
    patch = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert (ENCODERS[name].preprocessing.mean, ENCODERS[name].preprocessing.std) == (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(ENCODERS[name].preprocessing.mean), torch.tensor(ENCODERS[name].preprocessing.std)
    want = ((patch.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    assert torch.allclose(model.preprocess(patch), want, atol=1e-6)
    assert ENCODERS[name].record(224, 0.5, None).input_size == 224


def test_phikon_files_load_with_or_without_the_unused_pooler():
    """ViTModel saves its pooler by default and owkin/phikon's files carry it (346 MB: 200 keys, the
    198 of the trunk and pooler.dense.*); the model card loads with add_pooling_layer=False, which saves
    198. Both load to the same network; half a pooler, or one of another width, is refused by name."""
    family = ENCODERS["phikon"]
    with torch.device("meta"):
        full = build_vit("phikon")
    assert (len(family.weights_of(full)), len(full.trunk.state_dict())) == (198, 150)
    assert len(GOLDEN["models"]["phikon"]["layout"]) == 200
    model = build_vit("phikon", depth=GOLDEN["depth"])
    trunk = seeded_state_dict(shapes_of(family.weights_of(model)), GOLDEN["seed"])
    pooler = {"pooler.dense.weight": torch.randn(768, 768), "pooler.dense.bias": torch.randn(768)}
    family.load_weights(model, {**trunk, **pooler}, "model.safetensors")
    other = build_vit("phikon", depth=GOLDEN["depth"])
    family.load_weights(other, trunk, "no_pooler.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    stored = family.weights_of(model)
    assert stored.keys() == trunk.keys() and all(torch.equal(stored[k], trunk[k]) for k in trunk)
    half = {**trunk, "pooler.dense.weight": pooler["pooler.dense.weight"]}
    with pytest.raises(InputError, match=f"half.bin: {_what('phikon')}missing 1 keys \\(pooler.dense.bias\\)"):
        family.load_weights(other, half, "half.bin")
    wide = {**trunk, **pooler, "pooler.dense.bias": torch.zeros(1024)}
    with pytest.raises(InputError, match=f"wide.bin: {_what('phikon')}wrong shapes \\(pooler.dense.bias: \\(1024,\\) for \\(768,\\)"):
        family.load_weights(other, wide, "wide.bin")


def test_conch_position_embedding_is_resampled_once_when_weights_arrive():
    """TRIDENT interpolates the 14 x 14 embedding to 28 x 28 on every forward; here it is a buffer,
    derived when weights are loaded (by any path), never stored, so the published file keeps 14 x 14."""
    model = build_vit("conch_v1_5", depth=1)
    assert "trunk.input_pos_embed" not in model.state_dict() and model.trunk.input_pos_embed.shape == (1, 785, 1024)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["trunk.pos_embed"] = torch.randn(1, 197, 1024, generator=torch.Generator().manual_seed(1))
    model.load_state_dict(weights)
    grid = weights["trunk.pos_embed"][:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=28.1 / 14, mode="bicubic")
    assert torch.equal(model.trunk.input_pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 784, 1024))
    assert torch.equal(model.trunk.input_pos_embed[:, :1], weights["trunk.pos_embed"][:, :1])
    at_28 = torch.nn.functional.interpolate(grid, size=(28, 28), mode="bicubic")  # what a size= resize gives instead
    assert not torch.allclose(want, at_28, atol=1e-3)


def test_a_vit_exports_to_onnx_with_its_preprocessing_and_matches_pytorch(small, tmp_path):
    name, model, _ = small
    if name not in ("uni", "virchow2", "conch_v1_5", "phikon_v2", "phikon"):
        pytest.skip("resize families, native-size families, the pooled and the transformers-layout ones keep the suite short")
    path = tmp_path / "model.onnx"
    # the weights beside the graph, as the ViT-H and ViT-g encoders (over 2 GB) need; runs it at batch 1 and 3
    entry = export_encoder_onnx(model, path, ENCODERS[name].patch_size, external_above=1 << 20)
    assert entry.details["ops"].get("ai.onnx::Resize", 0) == (1 if ENCODERS[name].preprocessing.resize else 0)
    assert entry.details["external_data"] == "model.onnx.data" and (tmp_path / "model.onnx.data").stat().st_size > 1 << 20
    # every attention fused: one per block, and CONCH's pooler; the only Resize is the patch's (the position
    # embedding is a constant)
    assert entry.details["ops"]["com.microsoft::MultiHeadAttention"] == model.attention_ops == GOLDEN["depth"] + (name == "conch_v1_5")
    assert path.stat().st_size < 1 << 20
    other = build_vit(name, depth=GOLDEN["depth"])  # other weights: the check must notice
    with pytest.raises(Exception, match="differ from PyTorch's"):
        _check_onnx_runs(other, path, ENCODERS[name].patch_size)


def test_full_size_uni_exports_fused_verifies_and_tiles_the_real_slide(cmu_svs, tmp_path):
    """The one full-size export of the suite (303 M parameters): every attention fused, ONNX Runtime
    against PyTorch, then `tile` on the real SVS through the exported graph. The FP16 and opset-23 graphs
    derived from it are checked on a 2-block UNI below: at full size they would double this test's time
    and test nothing that depends on the depth."""
    import h5py

    from histosurv.data.encoder_record import EncoderRecord
    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.verify import verify_version

    from .conftest import run_cli

    repo = tmp_path / "repo"
    mv = export_encoder(repo, "uni", artifacts=())
    entry = mv.info.engines["onnxruntime"]
    assert entry.details["ops"]["com.microsoft::MultiHeadAttention"] == 24
    assert entry.details["external_data"] == "model.onnx.data" and "model.onnx.data" in mv.info.files  # 1.2 GB: beside the graph, checksummed
    (report,) = verify_version(repo, "uni_encoder", sizes=(1, 4))
    assert report.engine == "onnxruntime" and report.passed and report.max_features_rel <= 1e-4
    out = run_cli("tile", cmu_svs, "--repo", repo, "--out", tmp_path / "cmu.h5", "--batch-size", "16")
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "cmu.h5") as f:
        features, attrs = f["features"][()], dict(f.attrs)
    record = EncoderRecord.from_json(attrs["encoder_record"])
    assert features.shape == (34, 1024) and np.isfinite(features).all()  # the demo's 34 tissue patches
    assert (record.architecture, record.feature, record.patch_size, record.input_size) == ("uni", "cls", 256, 224)
    assert record.preprocessing.resize_filter == "bilinear-antialias"


def test_a_vits_fp16_and_opset23_graphs_verify_against_pytorch(tmp_path, monkeypatch):
    """A 2-block UNI exported with every default encoder artifact: FP16 (for GPU providers) and the
    standard opset-23 Attention graph, each verified against PyTorch as `histosurv verify` does."""
    import dataclasses
    import functools

    from histosurv.export.encoder_export import export_encoder
    from histosurv.export.verify import verify_version

    monkeypatch.setitem(ENCODERS, "uni", dataclasses.replace(ENCODERS["uni"], build=functools.partial(build_vit, "uni", depth=2)))
    mv = export_encoder(tmp_path / "repo", "uni")
    assert mv.info.engines["onnx_opset23"].details["ops"]["ai.onnx::Attention"] == 2
    assert mv.info.engines["onnxruntime_fp16"].details["ops"]["com.microsoft::MultiHeadAttention"] == 2
    reports = {r.engine: r for r in verify_version(tmp_path / "repo", "uni_encoder", sizes=(1, 4))}
    assert set(reports) == {"onnxruntime", "onnxruntime_fp16", "onnx_opset23"} and all(r.passed for r in reports.values())
    assert reports["onnxruntime"].max_features_rel <= 1e-4 and reports["onnx_opset23"].max_features_rel <= 1e-4
    assert reports["onnxruntime_fp16"].min_features_cosine >= 0.999


def test_export_refuses_another_architectures_file_by_name_and_leaves_the_repository_as_it_was(tmp_path):
    """`histosurv export --encoder uni --weights` given CTransPath's checkpoint: exit 2 naming the file
    and the keys, and not one file of the repository added or changed."""
    from safetensors.torch import save_file

    from histosurv.export.models.swin import build_ctranspath

    from .conftest import run_cli

    weights = tmp_path / "ctranspath.safetensors"
    save_file(build_ctranspath(depths=(1, 1, 1, 1)).trunk.state_dict(), str(weights))
    repo = tmp_path / "repo"
    (repo / "uni_encoder").mkdir(parents=True)
    (repo / "uni_encoder" / "notes.txt").write_text("a lab's own file\n")
    before = sorted((p.relative_to(repo), p.read_bytes()) for p in repo.rglob("*") if p.is_file())
    out = run_cli("export", "--encoder", "uni", "--weights", weights, "--repo", repo)
    assert out.returncode == 2, out.stderr
    assert "ctranspath.safetensors: not uni weights (timm layout): missing 340 keys (blocks.0.attn.proj.bias" in out.stderr
    assert "unexpected 81 keys (layers.0.blocks.0.attn.proj.bias" in out.stderr
    assert sorted((p.relative_to(repo), p.read_bytes()) for p in repo.rglob("*") if p.is_file()) == before
