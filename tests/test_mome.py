"""MoME against the reference code's outputs (tests/golden/mome.json), routing, batching and export."""

from __future__ import annotations

import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models import build_model, risk_from_logits
from histosurv.export.models.checkpoints import load_reference_checkpoint
from histosurv.export.models.mome import MoMETransformer
from histosurv.export.models.nystrom import NystromAttention

from .golden import TOLERANCE, load_golden, seeded_bag, seeded_state_dict

GOLDEN = load_golden("mome")
TINY = dict(omic_sizes=(3, 5, 4, 2, 6, 4), feature_dim=32, dim=32, heads=8, num_landmarks=16)


@pytest.fixture(scope="module")
def golden_model() -> MoMETransformer:
    model = build_model("mome", dict(omic_sizes=GOLDEN["kwargs"]["omic_sizes"], feature_dim=GOLDEN["feature_dim"]))
    extra = seeded_state_dict(GOLDEN["not_saved_shapes"], GOLDEN["seed"])
    load_reference_checkpoint(model, seeded_state_dict(GOLDEN["shapes"], GOLDEN["seed"]), extra=extra)
    return model.eval()


def _golden_inputs(n: int):
    features, genes = seeded_bag(n, GOLDEN["feature_dim"], sum(GOLDEN["kwargs"]["omic_sizes"]), GOLDEN["seed"])
    return features[None], genes[None]


@pytest.mark.parametrize("run", GOLDEN["runs"], ids=lambda r: f"N={r['n']}")
def test_matches_reference(golden_model, run):
    features, genes = _golden_inputs(run["n"])
    with torch.no_grad():
        logits, experts, attention = golden_model.route(features, genes, return_attention=True)
    if "error" in run:  # the reference's squeeze() fails at N = 1; here it is a bag of one patch
        assert torch.isfinite(logits).all() and attention.shape == (1, run["n"])
        return
    assert experts[0].tolist() == run["experts"]
    assert (logits[0] - torch.tensor(run["logits"])).abs().max() <= TOLERANCE
    assert abs(risk_from_logits(logits, "discrete").item() - run["risk"]) <= TOLERANCE
    assert (attention[0] - torch.tensor(run["attention"])).abs().max() <= 1e-7


def test_golden_routes_reach_every_expert():
    """The golden inputs exercise all four experts, so a broken one cannot hide."""
    assert {e for r in GOLDEN["runs"] for e in r.get("experts", [])} == {0, 1, 2, 3}


def test_config_from_reference():
    shapes = {k: torch.empty(s) for k, s in GOLDEN["shapes"].items()}
    values = MoMETransformer.config_from_reference(shapes)
    assert values["omic_sizes"] == tuple(GOLDEN["kwargs"]["omic_sizes"])
    assert (values["feature_dim"], values["dim"], values["num_landmarks"], values["n_bins"]) == (1024, 512, 256, 4)
    model = build_model("mome", values)
    load_reference_checkpoint(model, shapes, extra={k: torch.empty(s) for k, s in GOLDEN["not_saved_shapes"].items()})


def test_checkpoint_with_other_shapes_is_refused():
    state = seeded_state_dict(GOLDEN["shapes"])
    state["sig_networks.1.0.0.weight"] = torch.zeros(512, 25)
    model = build_model("mome", dict(omic_sizes=GOLDEN["kwargs"]["omic_sizes"]))
    extra = seeded_state_dict(GOLDEN["not_saved_shapes"])
    with pytest.raises(InputError, match=r"sig_networks\.1\.0\.0\.weight \(512, 25\) vs \(512, 24\)"):
        load_reference_checkpoint(model, state, extra=extra)


def test_tokens_outside_the_reference_state_dict_are_asked_for():
    model = build_model("mome", dict(omic_sizes=GOLDEN["kwargs"]["omic_sizes"]))
    with pytest.raises(InputError, match=r"cls_multimodal.*seed_torch"):
        load_reference_checkpoint(model, seeded_state_dict(GOLDEN["shapes"]))


def test_config_validation():
    with pytest.raises(ValueError, match="sum to 24"):
        build_model("mome", dict(TINY, n_genes=23))
    assert build_model("mome", TINY).cfg.n_genes == 24
    with pytest.raises(ValueError, match="attention impl"):
        MoMETransformer(build_model("mome", TINY).cfg, attention_impl="flash")


def _tiny_model(seed=0) -> MoMETransformer:
    torch.manual_seed(seed)
    return build_model("mome", TINY).eval()


def _tiny_bag(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(1, n, model.cfg.feature_dim, generator=g).abs() * (1 + 3 * (seed % 4))
    return features, torch.randn(1, model.cfg.n_genes, generator=g) * (1 + seed % 3)


def _differently_routed(model, n=40):
    """Two bags of N patches whose routes differ in at least one layer."""
    with torch.no_grad():
        bags = [_tiny_bag(model, n, s) for s in range(12)]
        routes = [model.route(*bag)[1][0].tolist() for bag in bags]
    j = next(j for j in range(1, len(bags)) if routes[j] != routes[0])
    return bags[0], bags[j], routes[0], routes[j]


def test_batch_of_differently_routed_patients_equals_each_alone():
    model = _tiny_model()
    a, b, route_a, route_b = _differently_routed(model)
    batch = [torch.cat([x, y]) for x, y in zip(a, b)]
    with torch.no_grad():
        logits, routes, attention = model.route(*batch, return_attention=True)
        alone = [model.route(*bag, return_attention=True) for bag in (a, b)]
        again = model(*(a[0], None, a[1]))
    assert routes.tolist() == [route_a, route_b]
    for i, (l1, _, att1) in enumerate(alone):
        assert (logits[i] - l1[0]).abs().max() <= 1e-6
        assert (attention[i] - att1[0]).abs().max() <= 1e-6
    assert torch.equal(again, alone[0][0])


def _ort(path, inputs: dict):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _ops_in_every_graph(graph, ops=None):
    """op counts of ``graph`` and of every subgraph inside it (If branches), recursively."""
    import collections

    import onnx

    ops = collections.Counter() if ops is None else ops
    for node in graph.node:
        ops[f"{node.domain or 'ai.onnx'}::{node.op_type}"] += 1
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _ops_in_every_graph(sub, ops)
    return ops


def test_exported_graph_routes_like_eager_at_every_n(tmp_path):
    """The serving graph routes each MoME layer with ONNX If (only the chosen expert runs). The bags
    below take different routes (N = 300 and 1000 of seed 2 among them) and reach all four experts;
    the graph, exported at N = 37, must select as eager does: risk and attention agree."""
    import onnx

    from histosurv.export.models.mome import LAYERS
    from histosurv.export.onnx_export import SingleBag, export_onnx

    model = _tiny_model()
    facts = export_onnx(model, tmp_path / "mome.onnx")
    assert facts.details["ops"]["ai.onnx::If"] == 3 * len(LAYERS)  # e == 0, 1, 2 per layer; DropX2Fusion otherwise
    everywhere = _ops_in_every_graph(onnx.load(str(tmp_path / "mome.onnx")).graph)
    assert not [op for op in everywhere if "Attention" in op], everywhere  # none hidden in an If branch either
    routes = {}
    for n, seed in [(1, 0), (17, 1), (300, 2), (1000, 2), (300, 3), (1000, 5), (16384, 2)]:
        features, genes = _tiny_bag(model, n, seed)
        with torch.no_grad():
            routes[n, seed] = model.route(features, genes)[1][0].tolist()
            risk, attention = SingleBag(model)(features=features[0], genes=genes[0])
        got_risk, got_attention = _ort(tmp_path / "mome.onnx", dict(features=features[0], genes=genes[0]))
        assert abs(got_risk[0] - risk.item()) <= 1e-4 * max(abs(risk.item()), 0.01), (n, seed)
        assert abs(got_attention - attention.numpy()).max() <= 1e-4 * abs(attention.numpy()).max(), (n, seed)
    assert routes[300, 2] != routes[1000, 2]
    assert {e for r in routes.values() for e in r} == {0, 1, 2, 3}


def test_exported_batch_still_selects_per_patient():
    """Exported with a batch of two differently routed bags there is no scalar route: the graph runs
    every expert and selects each patient's (where), as eager does."""
    model = _tiny_model()
    a, b, _, _ = _differently_routed(model)
    batch = [torch.cat([x, y]) for x, y in zip(a, b)]
    with torch.no_grad():
        program = torch.export.export(model, (batch[0], None, batch[1]), strict=False)
        want = model(batch[0], None, batch[1])
    targets = {str(n.target) for n in program.graph.nodes}
    assert not any("cond" in t for t in targets) and "aten.where.self" in targets
    assert (program.module()(batch[0], None, batch[1]) - want).abs().max() <= 1e-6


@pytest.mark.parametrize("n", [1, 100, 256, 300, 700])
def test_nystrom_export_follows_n(n, _nystrom_onnx):
    module, path = _nystrom_onnx
    x = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        out, row = module(x, cls_row=True)
    got_out, got_row = _ort(path, dict(x=x))
    assert abs(got_out - out.numpy()).max() <= 1e-5 * max(abs(out.numpy()).max(), 1)
    assert abs(got_row - row.numpy()).max() <= 1e-5 * abs(row.numpy()).max()


class _WithRow(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, cls_row=True)


@pytest.fixture(scope="module")
def _nystrom_onnx(tmp_path_factory):
    torch.manual_seed(0)
    module = NystromAttention(32, dim_head=4, heads=8, num_landmarks=256).eval()
    path = tmp_path_factory.mktemp("nystrom") / "nystrom.onnx"
    n = torch.export.Dim("N", min=1, max=1 << 16)
    x = torch.randn(1, 37, 32)
    with torch.no_grad():
        program = torch.onnx.export(
            _WithRow(module), (x,), dynamo=True, dynamic_shapes=({1: n},), input_names=["x"], verbose=False
        )
    program.save(str(path))
    return module, path


def test_nystrom_batch_independent():
    """The pseudo-inverse's scale is per bag: a bag's output does not depend on its batch mates."""
    torch.manual_seed(0)
    module = NystromAttention(32, dim_head=4, heads=8, num_landmarks=16).eval()
    a, b = torch.randn(1, 50, 32), 30 * torch.randn(1, 50, 32)
    with torch.no_grad():
        both = module(torch.cat([a, b]))
        assert (both[0] - module(a)[0]).abs().max() <= 1e-6
        assert (both[1] - module(b)[0]).abs().max() <= 1e-6
