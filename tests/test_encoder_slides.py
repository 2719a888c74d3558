"""Every foundation-model encoder from the real SVS to a risk: `tile`, `predict --slide` and ScoreSlide.

Each encoder family is exported with one block per stage (its registry entry's builder swapped for
the same network with fewer blocks while the fixture exports: same preprocessing, record and graph;
full-size UNI runs this path in test_vit.py). Nothing after the export rebuilds the network: `tile`,
`predict` and the server read the manifest's record and run the graph,
and each gets a small AMMASurv whose manifest says it was trained on that encoder's features. The
slide must then be cut as the encoder's record says (patch side, µm/px), through its own graph, and
the three entry points must agree on the risk.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import h5py
import numpy as np
import pytest
import torch

from histosurv.data.encoder_record import EncoderRecord
from histosurv.data.tables import GeneTable
from histosurv.data.typed_json import to_json_dict
from histosurv.export.encoder_export import export_encoder
from histosurv.export.models import build_model
from histosurv.export.models.encoders import ENCODERS, RESNETS, build_vit
from histosurv.export.models.swin import build_ctranspath
from histosurv.export.repository_writer import export_model
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.server._proto import slide_service_pb2 as spb
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
from histosurv.runtime.server.models import ExecutionConfig, ModelStore
from histosurv.runtime.server.security import SlideRoots
from histosurv.runtime.server.slide_service import SlideServiceConfig
from histosurv.runtime.pipeline import SlideConfig

from .conftest import TINY_SYNTH, run_cli, tiny_model_config
from .serving import RunningServer

NAMES = sorted(set(ENCODERS) - set(RESNETS))  # the ResNets take this path in test_pipeline.py
BATCH = 8


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_cohort_dir):
    """One repository: every encoder at depth 1, and a fusion model ``fuse_<encoder>`` for each."""
    repo = tmp_path_factory.mktemp("encoder_slides") / "model_repository"
    genes = GeneTable.read(tiny_cohort_dir / "genes.csv").numeric_genes()
    assert len(genes) == TINY_SYNTH.n_genes
    for name in NAMES:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(ENCODERS, name, dataclasses.replace(ENCODERS[name], build=functools.partial(_reduced, name)))
            encoder = export_encoder(repo, name, artifacts=())
        config = tiny_model_config(feature_dim=ENCODERS[name].feature_dim)
        torch.manual_seed(0)
        model = build_model("ammasurv", config)
        run_config = {"architecture": "ammasurv", "model": config.to_dict(), "genes": genes,
                      "trained_on": to_json_dict(encoder.encoder_record)}
        export_model(model, run_config, repo, f"fuse_{name}", artifacts=())
    return repo


def _reduced(name: str):
    return build_ctranspath(depths=(1, 1, 1, 1)) if name == "ctranspath" else build_vit(name, depth=1)


@pytest.mark.parametrize("name", NAMES)
def test_tile_cuts_as_the_record_says_and_predict_slide_agrees(name, repo, cmu_svs, tiny_cohort_dir, tmp_path):
    spec = ENCODERS[name]
    out = run_cli("tile", cmu_svs, "--repo", repo, "--model", f"fuse_{name}", "--out", tmp_path / "cmu.h5",
                  "--batch-size", BATCH)
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "cmu.h5") as f:
        features, coords, attrs = f["features"][()], f["coords"][()], dict(f.attrs)
        level0_side = int(f["coords"].attrs["patch_size_level0"])
    record = EncoderRecord.from_json(attrs["encoder_record"])
    assert (record.architecture, record.patch_size, record.mpp) == (name, spec.patch_size, spec.mpp)
    assert features.shape == (len(coords), spec.feature_dim) and len(coords) > 0 and np.isfinite(features).all()
    # the SVS is 0.499 µm/px: a patch at the encoder's scale covers its side (513 px at 1 µm/px) at level 0
    assert abs(level0_side * 0.499 / spec.patch_size - spec.mpp) <= 0.01 * spec.mpp and (coords % level0_side == 0).all()
    assert attrs["patch_size"] == spec.patch_size

    case = str(GeneTable.read(tiny_cohort_dir / "genes.csv").frame.index[0])
    args = ("predict", "--repo", repo, "--model", f"fuse_{name}", "--case-id", case, "--genes",
            tiny_cohort_dir / "genes.csv")
    from_slide = run_cli(*args, "--slide", cmu_svs, "--batch-size", BATCH)
    assert from_slide.returncode == 0, from_slide.stderr
    report = json.loads(from_slide.stdout)
    assert report["encoder"] == f"{name}_encoder v1" and report["slides"][0]["n_patches"] == len(coords)
    from_h5 = run_cli(*args, "--features", tmp_path / "cmu.h5")
    assert from_h5.returncode == 0, from_h5.stderr
    h5_risk = json.loads(from_h5.stdout[: from_h5.stdout.rindex("}") + 1])["risk"]
    assert np.isfinite(report["risk"]) and report["risk"] == pytest.approx(h5_risk, rel=1e-5)


def test_score_slide_takes_every_encoder(repo, cmu_svs, tiny_cohort_dir):
    store = ModelStore(repo, execution=ExecutionConfig(batching=False))
    store.load_all()
    config = SlideServiceConfig(roots=SlideRoots([cmu_svs.parent]), slide=SlideConfig(batch_size=BATCH))
    server = RunningServer(store, slides=config)
    table = GeneTable.read(tiny_cohort_dir / "genes.csv")
    try:
        import grpc

        with grpc.insecure_channel(server.url) as channel:
            stub = spb_grpc.SlideServiceStub(channel)
            for name in NAMES:
                genes = FusionPredictor.from_repository(repo, f"fuse_{name}").genes_for(table, str(table.frame.index[0]))
                request = spb.ScoreSlideRequest(slide_uri=cmu_svs.name, model_name=f"fuse_{name}", genes=genes)
                result = list(stub.ScoreSlide(request, timeout=300))[-1].result
                assert result.encoder == f"{name}_encoder v1", name
                assert result.patch_mpp == ENCODERS[name].mpp and not result.overrides and np.isfinite(result.risk)
                assert result.n_patches > 0
    finally:
        server.stop()
