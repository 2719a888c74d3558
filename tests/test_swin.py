"""CTransPath (Swin-T with a conv stem) against the Swin code its authors run, timm_ctp (timm 0.5.4).

tests/golden/swin.json was written by tests/golden/make_swin.py (in a venv with timm_ctp and timm 1.0.31):
the full-size key layout of the published ``ctranspath.pth`` (derived buffers included, with digests of
their values), the features of a copy with 2 blocks per stage at weights seeded from the key names, and
timm 1.0.31's layout of the same network with its features at the same weights (converted by timm's own
checkpoint filter). histosurv's plain-torch Swin must hold the layout, load either file strictly and give
the same features; its ONNX graph must keep every window attention fused and match PyTorch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from histosurv.data.encoder_record import WeightsIdentity
from histosurv.errors import InputError
from histosurv.export.encoder_export import export_encoder_onnx
from histosurv.export.models.encoders import ENCODERS
from histosurv.export.models.swin import build_ctranspath, load_ctranspath_state_dict
from .golden import load_golden
from .golden.make_swin import DERIVED, digest, seeded_images, seeded_swin_state_dict

GOLDEN = load_golden("swin")
DEPTHS = tuple(GOLDEN["depths"])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def full():
    return build_ctranspath()


def blank(model):
    """A copy with every learned tensor and BatchNorm statistic zeroed (cheaper than building one)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for k, t in other.trunk.state_dict().items():
            if not k.endswith(DERIVED):
                t.zero_()
    return other


@pytest.fixture(scope="module")
def small():
    """(the 2-blocks-per-stage encoder with the golden seeded weights, those weights as published)."""
    model = build_ctranspath(DEPTHS)
    weights = seeded_swin_state_dict({k: list(v.shape) for k, v in model.trunk.state_dict().items()}, GOLDEN["seed"])
    published = {"model": {**weights, **{k: v for k, v in model.trunk.state_dict().items() if k.endswith(DERIVED)}}}
    load_ctranspath_state_dict(model, published, "ctranspath.pth")
    return model, weights


def test_registered_as_an_encoder_family(full):
    family = ENCODERS["ctranspath"]
    assert (family.feature_dim, family.mpp, family.patch_size, family.feature) == (768, 1.0, 256, "pooled")
    assert family.record(256, 1.0, WeightsIdentity(None, "unknown")).input_size == 224
    assert family.build is build_ctranspath and family.load_weights is load_ctranspath_state_dict
    assert not full.training and full.attention_ops == 12 and full.feature_dim == 768


def test_full_size_layout_and_derived_buffers_are_the_published_ones(full):
    own = full.trunk.state_dict()
    assert {k: list(v.shape) for k, v in own.items()} == GOLDEN["layout"]
    assert {k: digest(v) for k, v in own.items() if k.endswith(DERIVED)} == GOLDEN["derived"]
    assert own["layers.0.blocks.1.attn_mask"].dtype == torch.float32
    assert own["layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64


def test_features_match_timm_ctp_at_seeded_weights(small):
    model, _ = small
    with torch.no_grad():
        got = model.trunk(seeded_images(2, GOLDEN["seed"]))
    want = torch.tensor(GOLDEN["features"])
    assert got.shape == want.shape == (2, 768)
    assert relative_error(got, want) <= 1e-4, relative_error(got, want)
    # timm 1.0.31's Swin at the same weights gives the same features (the layouts map onto each other)
    assert relative_error(torch.tensor(GOLDEN["timm_features"]), want) <= 1e-5


def test_files_with_or_without_derived_buffers_and_in_timm_09_layout_load(small):
    model, weights = small
    want = model.trunk.state_dict()
    trident = blank(model)  # TRIDENT drops attn_mask before loading; relative_position_index kept
    load_ctranspath_state_dict(trident, {k: v for k, v in want.items() if not k.endswith("attn_mask")}, "chief.pth")
    assert all(torch.equal(v, trident.trunk.state_dict()[k]) for k, v in want.items())
    # timm >= 0.9: downsample at the start of the next stage, no buffers (the full-size key sets map exactly)
    new = blank(model)

    def to_new(key: str) -> str:
        if key.startswith("layers.") and ".downsample." in key:
            stage = int(key.split(".")[1])
            return f"layers.{stage + 1}.{key.split('.', 2)[2]}"
        return key

    learned = {k: list(s) for k, s in GOLDEN["layout"].items() if not k.endswith(DERIVED)}
    assert {to_new(k): s for k, s in learned.items()} == GOLDEN["timm_layout"]
    load_ctranspath_state_dict(new, {"state_dict": {to_new(k): v for k, v in weights.items()}}, "timm.safetensors")
    assert all(torch.equal(v, new.trunk.state_dict()[k]) for k, v in want.items())


def test_wrong_files_are_refused_by_name(small):
    model, weights = small
    other = blank(model)
    missing = {k: v for k, v in weights.items() if k != "layers.1.downsample.reduction.weight"}
    with pytest.raises(InputError, match="x.pth: not ctranspath weights \\(timm Swin layout\\): missing 1 keys "
                                         "\\(layers.1.downsample.reduction.weight\\)"):
        load_ctranspath_state_dict(other, missing, "x.pth")
    with pytest.raises(InputError, match="unexpected 1 keys \\(head.weight\\)"):
        load_ctranspath_state_dict(other, {**weights, "head.weight": torch.zeros(1000, 768)}, "x.pth")
    index = "layers.0.blocks.0.attn.relative_position_index"
    with pytest.raises(InputError, match=f"{index} differs from a 224 px, window 7 Swin's"):
        load_ctranspath_state_dict(other, {**weights, index: torch.zeros(49, 49, dtype=torch.long)}, "x.pth")
    mask = "layers.0.blocks.1.attn_mask"
    with pytest.raises(InputError, match=f"{mask} differs"):
        load_ctranspath_state_dict(other, {**weights, mask: torch.zeros(16, 49, 49)}, "x.pth")


def test_resize_in_the_graph_is_what_pil_does(full):
    """TRIDENT's transform: Resize(224, bilinear, antialias) on the 256 px patch, ToTensor, Normalize."""
    g = np.random.default_rng(0)
    low = g.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    patch = np.array(Image.fromarray(low).resize((256, 256), Image.BILINEAR))
    want = np.asarray(Image.fromarray(patch).resize((224, 224), Image.BILINEAR)).astype(np.float32) / 255
    model = full
    with torch.no_grad():
        got = model.preprocess(torch.from_numpy(patch)[None])[0] * model.preprocess.std[0] + model.preprocess.mean[0]
    got = got.permute(1, 2, 0).numpy()
    assert got.shape == want.shape == (224, 224, 3)
    assert np.abs(got - want).max() <= 1.5 / 255


def test_onnx_graph_fuses_every_window_attention_and_matches_pytorch(tmp_path):
    """Each SDPA with its relative position bias (+ shift mask) as attn_mask becomes a
    com.microsoft.MultiHeadAttention with that bias as attention_bias; ONNX Runtime matches PyTorch."""
    import onnx
    import onnxruntime as ort

    # fewer blocks than the golden copy (the export's fixed cost dominates): stage 0 still has a shifted
    # window, stages 1-3 unshifted ones
    model = build_ctranspath((2, 1, 1, 1))
    weights = seeded_swin_state_dict({k: list(v.shape) for k, v in model.trunk.state_dict().items()}, 1)
    load_ctranspath_state_dict(model, weights, "seeded")
    path = tmp_path / "model.onnx"
    entry = export_encoder_onnx(model, path, 256)  # checks batch 1 and 3 against PyTorch (1e-3)
    assert entry.details["ops"]["com.microsoft::MultiHeadAttention"] == model.attention_ops == 5
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MultiHeadAttention":
            assert len(node.input) == 6 and node.input[5]  # attention_bias wired in
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    patches = torch.randint(0, 256, (2, 256, 256, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    (got,) = session.run(["features"], {"patches": patches.numpy()})
    with torch.no_grad():
        want = model(patches)
    assert relative_error(torch.from_numpy(got), want) <= 1e-4, relative_error(torch.from_numpy(got), want)
