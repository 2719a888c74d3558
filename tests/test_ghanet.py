"""G-HANet against the reference code's outputs (tests/golden/ghanet.json, see make_ghanet.py)."""

from __future__ import annotations

import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models import MODELS, build_model, risk_from_logits
from histosurv.export.models.checkpoints import load_reference_checkpoint
from histosurv.export.models.ghanet import GHANet, GHANetConfig

from .golden import TOLERANCE, load_golden, seeded_bag, seeded_state_dict

GOLDEN = load_golden("ghanet")
RECON_SIZES = tuple(GOLDEN["constructor"]["omic_sizes"])
SMALL = dict(feature_dim=32, dim=64, heads=4, ffn_mult=2, gate_hidden=16, compress_dim=16, n_bins=4)


def _reference_state() -> dict:
    return seeded_state_dict(GOLDEN["shapes"], GOLDEN["seed"])


@pytest.fixture(scope="module")
def golden_model() -> GHANet:
    model = build_model("ghanet", {}).eval()
    report = load_reference_checkpoint(model, _reference_state())
    assert len(report.unused) == 6 * len(RECON_SIZES)  # Linear, LayerNorm, Linear: weight and bias each
    assert all(k.startswith("recon_net.sig_reconstruct_net.") for k in report.unused)
    return model


def _bag(n: int) -> torch.Tensor:
    return seeded_bag(n, GOLDEN["feature_dim"], 0, GOLDEN["seed"])[0][None]  # (1, N, D)


def _small(seed=0, **overrides) -> GHANet:
    torch.manual_seed(seed)
    return build_model("ghanet", {**SMALL, **overrides}).eval()


@pytest.mark.parametrize("n", list(GOLDEN["cases"]))
def test_logits_attention_and_scores_match_the_reference(golden_model, n):
    case = GOLDEN["cases"][n]
    x = _bag(int(n))
    with torch.no_grad():
        logits, morphology = golden_model(x, return_attention=True)
        _, sim = golden_model.recon_net(x)
    assert (logits[0] - torch.tensor(case["logits"])).abs().max() <= TOLERANCE
    assert abs(risk_from_logits(logits, "discrete").item() - case["risk"]) <= TOLERANCE
    assert (morphology[0] - torch.tensor(case["morphology"])).abs().max() <= TOLERANCE
    if "scores" in case:  # the raw head-averaged similarity CAB hands to HSB
        assert (sim.mean(dim=1)[0].flatten() - torch.tensor(case["scores"])).abs().max() <= TOLERANCE


def test_reconstruction_heads_match_the_reference_and_do_not_touch_the_risk(golden_model):
    model = build_model("ghanet", dict(recon_sizes=RECON_SIZES)).eval()
    model.load_state_dict(_reference_state())  # histosurv keeps the reference's key names
    for n in ("5", "300"):
        x = _bag(int(n))
        with torch.no_grad():
            genes = model.predict_genes(x)
            assert torch.equal(model(x), golden_model(x))
        assert [g.shape[1] for g in genes] == list(RECON_SIZES)
        for got, want in zip(genes, GOLDEN["cases"][n]["omics"]):
            assert (got[0] - torch.tensor(want)).abs().max() <= TOLERANCE


def test_recon_heads_load_into_an_inference_model_only_through_the_import_path():
    trained = _small(recon_sizes=(3, 5, 2, 4, 7, 1))
    state = trained.state_dict()
    inference = _small(seed=1)
    with pytest.raises(RuntimeError, match="sig_reconstruct_net"):
        inference.load_state_dict(state)
    report = load_reference_checkpoint(inference, state)
    assert report.unused == sorted(k for k in state if ".sig_reconstruct_net." in k) and report.unused
    x = torch.rand(1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), trained(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="built without reconstruction heads"):
        inference.predict_genes(x)


def test_a_model_with_recon_heads_refuses_a_reference_import_by_name():
    with pytest.raises(InputError, match=r"missing \['recon_net.sig_reconstruct_net.0"):
        load_reference_checkpoint(build_model("ghanet", dict(recon_sizes=RECON_SIZES)), _reference_state())


def test_a_mis_shaped_checkpoint_is_refused_naming_the_tensor():
    state = _reference_state()
    state["wsi_net.0.weight"] = torch.zeros(512, 768)
    with pytest.raises(InputError, match=r"wsi_net\.0\.weight \(512, 768\) vs \(512, 1024\)"):
        load_reference_checkpoint(build_model("ghanet", {}), state)


def test_config_from_reference_recovers_the_shapes():
    cfg = GHANet.config_from_reference(_reference_state())
    assert GHANetConfig(**cfg) == GHANetConfig()
    small = _small(n_bins=6, ffn_mult=3, n_tokens=4)
    recovered = GHANetConfig(**GHANet.config_from_reference({f"module.{k}": v for k, v in small.state_dict().items()}))
    assert recovered == GHANetConfig(**{**SMALL, "n_bins": 6, "ffn_mult": 3, "n_tokens": 4})


def test_below_five_patches_each_hyperedge_keeps_one_patch(golden_model):
    """The reference raises IndexError at N < 5 (k = int(0.2 N) = 0); here k = 1 (golden N = 1, 3
    come from the reference run with k forced to 1), and every N gives a finite risk."""
    assert [c["k"] for n, c in GOLDEN["cases"].items() if int(n) < 5] == [1, 1]
    for n in range(1, 5):
        with torch.no_grad():
            logits, morphology = golden_model(_bag(n), return_attention=True)
        assert torch.isfinite(logits).all() and morphology.shape == (1, n)
    edges = golden_model._hyperedges(torch.tensor([[[0.3, 0.1, 0.9, 0.2]]]))
    assert edges.tolist() == [[[0.0, 0.0, 1.0, 0.0]]]


@pytest.mark.parametrize("n, k", [(5, 1), (9, 1), (10, 2), (301, 60), (5000, 1000)])
def test_each_hyperedge_keeps_a_fifth_of_the_patches(n, k):
    model = _small()
    scores = torch.randn(2, 6, n)
    kept = (model._hyperedges(scores) > 0).sum(dim=-1)
    assert (kept == k).all()
    assert n // 5 == int(n * 0.2)  # the reference's k, exactly


def test_cross_attention1_is_kept_but_unused_as_in_the_reference():
    model = _small()
    x = torch.rand(1, 30, 32)
    with torch.no_grad():
        before = model(x)
        for p in model.recon_net.cross_attention1.parameters():
            p.add_(1.0)
        assert torch.equal(model(x), before)
        to_v = model.recon_net.cross_attention0.to_v.weight
        to_v.add_(torch.randn_like(to_v))
        assert not torch.allclose(model(x), before)
    assert "recon_net.cross_attention1.to_q.0.weight" in model.state_dict()


def test_deterministic_and_batch_independent():
    model = _small()
    x = torch.rand(3, 25, 32)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        again = model(x)
    assert torch.equal(batched, again)
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


def test_naive_and_sdpa_builds_compute_the_same_model():
    sdpa = _small()
    naive = build_model("ghanet", sdpa.cfg, attention_impl="naive").eval()
    naive.load_state_dict(sdpa.state_dict())
    x = torch.rand(2, 50, 32)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), naive(x), atol=1e-6, rtol=1e-5)


def test_reads_patches_only():
    model = _small()
    assert MODELS["ghanet"].model_cls is GHANet
    assert model.input_names == ("features",) and model.genes is None and not model.uses_genes
    assert "can run without genes" in GHANet.__doc__


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(heads=3), "divisible by heads"),
        (dict(recon_sizes=(1, 2)), "one reconstruction head per token"),
        (dict(recon_sizes=(1, 2, 0, 4, 5, 6)), "recon_sizes must be positive"),
        (dict(topk_ratio=0.0), "topk_ratio"),
        (dict(survival_head="weibull"), "unknown survival head"),
        (dict(n_tokens=0), "n_tokens"),
    ],
)
def test_bad_configurations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GHANetConfig(**overrides)
    with pytest.raises(ValueError, match="attention impl"):
        GHANet(GHANetConfig(), attention_impl="flash")


class _TracedK(GHANet):
    """What the reference exports to: k frozen at the example N's value (37 // 5)."""

    def _hyperedges(self, matrix):
        kth = torch.topk(matrix, 7, dim=-1).values[..., -1:]
        return (matrix + (1 - (matrix >= kth).float()) * -100000.0).softmax(dim=-1)


def test_onnx_export_computes_k_from_n(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from histosurv.export.onnx_export import export_onnx

    model = _small(seed=3, topk_ratio=0.2)
    with torch.no_grad():  # make the hyperedges matter: sharper scores, stronger hypergraph path
        model.recon_net.cross_attention0.to_k[0].weight.mul_(4.0)
    frozen = _TracedK(model.cfg).eval()
    frozen.load_state_dict(model.state_dict())
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for n in (1, 6, 301, 5000, 16384):
        x = torch.randn(n, 32, generator=g).abs()
        with torch.no_grad():
            eager = model.risk(x[None]).item()
        risk, attention = session.run(None, {"features": x.numpy()})
        assert abs(risk[0] - eager) / max(abs(eager), 0.01) <= 1e-4, n
        assert attention.shape == (n,)
        if n >= 301:  # a graph with the traced k would be caught at this N
            with torch.no_grad():
                baked = frozen.risk(x[None]).item()
            assert abs(baked - eager) / max(abs(eager), 0.01) > 1e-3, n


def test_reconstruction_loss_trains_the_heads_and_checks_group_sizes():
    torch.manual_seed(0)
    cfg = dict(feature_dim=32, dim=32, heads=4, gate_hidden=16, compress_dim=16, recon_sizes=(2, 3, 1, 2, 4, 1))
    model = build_model("ghanet", cfg).train()
    features, genes = torch.rand(3, 20, 32), torch.randn(3, 13)
    loss = model.auxiliary_loss(features, genes)
    assert loss.ndim == 0 and float(loss) > 0
    loss.backward()
    head = model.recon_net.sig_reconstruct_net[4][-1].weight
    assert head.grad is not None and head.grad.abs().sum() > 0  # the heads learn from it
    assert build_model("ghanet", dict(cfg, recon_sizes=())).auxiliary_loss(features, genes) is None
    with pytest.raises(ValueError, match="recon_sizes .* sum to 13 genes, the cohort has 12"):
        model.auxiliary_loss(features, genes[:, :12])
