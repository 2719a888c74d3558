"""KServe v2 over HTTP/REST beside gRPC: one table of good and bad requests, sent through both doors.

The same server answers tritonclient.grpc, tritonclient.http (binary data extension and JSON tensors)
and curl with hand-written JSON: the same risks, the same refusals by name (gRPC status <-> HTTP
status and ``{"error": ...}``), one set of statistics whichever door a request came in by.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

tritongrpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
tritonhttp = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402

from histosurv.runtime.server.models import ModelStore  # noqa: E402

from .serving import RunningServer, value  # noqa: E402

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("rest") / "model_repository"
    shutil.copytree(tiny_repo / "ammasurv", root / "ammasurv")
    store = ModelStore(root)
    store.load_all()
    running = RunningServer(store, model_control="explicit", metrics_http=True, http=True)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def clients(server):
    with tritongrpc.InferenceServerClient(server.url) as g, tritonhttp.InferenceServerClient(server.http_url) as h:
        yield {"grpc": g, "http": h}


def _bag(n: int = 12, seed: int = 3):
    rng = np.random.default_rng(seed)
    features = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    coords = (np.stack(np.divmod(np.arange(n), 5), axis=1) * 256).astype(np.int64)
    return features, coords, rng.standard_normal(24).astype(np.float32)


def _tensors(features, coords, genes, features_type="FP32"):
    return [("features", features, features_type), ("coords", coords, "INT64"), ("genes", genes, "FP32")]


def _case(kind: str):
    """(model, version, [(name, array, datatype)]) of each request of the table."""
    features, coords, genes = _bag()
    if kind == "good":
        return "ammasurv", "", _tensors(features, coords, genes)
    if kind == "missing input":
        return "ammasurv", "", _tensors(features, coords, genes)[:2]
    if kind == "extra input":
        return "ammasurv", "", [*_tensors(features, coords, genes), ("mask", np.ones(12, np.float32), "FP32")]
    if kind == "wrong datatype":
        return "ammasurv", "", _tensors(features.astype(np.int64), coords, genes, "INT64")
    if kind == "wrong rank":
        return "ammasurv", "", _tensors(features[None], coords, genes)
    if kind == "wrong width":
        return "ammasurv", "", _tensors(features[:, :31].copy(), coords, genes)
    if kind == "NaN":
        features[3, 4] = np.nan
        return "ammasurv", "", _tensors(features, coords, genes)
    if kind == "negative coords":
        coords[2] = (-256, 0)
        return "ammasurv", "", _tensors(features, coords, genes)
    if kind == "empty bag":
        return "ammasurv", "", _tensors(features[:0].copy(), coords[:0].copy(), genes)
    if kind == "lengths differ":
        return "ammasurv", "", _tensors(features, coords[:10].copy(), genes)
    if kind == "genes out of range":
        genes[3] = 3e38
        return "ammasurv", "", _tensors(features, coords, genes)
    if kind == "unknown model":
        return "nope", "", _tensors(features, coords, genes)
    if kind == "unknown version":
        return "ammasurv", "7", _tensors(features, coords, genes)
    raise AssertionError(kind)


BAD = [  # kind, gRPC status, HTTP status, message (both doors)
    ("missing input", "INVALID_ARGUMENT", 400, "missing input.*'genes'"),
    ("extra input", "INVALID_ARGUMENT", 400, "input 'mask' is not an input of this model"),
    ("wrong datatype", "INVALID_ARGUMENT", 400, "input 'features' must be FP32, got datatype 'INT64'"),
    ("wrong rank", "INVALID_ARGUMENT", 400, "'features' must have 2 dimensions"),
    ("wrong width", "INVALID_ARGUMENT", 400, r"'features' must have shape \[-1, 32\]"),
    ("NaN", "INVALID_ARGUMENT", 400, "input 'features' contains NaN"),
    ("negative coords", "INVALID_ARGUMENT", 400, r"'coords' has a negative position \(-256\)"),
    ("empty bag", "INVALID_ARGUMENT", 400, "input 'features' is empty: a bag needs at least one patch"),
    ("lengths differ", "INVALID_ARGUMENT", 400, "inputs disagree on the number of patches: 'features' has 12, 'coords' has 10"),
    ("genes out of range", "INVALID_ARGUMENT", 400, r"'genes' is out of the range the model was trained on: GENE0003 = 3e\+38"),
    ("unknown model", "NOT_FOUND", 404, "model 'nope' is not loaded"),
    ("unknown version", "NOT_FOUND", 404, "model 'ammasurv' has no loaded version '7'"),
]


def _infer(client, module, kind: str, binary: bool = True, outputs=None):
    model, version, tensors = _case(kind)
    inputs = []
    for name, array, datatype in tensors:
        tensor = module.InferInput(name, list(array.shape), datatype)
        if module is tritonhttp:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, model_version=version, outputs=outputs, request_id="case-1")


def _curl(server, method: str, path: str, body: bytes | None = None, *headers: str) -> tuple[int, bytes]:
    command = [CURL, "-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", f"http://{server.http_url}{path}"]
    for header in headers:
        command += ["-H", header]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    done = subprocess.run(command, input=body, capture_output=True, timeout=30, check=True)
    text, _, status = done.stdout.rpartition(b"\n")
    return int(status), text


def _json_body(kind: str) -> tuple[str, bytes]:
    """The infer request of a case as a user writes it by hand: JSON tensors, nested lists."""
    model, version, tensors = _case(kind)
    inputs = [{"name": n, "datatype": d, "shape": list(a.shape), "data": a.tolist()} for n, a, d in tensors]
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return path, json.dumps({"id": "curl-1", "inputs": inputs}).encode()


def test_health_and_metadata_agree_across_doors(clients):
    g, h = clients["grpc"], clients["http"]
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("ammasurv")
    assert not h.is_model_ready("ammasurv", "7") and not h.is_model_ready("nope")
    assert h.get_server_metadata() == g.get_server_metadata(as_json=True)
    meta = h.get_model_metadata("ammasurv")
    assert meta["inputs"][0] == {"name": "features", "datatype": "FP32", "shape": [-1, 32]}
    assert [t["name"] for t in meta["outputs"]] == [t["name"] for t in g.get_model_metadata("ammasurv", as_json=True)["outputs"]]
    assert h.get_model_config("ammasurv")["input"][1] == {"name": "coords", "data_type": "TYPE_INT64", "dims": [-1, 2]}
    assert {m["name"]: m["state"] for m in h.get_model_repository_index()} == {"ammasurv": "READY"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_good_request_gives_the_same_answer_through_every_door(clients, binary):
    expected = _infer(clients["grpc"], tritongrpc, "good")
    result = _infer(clients["http"], tritonhttp, "good", binary=binary)
    assert result.get_response()["id"] == "case-1"
    for name in ("risk", "attention", "survival", "risk_group"):
        np.testing.assert_array_equal(result.as_numpy(name), expected.as_numpy(name))
    only = _infer(clients["http"], tritonhttp, "good", binary, outputs=[tritonhttp.InferRequestedOutput("risk", binary_data=binary)])
    assert only.as_numpy("attention") is None and only.as_numpy("risk")[0] == expected.as_numpy("risk")[0]


@pytest.mark.parametrize("kind, status, http_status, message", BAD)
@pytest.mark.parametrize("door", ["grpc", "http", "http-json"])
def test_bad_requests_are_refused_alike_through_every_door(clients, door, kind, status, http_status, message):
    module = tritongrpc if door == "grpc" else tritonhttp
    with pytest.raises(InferenceServerException, match=message) as caught:
        _infer(clients[door.split("-")[0]], module, kind, binary=door == "http")
    assert caught.value.status() == (f"StatusCode.{status}" if door == "grpc" else str(http_status))
    assert clients[door.split("-")[0]].is_server_live()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_curl_with_hand_written_json_gets_the_same_answers(server, clients):
    assert _curl(server, "GET", "/v2/health/live")[0] == 200
    assert _curl(server, "GET", "/v2/health/ready")[0] == 200
    status, text = _curl(server, "POST", *_json_body("good"))
    expected = float(_infer(clients["grpc"], tritongrpc, "good").as_numpy("risk")[0])
    answer = json.loads(text)
    assert status == 200 and answer["id"] == "curl-1"
    assert np.float32(next(o for o in answer["outputs"] if o["name"] == "risk")["data"][0]) == np.float32(expected)
    for kind, _, http_status, message in BAD:
        status, text = _curl(server, "POST", *_json_body(kind))
        assert status == http_status, (kind, text)
        assert __import__("re").search(message, json.loads(text)["error"]), (kind, text)


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize(
    "body, headers, message",
    [
        (b"{not json", (), "request body is not JSON|JSON header of the infer request is not JSON"),
        (b'{"inputs": 3}', (), 'must be a JSON object with an "inputs" list'),
        (b'{"inputs": [{"name": "genes", "datatype": "FP32", "shape": [24], "data": ["a"]}]}', (), "data must be a .*list of FP32 numbers"),
        (b'{"inputs": [{"name": "genes", "datatype": "FP32", "shape": [24], "data": [1, 2]}]}', (), r"2 values in data, shape \[24\] needs 24"),
        (b'{"inputs": [{"name": "genes", "datatype": "FP32", "shape": [24], "parameters": {"binary_data_size": 96}}]}',
         ("Inference-Header-Content-Length: 90",), "binary_data_size is 96 bytes, only 0 are left"),
        (b'{"inputs": []}', ("Inference-Header-Content-Length: 999",), "is not a byte count within the"),
    ],
)
def test_malformed_rest_bodies_are_refused_by_name(server, body, headers, message):
    if headers and "90" in headers[0]:
        headers = (f"Inference-Header-Content-Length: {len(body)}",)
    status, text = _curl(server, "POST", "/v2/models/ammasurv/infer", body, *headers)
    assert status == 400 and __import__("re").search(message, json.loads(text)["error"]), text


def test_a_request_counts_once_whichever_door(server, clients):
    def counts():
        stats = clients["http"].get_inference_statistics("ammasurv")["model_stats"][0]
        samples = server.scrape()
        errors = value(samples, "histosurv_request_errors_total", model="ammasurv", rpc="ModelInfer", code="INVALID_ARGUMENT")
        return stats.get("inference_count", 0), errors

    before, errors_before = counts()
    _infer(clients["grpc"], tritongrpc, "good")
    _infer(clients["http"], tritonhttp, "good")
    _infer(clients["http"], tritonhttp, "good", binary=False)
    with pytest.raises(InferenceServerException):
        _infer(clients["http"], tritonhttp, "NaN")
    assert counts() == (before + 3, errors_before + 1)
    assert clients["grpc"].get_inference_statistics("ammasurv", as_json=True)["model_stats"][0]["inference_count"] == str(before + 3)


def test_repository_control_over_rest(clients):
    h = clients["http"]
    h.unload_model("ammasurv")
    assert not h.is_model_ready("ammasurv") and not clients["grpc"].is_model_ready("ammasurv")
    h.load_model("ammasurv")
    assert h.is_model_ready("ammasurv")
    with pytest.raises(InferenceServerException, match="no model 'nope'") as caught:
        h.load_model("nope")
    assert caught.value.status() == "404"


def test_score_slide_refusals_come_back_as_http_errors(server):
    body = json.dumps({"slide_uri": "/etc/passwd", "genes": [0.0] * 24}).encode()
    for accept in ("application/json", "text/event-stream"):
        status, text = _curl(server, "POST", "/v2/models/ammasurv/score_slide", body, f"Accept: {accept}")
        assert status in (400, 403) and "slide" in json.loads(text)["error"], text
    status, text = _curl(server, "POST", "/v2/models/ammasurv/score_slide", b'{"slide": 1}')
    assert status == 400 and "score_slide request" in json.loads(text)["error"]


def test_tokens_guard_rest_but_not_its_health_and_draining_refuses_new_calls(tiny_repo, tmp_path):
    store = ModelStore(tiny_repo)
    store.load_all()
    running = RunningServer(store, http=True, tokens=frozenset({"s3cret"}))
    try:
        with tritonhttp.InferenceServerClient(running.http_url) as h:
            assert h.is_server_live() and h.is_server_ready()
            with pytest.raises(InferenceServerException, match="missing bearer token") as caught:
                h.get_model_metadata("ammasurv")
            assert caught.value.status() == "401"
            with pytest.raises(InferenceServerException, match="bearer token not accepted"):
                h.get_model_metadata("ammasurv", headers={"Authorization": "Bearer nope"})
            assert h.get_model_metadata("ammasurv", headers={"Authorization": "Bearer s3cret"})["name"] == "ammasurv"
            import asyncio

            asyncio.run_coroutine_threadsafe(running.server.drain.drain(0), running.loop).result(10)
            with pytest.raises(InferenceServerException, match="shutting down") as caught:
                h.get_model_metadata("ammasurv", headers={"Authorization": "Bearer s3cret"})
            assert caught.value.status() == "503"
            assert h.is_server_live() and not h.is_server_ready()  # probes see the drain
    finally:
        running.stop()
