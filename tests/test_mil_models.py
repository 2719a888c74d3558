"""MCAT, ABMIL and SNN against mahmoodlab/MCAT's model code (golden files from tests/golden/make_mcat.py)."""

from __future__ import annotations

import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models import build_model, risk_from_logits
from histosurv.export.models.checkpoints import load_reference_checkpoint
from histosurv.export.models.mcat import MCATConfig

from .golden import TOLERANCE, load_golden, seeded_bag, seeded_state_dict

UCEC = (3, 24, 21, 22, 64, 15)


def _golden_model(name: str):
    golden = load_golden(name)
    model = build_model(name, golden["histosurv_config"]).eval()
    report = load_reference_checkpoint(model, seeded_state_dict(golden["shapes"], golden["seed"]))
    assert report.defaulted == (["genes.mean", "genes.scale"] if model.genes is not None else [])
    return golden, model


def _inputs(name: str, key: str, cfg) -> dict:
    if name == "snn":
        _, genes = seeded_bag(1, 1, cfg.n_genes, int(key))
        return dict(genes=genes[None])
    features, genes = seeded_bag(int(key), 1024, cfg.n_genes or 1, 0)
    return dict(features=features[None], genes=genes[None] if name == "mcat" else None)


@pytest.mark.parametrize("name", ["mcat", "abmil", "snn"])
def test_matches_reference_code(name):
    golden, model = _golden_model(name)
    for key, case in golden["cases"].items():
        x = _inputs(name, key, model.cfg)
        with torch.no_grad():
            out = model(**x, return_attention=True)
        logits, attention = out if "features" in model.input_names else (out, None)
        assert (logits[0] - torch.tensor(case["logits"])).abs().max() <= TOLERANCE, key
        assert abs(float(risk_from_logits(logits, "discrete")) - case["risk"]) <= TOLERANCE, key
        if attention is not None:
            assert (attention[0] - torch.tensor(case["attention"])).abs().max() <= TOLERANCE, key


def _model(name: str, **overrides):
    torch.manual_seed(0)
    cfg = {"mcat": dict(omic_sizes=UCEC), "abmil": {}, "snn": dict(n_genes=80)}[name]
    return build_model(name, {**cfg, **overrides}).eval()


def _bags(model, b: int, n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = dict(features=torch.randn(b, n, model.cfg.feature_dim, generator=g).abs())
    x["genes"] = torch.randn(b, model.cfg.n_genes, generator=g)
    return {k: v for k, v in x.items() if k in model.input_names}


@pytest.mark.parametrize("name", ["mcat", "abmil", "snn"])
def test_deterministic_and_independent_of_batch(name):
    model = _model(name)
    x = _bags(model, 3, 40)
    with torch.no_grad():
        batched = model(**x)
        assert torch.equal(batched, model(**x))
        for i in range(3):
            alone = model(**{k: v[i : i + 1] for k, v in x.items()})
            assert (alone - batched[i : i + 1]).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["mcat", "abmil", "snn"])
def test_mis_shaped_checkpoint_is_refused_by_name(name):
    golden, model = _golden_model(name)
    state = seeded_state_dict(golden["shapes"])
    key = "classifier.weight"
    state[key] = torch.zeros(3, state[key].shape[1])
    with pytest.raises(InputError, match=r"classifier\.weight \(3, "):
        load_reference_checkpoint(model, state)


@pytest.mark.parametrize("name", ["mcat", "abmil", "snn"])
def test_config_from_reference(name):
    golden = load_golden(name)
    state = seeded_state_dict(golden["shapes"])
    model_cls = type(build_model(name, golden["histosurv_config"]))
    cfg = build_model(name, model_cls.config_from_reference(state)).cfg
    assert cfg == build_model(name, golden["histosurv_config"]).cfg
    load_reference_checkpoint(build_model(name, cfg), state)  # the recovered config takes the weights


def test_mcat_config_from_reference_reads_big_omic_and_other_sizes():
    ref = build_model("mcat", dict(omic_sizes=(5, 7), feature_dim=512, omic_hidden=(1024, 256), n_bins=6))
    assert ref.config_from_reference({f"module.{k}": v for k, v in ref.state_dict().items()}) == dict(
        omic_sizes=(5, 7), omic_hidden=(1024, 256), feature_dim=512, dim=256, depth=2, n_bins=6
    )


def test_mcat_sdpa_equals_naive_attention():
    sdpa = _model("mcat")
    naive = build_model("mcat", sdpa.cfg, attention_impl="naive").eval()
    naive.load_state_dict(sdpa.state_dict())
    x = _bags(sdpa, 2, 30)
    with torch.no_grad():
        assert (sdpa(**x) - naive(**x)).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="attention impl"):
        build_model("mcat", sdpa.cfg, attention_impl="flash")


def test_mcat_coattention_map_sums_to_one_per_bag():
    model = _model("mcat")
    x = _bags(model, 2, 33)
    with torch.no_grad():
        _, attention = model(**x, return_attention=True)
    assert attention.shape == (2, 33)
    assert torch.allclose(attention.sum(dim=1), torch.ones(2), atol=1e-6)
    assert (attention > 0).all() and not torch.allclose(attention[0], attention[1])


def test_mcat_refuses_genes_of_the_wrong_size():
    model = _model("mcat")
    x = _bags(model, 1, 5)
    with pytest.raises(InputError, match=r"149 genes .*omic_sizes.*shape \(1, 150\)"):
        model(features=x["features"], genes=torch.zeros(1, 150))
    with pytest.raises(InputError, match="reads gene expression"):
        model(features=x["features"])
    with pytest.raises(ValueError, match=r"n_genes = 150 but omic_sizes .* sum to 149"):
        MCATConfig(n_genes=150, omic_sizes=UCEC)
    assert MCATConfig(omic_sizes=list(UCEC)).n_genes == 149  # derived, and a JSON list becomes a tuple


def test_snn_refuses_genes_of_the_wrong_size():
    with pytest.raises(InputError, match=r"80 genes.*shape \(2, 79\)"):
        _model("snn")(genes=torch.zeros(2, 79))


def test_abmil_runs_without_genes():
    model = _model("abmil")
    assert model.input_names == ("features",) and model.genes is None
    x = _bags(model, 1, 9)
    with torch.no_grad():
        logits, weights = model(**x, return_attention=True)
        assert torch.equal(logits, model(**x, genes=torch.randn(1, 5)))  # genes are ignored
    assert logits.shape == (1, 4) and torch.allclose(weights.sum(1), torch.ones(1))


def test_snn_cox_head_gives_one_log_hazard():
    model = _model("snn", survival_head="cox")
    x = _bags(model, 4, 1)
    with torch.no_grad():
        logits = model(**x)
    assert logits.shape == (4, 1) and model.input_names == ("genes",)
    assert torch.equal(risk_from_logits(logits, "cox"), logits[:, 0])
    model.train()
    assert not torch.equal(model(**x), model(**x))  # AlphaDropout in training mode


def test_mcat_training_mode_uses_dropout_and_backpropagates():
    model = _model("mcat").train()
    x = _bags(model, 2, 20)
    a, b = model(**x), model(**x)
    assert not torch.equal(a, b)
    a.sum().backward()
    assert model.coattn.in_proj_weight.grad.abs().sum() > 0
    assert model.sig_networks[5][0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mcat", "abmil"])
def test_exported_graph_is_right_at_n_1_and_16384(name, tmp_path):
    import onnxruntime as ort

    from histosurv.export.onnx_export import SingleBag, export_onnx

    model = _model(name, feature_dim=64)  # the patch width does not change the graph's structure
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 16384):
        x = {k: v[0] for k, v in _bags(model, 1, n).items()}
        with torch.no_grad():
            risk, attention = SingleBag(model)(**x)
        got_risk, got_attention = session.run(None, {k: v.numpy() for k, v in x.items()})
        assert abs(got_risk[0] - float(risk)) <= 1e-4 * max(abs(float(risk)), 0.01), n
        assert got_attention.shape == (n,)
        assert abs(got_attention - attention.numpy()).max() <= 1e-4 * float(attention.max()), n
