"""Every architecture of the zoo through the deployment path: export to a model repository, verify
ONNX Runtime against PyTorch at N = 1, 17, 1000 and 16384, serve with the predictor, and what
each manifest says about running without genes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models import MODELS, build_model
from histosurv.export.onnx_export import example_inputs
from histosurv.export.repository_writer import export_model
from histosurv.export.verify import verify_version
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.repository import ModelRepository

SIZES = (1, 17, 1000, 16384)
UCEC = (3, 24, 21, 22, 64, 15)
TORCH_PACKAGES = ("mome", "ghanet")  # MCAT's signature group sizes for TCGA-UCEC

# Small but real configurations: every block of each architecture, narrower widths.
CONFIGS = {
    "abmil": dict(feature_dim=64),
    "snn": dict(n_genes=80),
    "mcat": dict(omic_sizes=UCEC, feature_dim=64),
    "porpoise": dict(n_genes=12, feature_dim=32, modality_dropout=0.25),
    "early_fusion": dict(n_genes=12, feature_dim=32),
    "ghanet": dict(feature_dim=32, dim=64, heads=4, ffn_mult=2, gate_hidden=16, compress_dim=16),
    "mome": dict(omic_sizes=UCEC, feature_dim=64, dim=64, heads=2, num_landmarks=32),
    "coxnet": dict(n_genes=12, feature_dim=32),
}
# Run without genes: nothing (image only) or the documented optional genes
EXPECTED_GENES = {
    "abmil": "not used",
    "ghanet": "not used",
    "snn": "required",
    "mcat": "required",
    "porpoise": "optional",
    "early_fusion": "required",
    "mome": "required",
    "coxnet": "required",
}


def test_every_registered_architecture_is_covered():
    assert set(MODELS) - {"ammasurv"} == set(CONFIGS)  # AMMASurv has its own export tests


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_repo")
    torch.manual_seed(0)
    for name, values in CONFIGS.items():
        model = build_model(name, values).eval()
        genes = [f"g{i}" for i in range(model.cfg.n_genes)] if "genes" in model.input_names else []
        if model.genes is not None:  # a non-trivial scaler, so the graph's standardisation is exercised
            g = torch.Generator().manual_seed(1)
            model.set_gene_scaler(torch.randn(model.cfg.n_genes, generator=g), torch.rand(model.cfg.n_genes, generator=g) + 0.5)
        # the FP16 graph for GPU providers is derived from model.onnx (If subgraphs included); the torch
        # package (about 30 s to compile each) is asked of MoME, which declares it cannot have one, and of
        # G-HANet, whose top-k over a fraction of N once made torch.export specialise N
        artifacts = ("onnxruntime_fp16", "torch") if name in TORCH_PACKAGES else ("onnxruntime_fp16",)
        export_model(model, {"architecture": name, "model": model.cfg.to_dict(), "genes": genes}, root, name,
                     artifacts=artifacts, options={"device": "cpu"})
    return root


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_runtime_matches_torch_at_every_bag_size(repository, name):
    fp32, fp16 = verify_version(repository, name, sizes=SIZES, engines=["onnxruntime", "onnxruntime_fp16"])
    for report in (fp32, fp16):
        assert [r["n"] for r in report.rows] == list(SIZES)
        assert report.passed, (report.engine, report.rows)
    assert fp32.max_risk_rel <= 1e-4 and fp16.max_risk_rel <= 1e-2
    report = fp32
    reads_patches = "features" in build_model(name, CONFIGS[name]).input_names
    assert all(("attention_rel" in r) == reads_patches for r in report.rows)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_input_same_risk(repository, name):
    mv = ModelRepository(repository).version(name)
    predictor = FusionPredictor.from_repository(repository, name, engine="onnxruntime")
    model = build_model(name, CONFIGS[name]).eval()
    inputs = {k: v.numpy() for k, v in example_inputs(model, n=333, seed=7).items()}
    first, second = predictor.engine.run(inputs)["risk"], predictor.engine.run(inputs)["risk"]
    assert np.isfinite(first).all() and first.tobytes() == second.tobytes()
    assert mv.info.modalities["genes"] == EXPECTED_GENES[name]
    assert ("torch" in mv.info.not_built) == (name == "mome")
    assert ("torch" in mv.info.engines) == (name == "ghanet")


def test_ghanet_torch_package_matches_torch_at_every_bag_size(repository):
    """One package for every N: N < 5 takes k = 1 patch per hyperedge, larger bags k = N // 5."""
    (report,) = verify_version(repository, "ghanet", sizes=(1, 4, 17, 1000), engines=["torch"])
    assert report.passed and report.max_risk_rel <= 1e-5, report.rows


def test_optional_genes_are_fed_as_absent_and_required_genes_are_refused(repository, tmp_path):
    from histosurv.data.features import Bag

    rng = np.random.default_rng(0)
    bag = Bag(rng.random((50, 32), dtype=np.float32), np.zeros((50, 2), np.int64), source="slide.h5")
    porpoise = FusionPredictor.from_repository(repository, "porpoise", engine="onnxruntime")
    without = porpoise.slide(bag, None).risk
    with_genes = porpoise.slide(bag, rng.standard_normal(12).astype(np.float32)).risk
    assert np.isfinite(without) and without != with_genes
    with pytest.raises(InputError, match="not finite for g3"):
        partial = rng.standard_normal(12).astype(np.float32)
        partial[3] = np.nan
        porpoise.slide(bag, partial)  # some genes missing is not "no genes"

    early = FusionPredictor.from_repository(repository, "early_fusion", engine="onnxruntime")
    with pytest.raises(InputError, match="needs 'genes'"):
        early.slide(bag, None)


def test_default_gene_groups_cut_the_table_into_six_near_equal_groups():
    from histosurv.export.models.gene_groups import default_groups

    assert default_groups(24) == (4,) * 6
    assert default_groups(60) == (10,) * 6
    assert default_groups(200) == (34, 34, 33, 33, 33, 33) and sum(default_groups(200)) == 200
    assert default_groups(4) == (1, 1, 1, 1)  # fewer genes than groups: one gene each
    with pytest.raises(ValueError, match="cannot group 0 genes"):
        default_groups(0)
