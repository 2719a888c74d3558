"""`histosurv serve` as a user runs it: a process on loopback, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from .serving import ServeProcess, infer_inputs  # noqa: E402


@pytest.fixture()
def served(tiny_repo):
    process = ServeProcess(tiny_repo, "--grace", "60")
    yield process
    process.close()


def _inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "features": np.abs(rng.standard_normal((n, 32))).astype(np.float32),
        "coords": (np.stack(np.divmod(np.arange(n), 200), axis=1) * 256).astype(np.int64),
        "genes": rng.standard_normal(24).astype(np.float32),
    }
    return infer_inputs(arrays)


def test_health_reports_serving_and_reflection_lists_the_services(served):
    assert any(line.startswith("model ammasurv 1: READY") for line in served.log)
    with grpc.insecure_channel(served.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "histosurv.v1.SlideService", "grpc.health.v1.Health"} <= names
        # the inference service's schema is served from histosurv's own descriptors
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        response = next(stub.ServerReflectionInfo(iter([request])))
        assert response.file_descriptor_response.file_descriptor_proto
    with urllib.request.urlopen(served.metrics_url, timeout=10) as response:
        assert 'nv_inference_request_success{model="ammasurv",version="1"} 0' in response.read().decode()


def test_sigterm_finishes_every_accepted_request_then_exits(served):
    """Requests running when SIGTERM arrives complete; the process then exits cleanly."""
    n = 20_000  # about a second per request for the tiny model on one thread
    with tritonclient.InferenceServerClient(served.url) as client:
        expected = float(client.infer("ammasurv", _inputs(n)).as_numpy("risk")[0])

    def call(_):
        with tritonclient.InferenceServerClient(served.url) as c:
            return float(c.infer("ammasurv", _inputs(n)).as_numpy("risk")[0])

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, i) for i in range(6)]
        time.sleep(1.0)  # all six accepted: one running, five queued for the model's one instance
        assert not any(f.done() for f in futures), "requests finished before SIGTERM: the test proves nothing"
        served.proc.send_signal(signal.SIGTERM)
        served.wait_for("shutting down")
        with tritonclient.InferenceServerClient(served.url) as late:  # arrives after SIGTERM: refused
            with pytest.raises(InferenceServerException) as caught:
                late.infer("ammasurv", _inputs(10))
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        risks = [f.result(timeout=120) for f in futures]
    assert risks == [expected] * 6
    served.wait_for("stopped")
    assert served.proc.wait(30) == 0


def test_a_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    from histosurv.cli import build_parser
    from histosurv.cli.serve import apply_config, flags_given, options_from_args

    config = tmp_path / "serve.toml"
    config.write_text(
        f'repo = "{tmp_path}"\ngrpc-port = 9101\nmetrics-port = 9102\nmodel-control = "poll"\n'
        f'slide-root = ["{tmp_path}"]\nmax-delay-ms = 2\nno-batching = true\n'
    )
    argv = ["serve", "--config", str(config), "--grpc-port", "9201"]
    args = build_parser().parse_args(argv)
    options = options_from_args(apply_config(args.parser, args, flags_given(args.parser, argv[1:])))
    assert (options.grpc_port, options.metrics_port, options.model_control) == (9201, 9102, "poll")
    assert options.execution.max_delay == 0.002 and options.execution.batching is False
    assert options.slides.roots.roots == (str(tmp_path.resolve()),)

    config.write_text('grpc_prot = 1\n')
    bad = subprocess.run([sys.executable, "-m", "histosurv", "serve", "--config", str(config)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown setting 'grpc_prot'" in bad.stderr
    config.write_text('repo = "x"\nmodel-control = "sometimes"\n')
    bad = subprocess.run([sys.executable, "-m", "histosurv", "serve", "--config", str(config)], capture_output=True, text=True)
    assert bad.returncode == 2 and "'model-control' must be one of none, poll, explicit" in bad.stderr
