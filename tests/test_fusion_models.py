"""PORPOISE (late fusion: AMIL + SNN + gated Kronecker product) and the early-fusion MIL model.

Golden values come from the reference PORPOISE code (tests/golden/make_porpoise.py); the early-fusion
model has no reference, so its tests check what early fusion means and that it exports.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models import build_model
from histosurv.export.models.checkpoints import load_reference_checkpoint
from histosurv.export.models.early_fusion import EarlyFusionMIL
from histosurv.export.models.fusion import BilinearFusion
from histosurv.export.models.porpoise import PorpoiseMMF
from histosurv.export.models.survival_head import risk_from_logits
from histosurv.export.onnx_export import export_onnx

from .golden import TOLERANCE, load_golden, seeded_bag, seeded_state_dict

GOLDEN = load_golden("porpoise")
SMALL = dict(n_genes=12, feature_dim=32)  # small but real: every layer of the reference is there


def _golden_model(case: dict) -> PorpoiseMMF:
    state = seeded_state_dict(case["shapes"], GOLDEN["seed"])
    cfg = PorpoiseMMF.config_from_reference(state)
    ctor = case["constructor"]  # the gates are not visible in shapes
    cfg.update(gate_path=bool(ctor.get("gate_path", 1)), gate_omic=bool(ctor.get("gate_omic", 1)))
    model = build_model("porpoise", cfg).eval()
    load_reference_checkpoint(model, state)
    return model


def _bag(n: int, cfg, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    return torch.randn(batch, n, cfg.feature_dim, generator=g).abs(), torch.randn(batch, cfg.n_genes, generator=g)


def _porpoise(seed: int = 0, **overrides) -> PorpoiseMMF:
    torch.manual_seed(seed)
    return build_model("porpoise", {**SMALL, **overrides}).eval()


# --- golden: the reference's own forward ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_matches_reference_porpoise(name):
    case = GOLDEN["cases"][name]
    model = _golden_model(case)
    for n, ref in case["bags"].items():
        features, genes = seeded_bag(int(n), 1024, GOLDEN["n_genes"], GOLDEN["seed"])
        with torch.no_grad():
            logits, attention = model(features[None], genes=genes[None], return_attention=True)
        assert (logits[0] - torch.tensor(ref["logits"])).abs().max() <= TOLERANCE, (name, n)
        assert abs(risk_from_logits(logits, "discrete").item() - ref["risk"]) <= TOLERANCE, (name, n)
        if "attention" in ref:
            assert (attention[0] - torch.tensor(ref["attention"])).abs().max() <= TOLERANCE, (name, n)


def test_bilinear_fusion_matches_reference_model_utils_variant():
    # model_utils.BilinearFusion: use_bilinear gates, skip, Dropout after the encoders
    case = GOLDEN["fusion_only"]
    fusion = BilinearFusion(**case["constructor"], encoder_dropout=True).eval()
    fusion.load_state_dict(seeded_state_dict(case["shapes"], GOLDEN["seed"]))
    vec1 = torch.tensor(case["vec1"]).view(3, -1)
    vec2 = torch.tensor(case["vec2"]).view(3, -1)
    with torch.no_grad():
        out = fusion(vec1, vec2)
    assert (out.flatten() - torch.tensor(case["output"])).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_config_from_reference_recovers_the_shapes(name):
    case = GOLDEN["cases"][name]
    cfg = PorpoiseMMF.config_from_reference(seeded_state_dict(case["shapes"]))
    ctor = case["constructor"]
    assert (cfg["n_genes"], cfg["feature_dim"], cfg["n_bins"]) == (GOLDEN["n_genes"], 1024, 4)
    assert cfg["fusion"] == ctor["fusion"]
    assert cfg["dropinput"] == ctor["dropinput"]
    if ctor["fusion"] == "bilinear":
        assert cfg["scale_dim1"] == ctor.get("scale_dim1", 8)
        assert cfg["skip"] == ctor.get("skip", True)


def test_mismatched_checkpoint_is_refused_naming_the_tensor():
    case = GOLDEN["cases"]["bilinear"]
    state = seeded_state_dict(case["shapes"])
    model = build_model("porpoise", dict(n_genes=GOLDEN["n_genes"] + 1))
    with pytest.raises(InputError, match=r"fc_omic\.0\.0\.weight"):
        load_reference_checkpoint(model, state)
    model = build_model("porpoise", dict(n_genes=GOLDEN["n_genes"], fusion="concat"))
    with pytest.raises(InputError, match="unexpected"):
        load_reference_checkpoint(model, state)


# --- contract: determinism, batching ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [("porpoise", {}), ("porpoise", dict(fusion="concat")), ("porpoise", dict(modality_dropout=0.3)), ("early_fusion", {})],
)
def test_eval_is_deterministic_and_batch_independent(name, overrides):
    torch.manual_seed(0)
    model = build_model(name, {**SMALL, **overrides}).eval()
    features, genes = _bag(20, model.cfg, batch=3)
    genes[1] = float("nan")  # absent genes beside present ones: NaN must not leak into other rows
    with torch.no_grad():
        batched = model.risk(features, genes=genes)
        again = model.risk(features, genes=genes)
        alone = torch.cat([model.risk(features[i : i + 1], genes=genes[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, again, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-6, equal_nan=True)
    assert torch.isfinite(batched).all() == bool(model.optional_inputs)


def test_attention_is_the_mil_softmax_over_patches():
    model = _porpoise()
    features, genes = _bag(9, model.cfg)
    with torch.no_grad():
        _, attention = model(features, genes=genes, return_attention=True)
        scores = model.attention(model.patch_embedding(features))[..., 0]
    assert attention.shape == (1, 9)
    torch.testing.assert_close(attention, scores.softmax(dim=1))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fusion="lrb"), "fusion must be one of"),
        (dict(scale_dim1=0), "scale_dim1"),
        (dict(modality_dropout=1.0), "modality_dropout"),
        (dict(n_genes=0), "at least one gene"),
        (dict(survival_head="hazard"), "survival head"),
    ],
)
def test_bad_porpoise_configurations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model("porpoise", {**SMALL, **overrides})


# --- missing genes ----------------------------------------------------------------------------


def _zero_gene_logits(model: PorpoiseMMF, features: torch.Tensor) -> torch.Tensor:
    """The model's output with a zeroed gene embedding, composed from its parts by hand."""
    h_path, _ = model.encode_path(features)
    b = features.shape[0]
    keep = torch.zeros(b, 1, dtype=torch.bool)
    return model.classifier_mm(model.fuse(h_path, h_path.new_zeros(b, 256), keep))


@pytest.mark.parametrize("fusion", ["bilinear", "concat"])
def test_missing_genes_give_the_zero_gene_embedding_output(fusion):
    model = _porpoise(fusion=fusion, modality_dropout=0.25)
    assert model.optional_inputs == ("genes",)
    features, genes = _bag(15, model.cfg)
    with torch.no_grad():
        absent = model(features, genes=torch.full_like(genes, float("nan")))
        expected = _zero_gene_logits(model, features)
        present = model(features, genes=genes)
    assert torch.isfinite(absent).all()
    torch.testing.assert_close(absent, expected, rtol=0, atol=1e-6)
    assert (absent - present).abs().max() > 1e-4  # genes, when given, do matter


def test_missing_genes_keep_only_the_path_terms_of_the_kronecker_product():
    model = _porpoise(modality_dropout=0.25)
    seen = {}
    model.mm.encoder1.register_forward_hook(lambda m, i, o: seen.__setitem__("o12", i[0]))
    features, genes = _bag(15, model.cfg)
    with torch.no_grad():
        model(features, genes=torch.full_like(genes, float("nan")))
    o12 = seen["o12"].view(33, 33)  # rows: [o_path; 1], columns: [o_genes; 1]
    assert (o12[:, :32] == 0).all()
    assert o12[32, 32] == 1 and (o12[:32, 32] != 0).any()


def test_without_modality_dropout_genes_stay_required():
    model = _porpoise()
    assert model.optional_inputs == ()
    assert "genes" in model.input_names
    features, genes = _bag(15, model.cfg)
    with torch.no_grad():
        logits = model(features, genes=torch.full_like(genes, float("nan")))
    assert torch.isnan(logits).all()


def test_partly_missing_genes_are_not_treated_as_absent():
    model = _porpoise(modality_dropout=0.25)
    features, genes = _bag(15, model.cfg)
    genes[0, :3] = float("nan")
    with torch.no_grad():
        logits = model(features, genes=genes)
    assert torch.isnan(logits).all()


def test_training_modality_dropout_zeroes_about_the_configured_fraction():
    model = _porpoise(modality_dropout=0.3).train()
    genes = torch.randn(4000, model.cfg.n_genes)
    torch.manual_seed(1)
    with torch.no_grad():
        h_omic, keep = model.encode_genes(genes)
    zeroed = (h_omic == 0).all(dim=1)
    assert torch.equal(zeroed, ~keep[:, 0])
    assert abs(zeroed.float().mean().item() - 0.3) < 0.03  # 4000 draws: sd 0.007
    model.eval()
    with torch.no_grad():
        h_omic, keep = model.encode_genes(genes)
    assert keep.all() and not (h_omic == 0).all(dim=1).any()


def _ort_risk(path, features: torch.Tensor, genes: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"features": features.numpy(), "genes": genes.numpy().astype(np.float32)}
    return float(session.run(["risk"], feeds)[0][0])


def test_exported_graph_handles_missing_genes(tmp_path):
    model = _porpoise(modality_dropout=0.25)
    export_onnx(model, tmp_path / "porpoise.onnx")
    for n in (1, 23):
        features, genes = _bag(n, model.cfg)
        nan_genes = torch.full_like(genes, float("nan"))
        with torch.no_grad():
            eager_absent = model.risk(features, genes=nan_genes).item()
            eager_present = model.risk(features, genes=genes).item()
        got_absent = _ort_risk(tmp_path / "porpoise.onnx", features[0], nan_genes[0])
        got_present = _ort_risk(tmp_path / "porpoise.onnx", features[0], genes[0])
        assert math.isfinite(got_absent)
        assert got_absent == pytest.approx(eager_absent, rel=1e-4)
        assert got_present == pytest.approx(eager_present, rel=1e-4)


# --- early fusion -----------------------------------------------------------------------------


def _early(seed: int = 0) -> EarlyFusionMIL:
    torch.manual_seed(seed)
    return build_model("early_fusion", SMALL).eval()


def test_early_fusion_instances_are_patch_features_beside_the_genes():
    model = _early()
    features, genes = _bag(11, model.cfg, batch=2)
    z = model.genes(genes)
    explicit = torch.cat([features, z[:, None, :].expand(-1, 11, -1)], dim=-1)  # (B, N, D + G)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_instances(features, z), torch.relu(model.instance(explicit)))


def test_early_fusion_genes_change_the_risk_and_the_attention():
    model = _early()
    features, genes = _bag(30, model.cfg)
    with torch.no_grad():
        logits_a, att_a = model(features, genes=genes, return_attention=True)
        logits_b, att_b = model(features, genes=genes + 1.0, return_attention=True)
    assert (logits_a - logits_b).abs().max() > 1e-4
    assert (att_a - att_b).abs().max() > 1e-6  # genes enter before the attention, unlike late fusion
    assert model.optional_inputs == () and model.input_names == ("features", "genes")


def test_early_fusion_exports(tmp_path):
    model = _early()
    export_onnx(model, tmp_path / "early.onnx")
    for n in (1, 40):
        features, genes = _bag(n, model.cfg)
        with torch.no_grad():
            eager = model.risk(features, genes=genes).item()
        assert _ort_risk(tmp_path / "early.onnx", features[0], genes[0]) == pytest.approx(eager, rel=1e-4)
