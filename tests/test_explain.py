"""Explanations: occlusion on a real ONNX Runtime engine, integrated gradients on the torch model, MCAT's
per-group co-attention, the refusal for an image-only model, `predict --explain` and ScoreSlide's explain."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pandas as pd
import pytest
import torch

from histosurv.cli import main
from histosurv.data.features import Bag, write_bag
from histosurv.errors import InputError
from histosurv.export.attribution import integrated_gradients, model_internals
from histosurv.export.models import build_model
from histosurv.export.repository_writer import export_model
from histosurv.runtime.explain import explain_bag, explain_genes, top_patches
from histosurv.runtime.predict import FusionPredictor

G, D, N = 8, 8, 20
WEIGHTS = {1: 2.0, 2: -1.0}  # the linear model reads genes g1 and g2 only, both in the first half


def _export(model, repo, name, genes):
    export_model(model, {"architecture": name.split("_")[0], "model": model.cfg.to_dict(), "genes": genes}, repo,
                 name=name, artifacts=())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A linear Cox model that depends on genes g1 and g2 only, an image-only one, and a small MCAT."""
    repo = tmp_path_factory.mktemp("explain") / "model_repository"
    names = [f"g{i}" for i in range(G)]
    torch.manual_seed(0)
    linear = build_model("coxnet", dict(n_genes=G, feature_dim=D))
    with torch.no_grad():
        linear.classifier.weight.zero_()
        linear.classifier.weight[0, 0] = 0.5  # one feature, so the bag matters too
        for i, w in WEIGHTS.items():
            linear.classifier.weight[0, D + i] = w
        linear.genes.mean.copy_(torch.arange(G, dtype=torch.float32))
        linear.genes.scale.fill_(2.0)
    _export(linear, repo, "coxnet", names)
    _export(build_model("coxnet", dict(n_genes=0, feature_dim=D, modality="image")), repo, "coxnet_image", [])
    mcat = build_model("mcat", dict(omic_sizes=(3, 5), feature_dim=D, dim=16, omic_hidden=(16, 16), depth=1, heads=2, ff_dim=16))
    _export(mcat, repo, "mcat", names)
    return repo


def _bag(seed=0) -> Bag:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.divmod(np.arange(N), 5), axis=1)[:, ::-1].astype(np.int64) * 256
    return Bag(rng.random((N, D), dtype=np.float32), coords, {}, "case.h5")


def _genes(predictor, seed=0) -> np.ndarray:
    mean = np.asarray(predictor.version.info.genes.mean, np.float32)
    return mean + 2 * np.random.default_rng(seed).normal(size=G).astype(np.float32)


def test_occlusion_equals_separate_engine_runs(repo):
    p = FusionPredictor.from_repository(repo, "mcat", engine="onnxruntime")
    inputs = p.inputs_for(_bag(), _genes(p))
    a = explain_genes(p, inputs)
    assert a.grouping.startswith("the model's gene tokens (omic_sizes 3, 5)")
    assert [g.genes for g in a.groups] == [["g0", "g1", "g2"], ["g3", "g4", "g5", "g6", "g7"]]
    assert a.passes == 2 + 2 and "training mean" in a.baseline
    full = float(p.engine.run(inputs)["risk"][0])
    mean = np.asarray(p.version.info.genes.mean, np.float32)
    for group, members in zip(a.groups, ([0, 1, 2], [3, 4, 5, 6, 7])):
        occluded = inputs["genes"].copy()
        occluded[members] = mean[members]
        alone = float(p.engine.run({**inputs, "genes": occluded})["risk"][0])
        assert group.attribution == pytest.approx(full - alone, abs=1e-6)
    assert a.risk == pytest.approx(full, abs=1e-6)
    json.dumps(a.to_dict())  # plain JSON for reports


def test_signs_follow_the_genes_the_model_reads(repo):
    p = FusionPredictor.from_repository(repo, "coxnet", engine="onnxruntime")
    genes = np.asarray(p.version.info.genes.mean, np.float32).copy()
    genes[1] += 4.0  # 2 sd above the mean on a positive weight: raises the risk by 2 * 2.0
    genes[2] += 2.0  # 1 sd above on a negative weight: lowers it by 1.0
    genes[6] -= 6.0  # a gene the model ignores
    a = explain_genes(p, p.inputs_for(_bag(), genes), max_groups=2)
    assert "consecutive chunks of 4 genes" in a.grouping
    first, second = a.groups
    assert first.attribution == pytest.approx(4.0 - 1.0, abs=1e-5) and second.attribution == pytest.approx(0.0, abs=1e-6)
    single = explain_genes(p, p.inputs_for(_bag(), genes))  # 8 genes: each its own group
    assert single.genes["g1"] == pytest.approx(4.0, abs=1e-5) and single.genes["g2"] == pytest.approx(-1.0, abs=1e-5)
    assert single.genes["g6"] == pytest.approx(0.0, abs=1e-6)


def test_integrated_gradients_is_complete(repo):
    p = FusionPredictor.from_repository(repo, "coxnet", engine="onnxruntime")
    inputs = p.inputs_for(_bag(), _genes(p))
    linear = integrated_gradients(p.version, inputs, steps=8)
    occlusion = explain_genes(p, inputs)
    for gene, value in occlusion.genes.items():  # a linear model: IG and occlusion agree exactly
        assert linear.genes[gene] == pytest.approx(value, abs=1e-5)
    assert abs(linear.completeness_gap) < 1e-5
    m = FusionPredictor.from_repository(repo, "mcat", engine="onnxruntime")
    ig = integrated_gradients(m.version, m.inputs_for(_bag(), _genes(m)), steps=64)
    # stated tolerance: the midpoint rule over 64 steps leaves under 5 % of risk(x) - risk(baseline)
    assert abs(ig.completeness_gap) <= 0.05 * abs(ig.risk - ig.baseline_risk) + 1e-5
    assert ig.risk == pytest.approx(float(m.engine.run(m.inputs_for(_bag(), _genes(m)))["risk"][0]), abs=1e-4)


def test_mcat_groups_co_attention_averages_to_the_served_attention(repo):
    p = FusionPredictor.from_repository(repo, "mcat", engine="onnxruntime")
    bag = _bag()
    inputs = p.inputs_for(bag, _genes(p))
    internals = model_internals(p.version, inputs, bag.coords, k=N)
    per_group = np.zeros((2, N))
    for row, group in zip(per_group, internals["groups"]):
        for patch in group["top_patches"]:
            row[patch["index"]] = patch["attention"]
    np.testing.assert_allclose(per_group.mean(axis=0), p.engine.run(inputs)["attention"], atol=1e-5)


def test_an_image_only_model_says_why_it_has_no_gene_attributions(repo):
    p = FusionPredictor.from_repository(repo, "coxnet_image", engine="onnxruntime")
    inputs = p.inputs_for(_bag(), None)
    with pytest.raises(InputError, match="takes no genes, so there are no gene attributions"):
        explain_genes(p, inputs)
    with pytest.raises(InputError, match="takes no genes"):
        explain_bag(p, _bag(), genes_required=True)
    partial = explain_bag(p, _bag(), k=3)
    assert "takes no genes" in partial.unavailable["gene_attributions"]
    assert [t.index for t in partial.top_patches] == [0, 1, 2]  # flat 1/N attention: ties keep the bag's order


def test_predict_explain_prints_and_writes_the_explanation(repo, tmp_path, capsys):
    write_bag(tmp_path / "s1.h5", _bag())
    p = FusionPredictor.from_repository(repo, "mcat")
    pd.DataFrame([{"case_id": "c1", **dict(zip(p.gene_names, _genes(p)))}]).to_csv(tmp_path / "genes.csv", index=False)
    code = main(["predict", "--repo", str(repo), "--model", "mcat", "--features", str(tmp_path / "s1.h5"), "--case-id",
                 "c1", "--genes", str(tmp_path / "genes.csv"), "--explain", "all", "--explain-top", "3",
                 "--ig-steps", "16", "--explain-dir", str(tmp_path / "why")])
    assert code == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index('{\n "explanations"'):])["explanations"][0]
    assert [a["method"] for a in printed["gene_attributions"]] == ["occlusion", "integrated_gradients"]
    assert len(printed["top_patches"]) == 3 and printed["internals"]["architecture"] == "mcat"
    assert "internals" not in printed["unavailable"]
    written = json.loads((tmp_path / "why" / "s1.explanation.json").read_text())
    assert written["gene_attributions"][0]["groups"] == printed["gene_attributions"][0]["groups"]
    assert main(["predict", "--repo", str(repo), "--model", "coxnet_image", "--features", str(tmp_path / "s1.h5"),
                 "--case-id", "c1", "--explain", "occlusion"]) != 0
    assert "takes no genes" in capsys.readouterr().err


def test_top_patches_read_crops_from_the_slide(cmu_svs):
    from histosurv.runtime.slides import open_slide

    coords = np.array([[2000, 2000], [4000, 3000], [0, 0]], np.int64)
    tops = top_patches(np.array([0.2, 0.5, 0.3]), coords, k=2, slide=cmu_svs, patch_size=512, crop_size=128)
    assert [t.index for t in tops] == [1, 2] and tops[0].crop.shape == (128, 128, 3) and tops[0].crop.dtype == np.uint8
    with open_slide(cmu_svs) as reader:
        whole = reader.read_region((4000, 3000), (512, 512))
    assert abs(float(tops[0].crop.mean()) - float(whole.mean())) < 2.0  # a box filter keeps the mean


def test_score_slide_explains_on_request(slide_repo, cmu_svs, tmp_path):
    from histosurv.data.tables import GeneTable
    from histosurv.runtime.server._proto import slide_service_pb2 as spb
    from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
    from histosurv.runtime.server.models import ModelStore
    from histosurv.runtime.server.security import SlideRoots
    from histosurv.runtime.server.slide_service import SlideServiceConfig

    from .serving import RunningServer

    model_repo, cohort_dir, case = slide_repo
    genes = FusionPredictor.from_repository(model_repo, "ammasurv").genes_for(GeneTable.read(cohort_dir / "genes.csv"), case)
    shutil.copy(cmu_svs, tmp_path / "cmu.svs")
    store = ModelStore(model_repo)
    store.load_all()
    server = RunningServer(store, slides=SlideServiceConfig(roots=SlideRoots([tmp_path])))
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = spb_grpc.SlideServiceStub(channel)

            def score(**fields):
                request = spb.ScoreSlideRequest(slide_uri="cmu.svs", model_name="ammasurv", genes=genes, **fields)
                return list(stub.ScoreSlide(request, timeout=600))[-1].result

            plain, explained = score(), score(explain=True, top_k=4)
    finally:
        server.stop()
    assert not plain.HasField("explanation")  # off by default
    e = explained.explanation
    assert explained.risk == pytest.approx(plain.risk, abs=1e-6)
    (genes_attr,) = e.gene_attributions
    assert genes_attr.method == "occlusion" and genes_attr.risk == pytest.approx(explained.risk, abs=1e-5)
    assert len(genes_attr.groups) >= 2 and genes_attr.passes == len(genes_attr.groups) + 2
    assert [c.index for c in e.crops] == [p.index for p in explained.top_patches]
    assert e.crops[0].png.startswith(b"\x89PNG")
