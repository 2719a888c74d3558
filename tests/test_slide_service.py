"""histosurv.v1.SlideService on a real server: the real SVS scored in one call, bags streamed in chunks,
the dynamic batcher, the bounded queue, cancellation, and the requests it must refuse."""

from __future__ import annotations

import json
import re
import shutil
import threading

import grpc
import numpy as np
import pytest

from histosurv.data.features import Bag
from histosurv.runtime.pipeline import SlideConfig
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.repository import sha256_file
from histosurv.runtime.server._proto import slide_service_pb2 as spb
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc
from histosurv.runtime.server.models import ExecutionConfig, ModelStore
from histosurv.runtime.server.security import SlideRoots
from histosurv.runtime.server.slide_service import SlideServiceConfig

from .conftest import run_cli
from .serving import RunningServer, value

BATCH = 4  # patches per read-ahead chunk: the SVS has a few dozen tissue patches, so several chunks each


@pytest.fixture(scope="module")
def genes(slide_repo):
    repo, cohort_dir, case = slide_repo
    from histosurv.data.tables import GeneTable

    predictor = FusionPredictor.from_repository(repo, "ammasurv")
    return predictor.genes_for(GeneTable.read(cohort_dir / "genes.csv"), case)


@pytest.fixture(scope="module")
def slides(cmu_svs, tmp_path_factory):
    """A slide root holding the real SVS, and a folder outside it."""
    root = tmp_path_factory.mktemp("slides")
    shutil.copy(cmu_svs, root / "cmu.svs")
    outside = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(cmu_svs, outside / "secret.svs")
    (root / "escape.svs").symlink_to(outside / "secret.svs")
    return root, outside


def _server(repo, root, batching=True, max_active=2, max_queued=16, **execution):
    store = ModelStore(repo, execution=ExecutionConfig(batching=batching, **execution))
    store.load_all()
    config = SlideServiceConfig(
        roots=SlideRoots([root]), slide=SlideConfig(batch_size=BATCH), max_active=max_active, max_queued=max_queued
    )
    return RunningServer(store, slides=config, metrics_http=True)


@pytest.fixture(scope="module")
def server(slide_repo, slides):
    running = _server(slide_repo[0], slides[0], max_batch=4 * BATCH, max_delay=0.05)
    yield running
    running.stop()


def _stub(server):
    channel = grpc.insecure_channel(server.url)
    return channel, spb_grpc.SlideServiceStub(channel)


def _score(server, genes, uri="cmu.svs", timeout=600, **fields):
    channel, stub = _stub(server)
    with channel:
        events = list(stub.ScoreSlide(spb.ScoreSlideRequest(slide_uri=uri, model_name="ammasurv", genes=genes, **fields), timeout=timeout))
    return events


def test_score_slide_gives_the_risk_of_predict_slide(server, slide_repo, slides, genes, tmp_path):
    repo, cohort_dir, case = slide_repo
    before = server.scrape()
    events = _score(server, genes, top_k=5, id="slide-1")
    result = events[-1].result
    progress = [e.progress for e in events[:-1]]

    cli = run_cli("predict", "--repo", repo, "--case-id", case, "--genes", cohort_dir / "genes.csv",
                  "--slide", slides[0] / "cmu.svs", "--batch-size", BATCH)
    assert cli.returncode == 0, cli.stderr
    report = json.loads(cli.stdout)
    # the batcher joins chunks into batches of another size than predict's; ONNX Runtime's convolutions
    # then differ in the last bits, which the risk carries at 1e-5 at most
    assert result.risk == pytest.approx(report["risk"], rel=1e-5)
    assert result.n_patches == report["slides"][0]["n_patches"] > 3 * BATCH
    assert result.id == "slide-1" and result.model_version == "1" and result.encoder == "resnet18_encoder v1"
    assert result.slide_sha256 == sha256_file(slides[0] / "cmu.svs")
    # cut at the training bags' scale, with no override and nothing left unchecked
    assert result.patch_mpp == report["patch_mpp"] == 0.5 and not result.overrides and not result.notes
    # S(t) and the risk group, as predict gives them
    times = [float(c[2:-1]) for c in report if c.startswith("S(")]
    assert list(result.survival_months) == times and len(times) == 4
    assert list(result.survival) == pytest.approx([report[f"S({t:g})"] for t in times], abs=1e-5)
    assert result.HasField("risk_group") and result.risk_group_label == report["risk_group"]

    # progress: admitted, the tissue patch count, encoded patches rising to it, then fuse
    assert progress[0].stage == "admitted" and progress[1].stage == "tiled" and progress[1].total == result.n_patches
    encoded = [p.done for p in progress if p.stage == "encode"]
    assert encoded == sorted(encoded) and encoded[-1] == result.n_patches and len(encoded) >= result.n_patches // BATCH
    assert progress[-1].stage == "fuse"

    # the most attended patches, most attended first, at patch-grid positions of the bag
    top = list(result.top_patches)
    assert len(top) == 5 and [p.attention for p in top] == sorted((p.attention for p in top), reverse=True)
    assert all(0 <= p.x < 2220 and 0 <= p.y < 2967 for p in top) and len({(p.x, p.y) for p in top}) == 5
    assert set(result.stage_seconds) >= {"open", "mask", "read", "encode", "fuse", "queue", "total"}

    # one request on the fusion model; every patch through the encoder, two chunks of the slide in
    # flight at once, so runs join them
    after = server.scrape()
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("nv_inference_request_success", model="ammasurv", version=1) == 1
    assert delta("nv_inference_count", model="resnet18_encoder", version=1) == result.n_patches
    chunks = -(-result.n_patches // BATCH)
    assert chunks / 2 <= delta("nv_inference_exec_count", model="resnet18_encoder", version=1) < chunks
    assert delta("histosurv_encoder_batch_size_sum", model="resnet18_encoder") == result.n_patches
    assert delta("histosurv_request_duration_seconds_count", model="ammasurv", version=1, rpc="ScoreSlide") == 1
    for stage in ("open", "mask", "read", "encode", "fuse"):
        assert delta("histosurv_stage_duration_seconds_count", model="ammasurv", stage=stage) == 1
    assert delta("histosurv_slide_patches_sum", model="ammasurv") == result.n_patches


def test_concurrent_slides_share_encoder_batches_and_keep_their_risks(server, genes):
    alone = _score(server, genes)[-1].result.risk
    before = server.scrape()
    results = [None, None]

    def score(i):
        results[i] = _score(server, genes, id=f"c{i}")[-1].result

    threads = [threading.Thread(target=score, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    after = server.scrape()
    assert [r.id for r in results] == ["c0", "c1"]
    assert all(r.risk == pytest.approx(alone, rel=1e-5) for r in results)
    patches = value(after, "nv_inference_count", model="resnet18_encoder", version=1) - value(
        before, "nv_inference_count", model="resnet18_encoder", version=1
    )
    runs = value(after, "nv_inference_exec_count", model="resnet18_encoder", version=1) - value(
        before, "nv_inference_exec_count", model="resnet18_encoder", version=1
    )
    assert patches == 2 * results[0].n_patches
    assert patches / runs > 2 * BATCH  # more than one slide's two chunks in flight: runs joined both slides


@pytest.mark.parametrize(
    "uri, status, message",
    [
        ("../elsewhere/secret.svs", "PERMISSION_DENIED", r"'\.\.'"),
        ("escape.svs", "PERMISSION_DENIED", "resolves outside the slide roots"),
        ("SECRET_ABSOLUTE", "PERMISSION_DENIED", "outside the slide roots"),
        ("missing.svs", "NOT_FOUND", "missing.svs"),
        ("s3://bucket/cmu.svs", "INVALID_ARGUMENT", "scheme 's3' is not supported"),
    ],
)
def test_slides_outside_the_roots_are_refused(server, slides, genes, uri, status, message):
    if uri == "SECRET_ABSOLUTE":
        uri = str(slides[1] / "secret.svs")
    with pytest.raises(grpc.RpcError) as caught:
        _score(server, genes, uri=uri)
    assert caught.value.code().name == status
    assert re.search(message, caught.value.details())


def test_refusals_name_the_request_uri_never_the_server_paths(server, slides, genes):
    """A remote client learns its own URI back, never where the slide roots are (issue 22)."""
    root, outside = slides
    (root / "damaged.svs").write_bytes(b"II*\x00 not a slide at all")
    for uri in ("damaged.svs", "missing.svs", "escape.svs", f"file://{root}/missing.svs"):
        with pytest.raises(grpc.RpcError) as caught:
            _score(server, genes, uri=uri)
        details = caught.value.details()
        assert uri in details, details
        for path in (root, outside, root.resolve(), outside.resolve()):
            assert str(path) not in details.replace(uri, ""), details


def test_bad_score_requests_name_the_field(server, genes):
    cases = [
        (dict(model_name="nope"), "NOT_FOUND", "model 'nope' is not loaded"),
        (dict(genes=genes[:5]), "INVALID_ARGUMENT", "'genes' has 5 values"),
        (dict(genes=[]), "INVALID_ARGUMENT", "needs 'genes'"),
        (dict(encoder_name="ammasurv"), "INVALID_ARGUMENT", "not a patch encoder"),
        (dict(encoder_name="uni_encoder"), "NOT_FOUND", "patch encoder 'uni_encoder' is not loaded (encoders: resnet18_encoder)"),
    ]
    channel, stub = _stub(server)
    with channel:
        for fields, status, message in cases:
            request = spb.ScoreSlideRequest(slide_uri="cmu.svs", model_name="ammasurv", genes=genes)
            for k, v in fields.items():
                if k == "genes":
                    del request.genes[:]
                    request.genes.extend(v)
                else:
                    setattr(request, k, v)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.ScoreSlide(request, timeout=60))
            assert caught.value.code().name == status, fields
            assert message in caught.value.details()


def test_describe_model_gives_the_serving_facts_a_client_needs(server, slide_repo):
    """Gene order, the training encoder and the µm/px, typed, without reading histosurv.json."""
    from histosurv.runtime.repository import ModelRepository

    repository = ModelRepository(slide_repo[0])
    model, encoder = repository.version("ammasurv"), repository.version("resnet18_encoder")
    channel, stub = _stub(server)
    with channel:
        described = stub.DescribeModel(spb.DescribeModelRequest(model_name="ammasurv"), timeout=30)
        assert (described.kind, described.architecture, described.version) == ("survival_model", "ammasurv", "1")
        assert list(described.gene_names) == model.gene_names and described.survival.kind == "cox"
        assert described.modalities["genes"] == "required" and described.patch_mpp == 0.5
        head = model.info.survival
        assert list(described.survival.times) == list(head.times) and list(described.survival.groups) == ["low", "high"]
        assert list(described.survival.cutoffs) == list(head.cutoffs) and described.survival.grouping == "median"
        assert "training patients" in described.survival.fitted_on
        trained = described.trained_on
        record = encoder.encoder_record
        assert (trained.architecture, trained.feature_dim, trained.patch_size, trained.mpp) == ("resnet18", 512, 256, 0.5)
        assert trained.weights.sha256 == record.weights.sha256 and list(trained.preprocessing.mean) == pytest.approx(record.preprocessing.mean)
        assert not trained.preprocessing.HasField("resize")  # fed as cut: unset, not 0
        described = stub.DescribeModel(spb.DescribeModelRequest(model_name="resnet18_encoder"), timeout=30)
        assert described.kind == "patch_encoder" and described.encoder.name == "resnet18_encoder"
        assert described.encoder.version == 1 and not described.HasField("trained_on") and not described.gene_names
        with pytest.raises(grpc.RpcError) as caught:
            stub.DescribeModel(spb.DescribeModelRequest(model_name="nope"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# cancellation and deadlines mid-encoding: tests/test_server_determinism.py (held by a hook, not timed)


# --- StreamFeatures on the tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tiny_repo, slides):
    store = ModelStore(tiny_repo)
    store.load_all()
    running = RunningServer(store, slides=SlideServiceConfig(roots=SlideRoots([slides[0]])), metrics_http=True)
    yield running
    running.stop()


def _tiny_bag(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    coords = (np.stack(np.divmod(np.arange(n), 100), axis=1) * 256).astype(np.int64)
    return features, coords, rng.standard_normal(24).astype(np.float32)


def _chunks(features, coords, genes, rows=1000, datatype="FP32", **header):
    dtype = {"FP32": "<f4", "FP16": "<f2"}[datatype]
    yield spb.FeatureChunk(model_name="ammasurv", datatype=datatype, feature_dim=features.shape[1], **header)
    for start in range(0, len(features), rows):
        yield spb.FeatureChunk(
            features=features[start : start + rows].astype(dtype).tobytes(), coords=coords[start : start + rows].tobytes()
        )
    yield spb.FeatureChunk(genes=genes)


def test_stream_features_equals_the_predictor_on_the_whole_bag(tiny_server, tiny_repo):
    features, coords, genes = _tiny_bag(5000)
    channel, stub = _stub(tiny_server)
    with channel:
        result = stub.StreamFeatures(_chunks(features, coords, genes, top_k=3, id="bag-7"), timeout=120)
        half = stub.StreamFeatures(_chunks(features, coords, genes, datatype="FP16"), timeout=120)
    expected = FusionPredictor.from_repository(tiny_repo, "ammasurv").slide(Bag(features, coords), genes)
    assert result.id == "bag-7" and result.n_patches == 5000
    assert result.risk == pytest.approx(expected.risk, rel=1e-6)
    best = np.argsort(-expected.attention, kind="stable")[:3]
    assert [p.index for p in result.top_patches] == list(best)
    assert [(p.x, p.y) for p in result.top_patches] == [tuple(coords[i]) for i in best]
    rounded = FusionPredictor.from_repository(tiny_repo, "ammasurv").slide(
        Bag(features.astype(np.float16).astype(np.float32), coords), genes
    )
    assert half.risk == pytest.approx(rounded.risk, rel=1e-6)


def _bad_stream(kind):
    features, coords, genes = _tiny_bag(50, seed=1)
    chunks = list(_chunks(features, coords, genes, rows=20))
    if kind == "no model":
        chunks[0].model_name = ""
    elif kind == "wrong width":
        chunks[0].feature_dim = 31
    elif kind == "datatype":
        chunks[0].datatype = "INT8"
    elif kind == "partial row":
        chunks[1].features = chunks[1].features[:-4]
    elif kind == "coords short":
        chunks[2].coords = chunks[2].coords[:-16]
    elif kind == "NaN":
        bad = features.copy()
        bad[7, 3] = np.nan
        chunks = list(_chunks(bad, coords, genes, rows=20))
    elif kind == "no genes":
        chunks = chunks[:-1]
    elif kind == "other model":
        chunks[2].model_name = "resnet18_encoder"
    elif kind == "unknown model":
        chunks[0].model_name = "nope"
    return iter(chunks)


@pytest.mark.parametrize(
    "kind, status, message",
    [
        ("no model", "INVALID_ARGUMENT", "the first chunk must name the model"),
        ("wrong width", "INVALID_ARGUMENT", "feature_dim is 31 but model 'ammasurv' takes 32-d features"),
        ("datatype", "INVALID_ARGUMENT", "datatype 'INT8' is not supported"),
        ("partial row", "INVALID_ARGUMENT", "is not whole rows of 32 FP32 values"),
        ("coords short", "INVALID_ARGUMENT", "'coords' must have shape"),
        ("NaN", "INVALID_ARGUMENT", "'features'"),
        ("no genes", "INVALID_ARGUMENT", "needs 'genes'"),
        ("other model", "INVALID_ARGUMENT", "but the stream is for 'ammasurv'"),
        ("unknown model", "NOT_FOUND", "model 'nope' is not loaded"),
    ],
)
def test_bad_streams_are_refused_by_name(tiny_server, kind, status, message):
    channel, stub = _stub(tiny_server)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.StreamFeatures(_bad_stream(kind), timeout=60)
        assert caught.value.code().name == status
        assert message in caught.value.details()
        assert stub.StreamFeatures(_chunks(*_tiny_bag(10)), timeout=60).n_patches == 10  # still serving
