"""The access log (``serve --access-log``) on a real loopback server: one JSON line per call, good and
bad, with the fields an operator greps for; lines whole under concurrent calls; and calls that end
with an error counted by gRPC code in ``histosurv_request_errors_total``, never as inference failures."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import grpc
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402

from histosurv.runtime.server._proto import slide_service_pb2 as spb  # noqa: E402
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc  # noqa: E402
from histosurv.runtime.server.access_log import AccessLog, _peer_ip  # noqa: E402
from histosurv.runtime.server.models import ModelStore  # noqa: E402

from .serving import RunningServer, ServeProcess, value  # noqa: E402
from .test_metrics import _inputs  # noqa: E402

FIELDS = {"time", "request_id", "peer", "model", "version", "rpc", "patches", "status", "queue_ms", "compute_ms", "total_ms"}


def _served(tiny_repo, path):
    store = ModelStore(tiny_repo)
    store.load_all()
    log = AccessLog(str(path))
    return RunningServer(store, metrics_http=True, access_log=log), log


def _stream(n: int, request_id: str = "", nan: bool = False):
    rng = np.random.default_rng(n)
    features = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    if nan:
        features[1, 1] = np.nan
    coords = (np.stack(np.divmod(np.arange(n), 8), axis=1) * 256).astype(np.int64)
    yield spb.FeatureChunk(model_name="ammasurv", feature_dim=32, id=request_id)
    yield spb.FeatureChunk(features=features.tobytes(), coords=coords.tobytes(), genes=rng.standard_normal(24).astype(np.float32))


def _lines(path) -> list[dict]:
    lines = path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole JSON, or this fails
    for line in parsed:
        assert set(line) - {"error"} == FIELDS, line
        assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
        assert line["total_ms"] >= 0 and line["request_id"]
    return parsed


def test_every_call_is_one_line_and_errors_are_counted_by_code(tiny_repo, tmp_path):
    path = tmp_path / "access.log"
    running, log = _served(tiny_repo, path)
    try:
        with tritonclient.InferenceServerClient(running.url) as client:
            client.infer("ammasurv", _inputs(40), request_id="good-1")
            with pytest.raises(InferenceServerException):
                client.infer("ammasurv", _inputs(9, nan=True), request_id="bad-nan")
            with pytest.raises(InferenceServerException):
                client.infer("nope", _inputs(5))
            client.get_model_metadata("ammasurv")
        with grpc.insecure_channel(running.url) as channel:
            stub = spb_grpc.SlideServiceStub(channel)
            assert stub.StreamFeatures(_stream(300, "bag-3"), timeout=60).n_patches == 300
            with pytest.raises(grpc.RpcError):
                stub.StreamFeatures(_stream(20, nan=True), timeout=60)
        metrics = running.scrape()
    finally:
        running.stop()
        log.close()
    lines = _lines(path)
    assert [(line["rpc"], line["status"]) for line in lines] == [
        ("ModelInfer", "OK"), ("ModelInfer", "INVALID_ARGUMENT"), ("ModelInfer", "NOT_FOUND"),
        ("ModelMetadata", "OK"), ("StreamFeatures", "OK"), ("StreamFeatures", "INVALID_ARGUMENT"),
    ]
    good, nan, unknown, _, streamed, bad_stream = lines
    assert good["request_id"] == "good-1" and good["peer"] == "127.0.0.1"
    assert (good["model"], good["version"], good["patches"]) == ("ammasurv", "1", 40)
    assert good["compute_ms"] > 0 and good["queue_ms"] >= 0 and good["total_ms"] >= good["compute_ms"]
    assert nan["request_id"] == "bad-nan" and "NaN" in nan["error"] and nan["compute_ms"] is None
    assert unknown["model"] == "" and "not loaded" in unknown["error"]  # a made-up name never becomes a label
    assert (streamed["request_id"], streamed["patches"], streamed["model"]) == ("bag-3", 300, "ammasurv")
    assert len({line["request_id"] for line in lines}) == len(lines)  # generated where the client sent none
    assert bad_stream["patches"] == 20
    # client errors: counted by code, and not as inference failures
    errors = {code: value(metrics, "histosurv_request_errors_total", model=model, rpc=rpc, code=code)
              for model, rpc, code in [("ammasurv", "ModelInfer", "INVALID_ARGUMENT"), ("", "ModelInfer", "NOT_FOUND")]}
    assert errors == {"INVALID_ARGUMENT": 1, "NOT_FOUND": 1}
    assert value(metrics, "histosurv_request_errors_total", model="ammasurv", rpc="StreamFeatures", code="INVALID_ARGUMENT") == 1
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert value(metrics, "nv_inference_request_failure", model="ammasurv", version=1, reason=reason) == 0
    assert value(metrics, "nv_inference_request_success", model="ammasurv", version=1) == 2


def test_concurrent_calls_never_interleave_lines(tiny_repo, tmp_path):
    path = tmp_path / "access.log"
    running, log = _served(tiny_repo, path)

    def calls(worker: int) -> None:
        with tritonclient.InferenceServerClient(running.url) as client:
            for i in range(12):
                try:
                    client.infer("ammasurv", _inputs(8 + i, nan=i % 3 == 0), request_id=f"w{worker}-{i}")
                except InferenceServerException:
                    pass

    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(calls, range(6)))
    finally:
        running.stop()
        log.close()
    lines = _lines(path)
    assert sorted(line["request_id"] for line in lines) == sorted(f"w{w}-{i}" for w in range(6) for i in range(12))
    assert sum(line["status"] == "INVALID_ARGUMENT" for line in lines) == 6 * 4
    assert log.dropped == 0


def test_serve_writes_the_access_log_to_stdout_with_the_flag(tiny_repo):
    server = ServeProcess(tiny_repo, "--access-log", "-")
    try:
        with tritonclient.InferenceServerClient(server.url) as client:
            client.infer("ammasurv", _inputs(12), request_id="cli-1")
        line = json.loads(server.wait_for('{"time"'))
        assert (line["request_id"], line["rpc"], line["status"], line["patches"]) == ("cli-1", "ModelInfer", "OK", 12)
    finally:
        server.close()


@pytest.mark.parametrize("peer, ip", [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"), ("ipv6:[::1]:51234", "::1"), ("ipv6:%5B::1%5D:51234", "::1"),
    ("unix:/tmp/histosurv.sock", "/tmp/histosurv.sock"),
])
def test_the_peer_is_its_address_without_the_port(peer, ip):
    assert _peer_ip(peer) == ip
