"""AMMASurv against the paper's equations (shared/seeds/000, section II)."""

from __future__ import annotations

import math

import pytest
import torch

from histosurv.export.models import build_model
from histosurv.export.models.ammasurv import AMMASurv, AsymmetricAttention, GeneTokens

from .conftest import tiny_model_config


def _inputs(cfg, n=23, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        features=torch.randn(b, n, cfg.feature_dim, generator=g).abs(),
        coords=torch.randint(0, 40, (b, n, 2), generator=g) * 256,
        genes=torch.randn(b, cfg.n_genes, generator=g) * 3 + 5,
    )


def _model(seed=0, **overrides) -> AMMASurv:
    torch.manual_seed(seed)
    model = build_model("ammasurv", tiny_model_config(**overrides)).eval()
    # Give the learned parts non-trivial values so that a broken path would show.
    with torch.no_grad():
        model.cls_token.normal_()
    return model


def test_gene_tokens_never_influence_image_tokens():
    """Eqs. 4-9: gene tokens are queries only, so the image part of every layer is bit-for-bit unchanged."""
    model = _model()
    x = _inputs(model.cfg)
    other = dict(x, genes=x["genes"] + torch.randn_like(x["genes"]) * 10)
    with torch.no_grad():
        states_a, _ = model.encode(**x)
        states_b, _ = model.encode(**other)
    assert len(states_a) == model.cfg.depth
    for (img_a, gene_a), (img_b, gene_b) in zip(states_a, states_b):
        assert torch.equal(img_a, img_b)
        assert not torch.allclose(gene_a, gene_b)  # the genes do reach their own tokens
    with torch.no_grad():
        assert model(**x).item() != model(**other).item()  # ... and the risk, through y2


def test_image_tokens_do_influence_gene_tokens():
    """Eq. 5: gene tokens are induced by the image tokens."""
    model = _model()
    x = _inputs(model.cfg)
    with torch.no_grad():
        _, gene_a = model.encode(**x)[0][-1]
        _, gene_b = model.encode(**dict(x, features=x["features"] * 1.5))[0][-1]
    assert not torch.allclose(gene_a, gene_b)


def _naive_amma(attn: AsymmetricAttention, img, gene):
    """softmax(Q K^T / sqrt(d_head)) V, head by head, written from eqs. 4-7."""
    d = img.shape[-1]
    h = attn.heads
    hd = d // h
    x = torch.cat([img, gene], dim=1)[0]  # (n+m, d)
    wq, bq = attn.q.weight, attn.q.bias
    wk, wv = attn.kv.weight[:d], attn.kv.weight[d:]
    bk, bv = attn.kv.bias[:d], attn.kv.bias[d:]
    heads = []
    for i in range(h):
        s = slice(i * hd, (i + 1) * hd)
        q = x @ wq[s].T + bq[s]  # every token queries ...
        k = img[0] @ wk[s].T + bk[s]  # ... image tokens only
        v = img[0] @ wv[s].T + bv[s]
        heads.append(torch.softmax(q @ k.T / math.sqrt(hd), dim=-1) @ v)
    return attn.out(torch.cat(heads, dim=-1))[None]


@pytest.mark.parametrize("n", [1, 2, 17])
def test_sdpa_attention_equals_naive_reference(n):
    torch.manual_seed(n)
    attn = AsymmetricAttention(dim=40, heads=4, dropout=0.0).eval()
    img, gene = torch.randn(1, n + 1, 40), torch.randn(1, 5, 40)
    with torch.no_grad():
        o_img, o_gene, cls = attn(img, gene, keep_cls_weights=True)
        ref = _naive_amma(attn, img, gene)
    torch.testing.assert_close(torch.cat([o_img, o_gene], 1), ref, atol=1e-6, rtol=1e-6)
    assert cls.shape == (1, n + 1)
    torch.testing.assert_close(cls.sum(-1), torch.ones(1))


def test_naive_build_switch_computes_the_same_model():
    sdpa = _model()
    naive = build_model("ammasurv", sdpa.cfg, attention_impl="naive").eval()
    naive.load_state_dict(sdpa.state_dict())
    x = _inputs(sdpa.cfg, n=40)
    with torch.no_grad():
        a, att_a = sdpa(**x, return_attention=True)
        b, att_b = naive(**x, return_attention=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att_a, att_b)


def test_without_positions_risk_is_permutation_invariant():
    model = _model(pos_dim=0)
    x = _inputs(model.cfg, n=50)
    perm = torch.randperm(50)
    with torch.no_grad():
        a = model(**x)
        b = model(**dict(x, features=x["features"][:, perm], coords=x["coords"][:, perm]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_positions_travel_with_their_patches():
    model = _model()
    x = _inputs(model.cfg, n=50)
    perm = torch.randperm(50)
    with torch.no_grad():
        a = model(**x)
        together = model(**dict(x, features=x["features"][:, perm], coords=x["coords"][:, perm]))
        shuffled_positions = model(**dict(x, coords=x["coords"][:, perm]))
    torch.testing.assert_close(a, together, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, shuffled_positions, atol=1e-4)  # positions are really used


def test_gene_groups_split_pad_and_repeat():
    """Eq. 3: G genes in m groups of d2 = ceil(G/m) (last group zero-padded), each value repeated to d1."""
    cfg = tiny_model_config(n_genes=10, gene_groups=4, feature_dim=12, pos_dim=4, heads=2)
    tokens = GeneTokens(cfg)
    assert (cfg.group_size, tokens.pad) == (3, 2)
    with torch.no_grad():
        tokens.project.weight.copy_(torch.eye(cfg.dim))
        tokens.project.bias.zero_()
        out = tokens(torch.arange(1.0, 11.0)[None])  # (1, 4, 16), ReLU(identity) = the expanded groups
    assert out.shape == (1, 4, 16)
    assert out[0, 0, :12].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    assert out[0, 3, :12].tolist() == [10.0] * 4 + [0.0] * 8  # padded values
    assert out[0, :, 12:].abs().sum() == 0  # d_pos zeros


def test_changing_one_gene_changes_only_its_group_token():
    tokens = GeneTokens(tiny_model_config())
    genes = torch.randn(1, 24)
    bumped = genes.clone()
    bumped[0, 7] += 3.0  # gene 7 is in group 1 (6 genes per group)
    with torch.no_grad():
        changed = (tokens(genes) - tokens(bumped)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, True, False, False]


def test_gene_scaler_is_applied_inside_the_model():
    model = _model()
    x = _inputs(model.cfg)
    mean, scale = torch.rand(24) * 5, torch.rand(24) + 0.5
    with torch.no_grad():
        plain = model(**dict(x, genes=(x["genes"] - mean) / scale))
        model.set_gene_scaler(mean, scale)
        scaled = model(**x)
    torch.testing.assert_close(plain, scaled)
    assert "genes.mean" in model.state_dict() and "genes.scale" in model.state_dict()


def test_ablations_read_only_their_modality():
    image = _model(modality="image")
    genes = _model(modality="genes")
    assert image.input_names == ("features", "coords") and image.genes is None
    assert genes.input_names == ("genes",) and genes.attention_ops == 0
    x = _inputs(image.cfg)
    with torch.no_grad():
        assert image(features=x["features"], coords=x["coords"]).shape == (1, 1)
        assert genes(genes=x["genes"]).shape == (1, 1)


def test_batched_bags_match_single_bags():
    model = _model()
    x = _inputs(model.cfg, n=12, b=3)
    with torch.no_grad():
        batched = model(**x)
        single = torch.cat([model(**{k: v[i : i + 1] for k, v in x.items()}) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_genes=5000, gene_groups=4), "raise gene_groups to at least"),
        (dict(heads=3), "divisible by heads"),
        (dict(pos_dim=6), "multiple of 4"),
        (dict(modality="both-ish"), "modality must be one of"),
        (dict(survival_head="weibull"), "unknown survival head"),
    ],
)
def test_bad_configurations_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model("ammasurv", tiny_model_config(**overrides))


def test_discrete_head_risk_is_minus_expected_survival():
    model = _model(survival_head="discrete", n_bins=4)
    x = _inputs(model.cfg)
    with torch.no_grad():
        logits = model(**x)
        risk = model.risk(**x)
    survival = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    torch.testing.assert_close(risk, -survival.sum(1))
