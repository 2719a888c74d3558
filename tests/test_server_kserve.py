"""The KServe v2 service on a real gRPC server on loopback, driven by tritonclient as labs drive Triton.

Every RPC is called; every bad request must come back INVALID_ARGUMENT or NOT_FOUND with a message
naming what is wrong, and the server must stay live afterwards.
"""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402

from histosurv.data.features import Bag  # noqa: E402
from histosurv.runtime.predict import FusionPredictor  # noqa: E402
from histosurv.runtime.server._proto import grpc_service_pb2 as pb  # noqa: E402
from histosurv.runtime.server._proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from histosurv.runtime.server.models import ModelStore  # noqa: E402

from .serving import RunningServer  # noqa: E402


@pytest.fixture(scope="module")
def repo(tiny_repo, tmp_path_factory):
    """The tiny AMMASurv model, plus a copy whose model.onnx is damaged (it must not load)."""
    root = tmp_path_factory.mktemp("served") / "model_repository"
    shutil.copytree(tiny_repo / "ammasurv", root / "ammasurv")
    shutil.copytree(tiny_repo / "ammasurv", root / "broken")
    damaged = root / "broken" / "1" / "model.onnx"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    return root


@pytest.fixture(scope="module")
def server(repo):
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store, model_control="explicit")
    yield running
    running.stop()


@pytest.fixture()
def client(server):
    with tritonclient.InferenceServerClient(server.url) as c:
        yield c


def _bag(n: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    coords = (np.stack(np.divmod(np.arange(n), 5), axis=1) * 256).astype(np.int64)
    genes = rng.standard_normal(24).astype(np.float32)
    return features, coords, genes


def _inputs(features, coords, genes, features_type="FP32"):
    tensors = []
    for name, array, datatype in (("features", features, features_type), ("coords", coords, "INT64"), ("genes", genes, "FP32")):
        t = tritonclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return tensors


def test_health_and_metadata(client, repo):
    # Triton's strict readiness: 'broken' was asked for and does not load, so the server is not ready
    assert client.is_server_live() and not client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "histosurv" and "model_repository" in meta["extensions"]
    assert client.is_model_ready("ammasurv") and client.is_model_ready("ammasurv", "1")
    assert not client.is_model_ready("ammasurv", "7") and not client.is_model_ready("broken")
    model = client.get_model_metadata("ammasurv", as_json=True)
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "features", "datatype": "FP32", "shape": ["-1", "32"]},
        {"name": "coords", "datatype": "INT64", "shape": ["-1", "2"]},
        {"name": "genes", "datatype": "FP32", "shape": ["24"]},
    ]
    config = client.get_model_config("ammasurv", as_json=True)["config"]
    assert config["platform"] == "onnxruntime_onnx" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["output"][1] == {"name": "attention", "data_type": "TYPE_FP32", "dims": ["-1"]}
    # the serving facts, as Triton carries model parameters: a client sends genes in this order
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    manifest = json.loads((repo / "ammasurv" / "histosurv.json").read_text())["versions"]["1"]
    assert json.loads(params["histosurv.gene_names"]) == manifest["genes"]["names"] and len(manifest["genes"]["names"]) == 24
    assert json.loads(params["histosurv.trained_on"]) == manifest["trained_on"]
    assert params["histosurv.kind"] == "survival_model" and json.loads(params["histosurv.survival_head"])["kind"] == "cox"


def test_infer_matches_the_runtime_predictor(client, repo):
    features, coords, genes = _bag(n=37)
    result = client.infer("ammasurv", _inputs(features, coords, genes), request_id="r-1")
    expected = FusionPredictor.from_repository(repo, "ammasurv").slide(Bag(features, coords), genes)
    assert result.get_response().id == "r-1"
    assert float(result.as_numpy("risk")[0]) == pytest.approx(expected.risk, rel=1e-6)
    np.testing.assert_allclose(result.as_numpy("attention"), expected.attention, rtol=1e-6)
    # only what is asked for comes back
    only_risk = client.infer("ammasurv", _inputs(features, coords, genes), outputs=[tritonclient.InferRequestedOutput("risk")])
    assert only_risk.as_numpy("attention") is None and only_risk.as_numpy("risk") is not None


def test_fp16_features_are_accepted_and_widened(client, repo):
    features, coords, genes = _bag(n=50, seed=1)
    half = client.infer("ammasurv", _inputs(features.astype(np.float16), coords, genes, "FP16"))
    exact = client.infer("ammasurv", _inputs(features.astype(np.float16).astype(np.float32), coords, genes))
    assert float(half.as_numpy("risk")[0]) == float(exact.as_numpy("risk")[0])


def test_typed_contents_give_the_same_answer_as_raw(server, client):
    features, coords, genes = _bag(n=9, seed=2)
    raw = float(client.infer("ammasurv", _inputs(features, coords, genes)).as_numpy("risk")[0])
    request = pb.ModelInferRequest(model_name="ammasurv")
    request.inputs.add(name="features", datatype="FP32", shape=list(features.shape)).contents.fp32_contents.extend(features.ravel())
    request.inputs.add(name="coords", datatype="INT64", shape=list(coords.shape)).contents.int64_contents.extend(coords.ravel())
    request.inputs.add(name="genes", datatype="FP32", shape=[24]).contents.fp32_contents.extend(genes)
    with grpc.insecure_channel(server.url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    risk = np.frombuffer(response.raw_output_contents[0], "<f4")[0]
    assert risk == pytest.approx(raw, rel=1e-6)


def _bad(kind: str):
    features, coords, genes = _bag(n=12, seed=3)
    if kind == "missing input":
        return "ammasurv", "", _inputs(features, coords, genes)[:2]
    if kind == "extra input":
        extra = tritonclient.InferInput("mask", [12], "FP32")
        extra.set_data_from_numpy(np.ones(12, np.float32))
        return "ammasurv", "", [*_inputs(features, coords, genes), extra]
    if kind == "wrong datatype":
        return "ammasurv", "", _inputs(features.astype(np.int64), coords, genes, "INT64")
    if kind == "wrong rank":
        return "ammasurv", "", _inputs(features[None], coords, genes)
    if kind == "wrong width":
        return "ammasurv", "", _inputs(features[:, :31].copy(), coords, genes)
    if kind == "NaN":
        features[3, 4] = np.nan
        return "ammasurv", "", _inputs(features, coords, genes)
    if kind == "negative coords":
        coords[2] = (-256, 0)
        return "ammasurv", "", _inputs(features, coords, genes)
    if kind == "coords off any slide":
        coords[5] = (2**62, 0)
        return "ammasurv", "", _inputs(features, coords, genes)
    if kind == "empty bag":
        return "ammasurv", "", _inputs(features[:0].copy(), coords[:0].copy(), genes)
    if kind == "lengths differ":
        return "ammasurv", "", _inputs(features, coords[:10].copy(), genes)
    if kind == "unknown model":
        return "nope", "", _inputs(features, coords, genes)
    if kind == "unknown version":
        return "ammasurv", "7", _inputs(features, coords, genes)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, status, message",
    [
        ("missing input", "INVALID_ARGUMENT", "missing input.*'genes'"),
        ("extra input", "INVALID_ARGUMENT", "input 'mask' is not an input of this model"),
        ("wrong datatype", "INVALID_ARGUMENT", "input 'features' must be FP32, got datatype 'INT64'"),
        ("wrong rank", "INVALID_ARGUMENT", "'features' must have 2 dimensions"),
        ("wrong width", "INVALID_ARGUMENT", r"'features' must have shape \[-1, 32\]"),
        ("NaN", "INVALID_ARGUMENT", "input 'features' contains NaN"),
        ("negative coords", "INVALID_ARGUMENT", r"'coords' has a negative position \(-256\)"),
        ("coords off any slide", "INVALID_ARGUMENT", r"'coords' has a position of 4611686018427387904 px, beyond any slide"),
        ("empty bag", "INVALID_ARGUMENT", "input 'features' is empty: a bag needs at least one patch"),
        ("lengths differ", "INVALID_ARGUMENT", "inputs disagree on the number of patches: 'features' has 12, 'coords' has 10"),
        ("unknown model", "NOT_FOUND", "model 'nope' is not loaded"),
        ("unknown version", "NOT_FOUND", "model 'ammasurv' has no loaded version '7'"),
    ],
)
def test_bad_requests_are_refused_by_name_and_the_server_stays_live(client, kind, status, message):
    model, version, inputs = _bad(kind)
    with pytest.raises(InferenceServerException, match=message) as caught:
        client.infer(model, inputs, model_version=version)
    assert caught.value.status() == f"StatusCode.{status}"
    assert client.is_server_live()


def test_raw_bytes_that_do_not_fill_the_shape_are_refused(server):
    features, coords, genes = _bag(n=4)
    request = pb.ModelInferRequest(model_name="ammasurv")
    for name, array, datatype in (("features", features, "FP32"), ("coords", coords, "INT64"), ("genes", genes, "FP32")):
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    request.raw_input_contents[1] = request.raw_input_contents[1][:-8]
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'coords': raw contents are 56 bytes, shape [4, 2] of INT64 needs 64" in caught.value.details()


def _raw_request(arrays):
    request = pb.ModelInferRequest(model_name="ammasurv")
    for name, array, datatype in arrays:
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def _refusal(server, request) -> str:
    with grpc.insecure_channel(server.url) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details()


def test_a_tensor_sent_both_typed_and_raw_is_refused(server, client):
    features, coords, genes = _bag(n=4)
    request = _raw_request((("features", features, "FP32"), ("coords", coords, "INT64"), ("genes", genes, "FP32")))
    request.inputs[2].contents.fp32_contents.extend(genes.tolist())  # the protocol: one or the other
    assert "input 'genes' is sent both as typed contents and in raw_input_contents" in _refusal(server, request)
    assert client.is_server_live()


def test_huge_shapes_are_refused_with_their_true_size(server):
    features, coords, genes = _bag(n=4)
    request = _raw_request((("features", features, "FP32"), ("coords", coords, "INT64"), ("genes", genes, "FP32")))
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([2**62, 2**62])  # 2^124 elements: int64 arithmetic wraps this to 0 bytes
    details = _refusal(server, request)
    assert f"{2**124} elements, more than any request can carry" in details and "needs 0" not in details


def test_finite_inputs_never_give_a_non_finite_answer(client):
    """Genes of 3e38 are finite FP32 but beyond anything trained on: INVALID_ARGUMENT naming the gene.
    Features of +-3e38 overflow inside the graph: the NaN risk is an engine failure, never a success."""
    features, coords, genes = _bag(n=12, seed=5)
    huge_genes = genes.copy()
    huge_genes[3] = 3e38
    with pytest.raises(InferenceServerException, match=r"'genes' is out of the range the model was trained on: GENE0003 = 3e\+38") as caught:
        client.infer("ammasurv", _inputs(features, coords, huge_genes))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    failed_before = _failures(client)
    with pytest.raises(InferenceServerException, match="model 'ammasurv' produced non-finite risk") as caught:
        # +-3e38 in alternate columns: LayerNorm's variance overflows and the risk comes out NaN
        overflow = (np.where(np.arange(features.shape[1]) % 2, 3e38, -3e38) + 0 * features).astype(np.float32)
        client.infer("ammasurv", _inputs(overflow, coords, genes))
    assert caught.value.status() == "StatusCode.INTERNAL"
    assert _failures(client) == failed_before + 1
    assert client.is_server_live()


def _failures(client) -> int:
    stats = client.get_inference_statistics("ammasurv", as_json=True)["model_stats"][0]
    return int(stats.get("inference_stats", {}).get("fail", {}).get("count", 0))


def test_statistics_count_exactly_the_requests(client):
    def stats():
        s = client.get_inference_statistics("ammasurv", as_json=True)["model_stats"][0]
        inference = s.get("inference_stats", {})
        return int(s.get("inference_count", 0)), int(inference.get("fail", {}).get("count", 0))

    before_ok, before_fail = stats()
    features, coords, genes = _bag(n=15, seed=4)
    for _ in range(3):
        client.infer("ammasurv", _inputs(features, coords, genes))
    with pytest.raises(InferenceServerException):
        client.infer("ammasurv", _inputs(features, coords, genes)[:2])
    # a missing input is refused before inference: not a failed inference (Triton's meaning; issue 22)
    assert stats() == (before_ok + 3, before_fail)


def test_repository_index_load_and_unload(client):
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["ammasurv"]["state"] == "READY" and index["ammasurv"]["version"] == "1"
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "broken/1/model.onnx: sha256 does not match" in index["broken"]["reason"]
    client.unload_model("ammasurv")
    assert not client.is_model_ready("ammasurv")
    client.load_model("ammasurv")
    assert client.is_model_ready("ammasurv")
    with pytest.raises(InferenceServerException, match="failed to load 'broken'.*sha256") as caught:
        client.load_model("broken")
    assert caught.value.status() == "StatusCode.INTERNAL"
    with pytest.raises(InferenceServerException, match="not loaded") as caught:
        client.unload_model("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_load_and_unload_need_explicit_model_control(repo):
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store, model_control="none")
    try:
        with tritonclient.InferenceServerClient(running.url) as c:
            with pytest.raises(InferenceServerException, match="--model-control none") as caught:
                c.unload_model("ammasurv")
            assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert c.is_model_ready("ammasurv")
    finally:
        running.stop()
