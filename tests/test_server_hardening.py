"""Server hardening (issue 22), on real servers on loopback: strict readiness, the newest version that
loads served at start-up, poll mode reloading only what would serve, health open or behind tokens
alike, model-control requests confined to the repository, no server paths in remote errors, and the
start-up warnings for a server reachable beyond loopback."""

from __future__ import annotations

import asyncio
import shutil
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histosurv.runtime.server._proto import grpc_service_pb2 as pb
from histosurv.runtime.server._proto import grpc_service_pb2_grpc as pb_grpc
from histosurv.runtime.server.app import INFERENCE_SERVICE, poll_repository
from histosurv.runtime.server.models import ModelStore
from histosurv.runtime.server.security import exposure_warnings

from .serving import RunningServer, ServeProcess
from .test_model_control import _wait, add_version

TOKEN = "hardening-test-token"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _copy_model(tiny_repo, repo, name: str = "ammasurv"):
    shutil.copytree(tiny_repo / "ammasurv", repo / name)
    return repo / name


def _damage(version_dir) -> None:
    onnx = version_dir / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # a copy cut short


def _health(channel, service: str = "", metadata=None):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata, timeout=10).status


# --- strict readiness ---------------------------------------------------------------------------------


def test_a_configured_model_that_failed_to_load_makes_the_server_not_ready(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    _copy_model(tiny_repo, repo)
    _damage(_copy_model(tiny_repo, repo, "broken") / "1")  # its only version: nothing of it can serve
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store, model_control="explicit")
    try:
        with grpc.insecure_channel(running.url) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            assert not kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert kserve.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert kserve.ModelReady(pb.ModelReadyRequest(name="ammasurv"), timeout=10).ready
            assert not kserve.ModelReady(pb.ModelReadyRequest(name="broken"), timeout=10).ready
            assert _health(channel) == NOT_SERVING and _health(channel, INFERENCE_SERVICE) == NOT_SERVING

            # repaired and loaded by a client: every configured model serves, and health follows at once
            shutil.copy(repo / "ammasurv" / "1" / "model.onnx", repo / "broken" / "1" / "model.onnx")
            kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=60)
            assert kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
            assert _health(channel) == SERVING and _health(channel, INFERENCE_SERVICE) == SERVING

            # a model unloaded on purpose is no longer configured; unloading the last one leaves nothing to serve
            kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"), timeout=10)
            assert kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready and _health(channel) == SERVING
            kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ammasurv"), timeout=10)
            assert not kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready and _health(channel) == NOT_SERVING
    finally:
        running.stop()


def test_start_up_serves_the_newest_version_that_loads(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    model = _copy_model(tiny_repo, repo)
    add_version(model, 2)
    add_version(model, 3, corrupt=True)
    store = ModelStore(repo)
    store.load_all()
    assert store.get("ammasurv").version.version == 2 and store.ready
    rows = {version: (state, reason) for name, version, state, reason in store.index()}
    assert rows["2"] == ("READY", "")
    assert rows["3"][0] == "UNAVAILABLE" and "sha256 does not match" in rows["3"][1]


def test_serve_warns_of_the_damaged_version_and_of_a_server_open_beyond_loopback(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    add_version(_copy_model(tiny_repo, repo), 2, corrupt=True)
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    served = ServeProcess(repo, "--host", "0.0.0.0", "--auth-token-file", str(tokens))
    try:
        log = "\n".join(served.log)
        assert "warning: model ammasurv: version 2 does not load" in log and "sha256 does not match" in log
        assert "serving version 1 instead" in log
        assert "without TLS" in log and "bearer tokens are accepted over plaintext" in log
        port = served.url.rsplit(":", 1)[-1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            assert kserve.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # open health, and ready
            assert kserve.ModelReady(pb.ModelReadyRequest(name="ammasurv", version="1"), timeout=10).ready
    finally:
        served.close()


def test_poll_mode_does_not_reload_the_serving_version_when_another_folder_changes(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    model = _copy_model(tiny_repo, repo)
    store = ModelStore(repo)
    store.load_all()
    serving = store.get("ammasurv")
    scans = []
    lock = threading.Lock()

    async def scanned():
        with lock:
            scans.append(1)

    running = RunningServer(store)
    poller = asyncio.run_coroutine_threadsafe(poll_repository(store, 0.05, scanned), running.loop)
    try:
        _wait(lambda: len(scans) >= 1)  # the poller has taken its first look
        # an export of version 2 being written (not yet in the manifest), and a stray file in an old folder
        (model / "2").mkdir()
        (model / "2" / "model.onnx").write_bytes(b"half written")
        (model / "1" / "notes.txt").write_text("copied by hand")
        start = len(scans)
        _wait(lambda: len(scans) >= start + 3)
        assert store.get("ammasurv") is serving  # the same loaded model: not reloaded
        shutil.rmtree(model / "2")
        add_version(model, 2)  # a real new version: it replaces the serving one
        _wait(lambda: store.get("ammasurv").version.version == 2)
    finally:
        poller.cancel()
        running.stop()


# --- tokens on health ---------------------------------------------------------------------------------


HEALTH_CALLS = {
    "grpc.health": lambda channel, md: _health(channel, "", md),
    "ServerLive": lambda channel, md: pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=10),
    "ServerReady": lambda channel, md: pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=10),
    "ModelReady": lambda channel, md: pb_grpc.GRPCInferenceServiceStub(channel).ModelReady(
        pb.ModelReadyRequest(name="ammasurv"), metadata=md, timeout=10
    ),
}


@pytest.fixture(scope="module")
def tiny_store(tiny_repo):
    store = ModelStore(tiny_repo)
    store.load_all()
    return store


@pytest.mark.parametrize("auth_health", [False, True], ids=["health-open", "health-restricted"])
def test_every_health_endpoint_needs_a_token_alike(tiny_store, auth_health):
    running = RunningServer(tiny_store, tokens=frozenset({TOKEN}), auth_health=auth_health)
    token = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(running.url) as channel:
            for name, call in HEALTH_CALLS.items():
                call(channel, token)  # with a token every one answers
                if auth_health:
                    with pytest.raises(grpc.RpcError) as caught:
                        call(channel, None)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                else:
                    call(channel, None)
            with pytest.raises(grpc.RpcError) as caught:  # anything else needs one either way
                pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop()


@pytest.mark.parametrize(
    "host, tls, tokens, expected",
    [
        ("127.0.0.1", False, False, []),
        ("localhost", False, True, []),
        ("::1", False, False, []),
        ("[::1]", False, False, []),
        ("0.0.0.0", True, True, []),
        ("0.0.0.0", False, False, ["without TLS", "without bearer tokens"]),
        ("::", True, False, ["without bearer tokens"]),
        ("192.168.1.20", False, True, ["without TLS", "bearer tokens are accepted over plaintext"]),
        ("lab-server.example", False, True, ["without TLS", "bearer tokens are accepted over plaintext"]),
    ],
)
def test_exposure_warnings_beyond_loopback(host, tls, tokens, expected):
    warnings = exposure_warnings(host, tls, tokens)
    assert len(warnings) == len(expected)
    for warning, words in zip(warnings, expected):
        assert words in warning and host.strip("[]") in warning


# --- model control confined to the repository ---------------------------------------------------------


def test_model_control_names_and_overrides_are_confined_to_the_repository(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    outside = _copy_model(tiny_repo, tmp_path, "outside")  # a valid model folder beside the repository
    _copy_model(tiny_repo, repo)
    store = ModelStore(repo)
    running = RunningServer(store, model_control="explicit")
    try:
        with grpc.insecure_channel(running.url) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            refused = {}
            for name in ("../outside", str(outside), "ammasurv/../../outside", ".", "..", "", "nope"):
                with pytest.raises(grpc.RpcError) as caught:
                    kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=60)
                refused[name] = caught.value
            assert not store.loaded()
            for name in ("../outside", str(outside), "ammasurv/../../outside", ".", "..", ""):
                assert refused[name].code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert refused["nope"].code() == grpc.StatusCode.NOT_FOUND
            assert str(repo) not in refused["nope"].details() and "ammasurv" in refused["nope"].details()

            for key, parameter in (
                ("config", pb.ModelRepositoryParameter(string_param=f'{{"default_model_filename": "{outside}/1/model.onnx"}}')),
                ("file:1/model.onnx", pb.ModelRepositoryParameter(bytes_param=b"not a model")),
            ):
                request = pb.RepositoryModelLoadRequest(model_name="ammasurv")
                request.parameters[key].CopyFrom(parameter)
                with pytest.raises(grpc.RpcError) as caught:
                    kserve.RepositoryModelLoad(request, timeout=60)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and key in caught.value.details()
            assert not store.loaded()

            with pytest.raises(grpc.RpcError) as caught:
                kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="../outside"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ammasurv"), timeout=60)
            assert [m.name for m in store.loaded()] == ["ammasurv"]
    finally:
        running.stop()


def test_load_failures_sent_to_clients_name_no_server_path(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    _damage(_copy_model(tiny_repo, repo) / "1")
    store = ModelStore(repo)
    running = RunningServer(store, model_control="explicit")
    try:
        with grpc.insecure_channel(running.url) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ammasurv"), timeout=60)
            index = kserve.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        for message in (caught.value.details(), *(m.reason for m in index.models)):
            assert str(tmp_path) not in message
        assert "ammasurv/1/model.onnx: sha256 does not match" in caught.value.details()
    finally:
        running.stop()
