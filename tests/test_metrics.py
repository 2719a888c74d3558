"""The real /metrics endpoint: Triton's exact names and meanings, histograms that move by exactly
the number of requests sent, client errors kept apart from inference failures, and readiness."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
from tritonclient.utils import InferenceServerException  # noqa: E402

from histosurv.runtime.server.models import ModelStore  # noqa: E402

from .serving import RunningServer, value  # noqa: E402

TRITON_COUNTERS = [
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count", "nv_inference_exec_count",
    "nv_inference_request_duration_us", "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
]


@pytest.fixture(scope="module")
def server(tiny_repo):
    store = ModelStore(tiny_repo)
    store.load_all()
    running = RunningServer(store, metrics_http=True)
    yield running
    running.stop()


def _inputs(n: int, nan: bool = False):
    rng = np.random.default_rng(n)
    features = np.abs(rng.standard_normal((n, 32))).astype(np.float32)
    if nan:
        features[0, 0] = np.nan
    arrays = {
        "features": (features, "FP32"),
        "coords": ((np.stack(np.divmod(np.arange(n), 8), axis=1) * 256).astype(np.int64), "INT64"),
        "genes": (rng.standard_normal(24).astype(np.float32), "FP32"),
    }
    tensors = []
    for name, (array, datatype) in arrays.items():
        t = tritonclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return tensors


def test_triton_names_and_types_are_exact(server):
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    for name in TRITON_COUNTERS:
        assert f"# TYPE {name} counter\n" in text  # not name_total: dashboards query Triton's names
        assert f"{name}_total" not in text
    assert "# TYPE nv_inference_pending_request_count gauge\n" in text
    assert "# TYPE histosurv_request_duration_seconds histogram\n" in text
    assert value(server.scrape(), "nv_cpu_memory_total_bytes") > 0
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(server.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert caught.value.code == 404


def test_counters_and_histograms_move_by_exactly_the_requests_sent(server):
    labels = {"model": "ammasurv", "version": 1}
    before = server.scrape()
    with tritonclient.InferenceServerClient(server.url) as client:
        for n in (5, 17, 40, 64, 100):
            client.infer("ammasurv", _inputs(n))
        for _ in range(3):
            with pytest.raises(InferenceServerException):
                client.infer("ammasurv", _inputs(9, nan=True))
        stats = client.get_inference_statistics("ammasurv", as_json=True)["model_stats"][0]
    after = server.scrape()

    def delta(name, **extra):
        return value(after, name, **labels, **extra) - value(before, name, **labels, **extra)

    assert delta("nv_inference_request_success") == 5
    assert delta("nv_inference_count") == 5 and delta("nv_inference_exec_count") == 5
    # invalid input is the client's mistake: counted by code, not as an inference failure (Triton's meaning)
    for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
        assert delta("nv_inference_request_failure", reason=reason) == 0
    assert value(after, "histosurv_request_errors_total", model="ammasurv", rpc="ModelInfer", code="INVALID_ARGUMENT") - value(
        before, "histosurv_request_errors_total", model="ammasurv", rpc="ModelInfer", code="INVALID_ARGUMENT"
    ) == 3
    assert int(stats["inference_stats"]["fail"].get("count", 0)) == 0  # ModelStatistics agrees: no inference failed
    assert delta("histosurv_request_duration_seconds_count", rpc="ModelInfer") == 5
    assert delta("histosurv_queue_duration_seconds_count") == 5
    assert value(after, "nv_inference_pending_request_count", **labels) == 0
    # the histogram's +Inf bucket holds every request, and its sum is the time they took
    assert value(after, "histosurv_request_duration_seconds_bucket", **labels, rpc="ModelInfer", le="+Inf") == value(
        after, "histosurv_request_duration_seconds_count", **labels, rpc="ModelInfer"
    )
    assert 0 < delta("histosurv_request_duration_seconds_sum", rpc="ModelInfer") < 60
    # the Triton counters and ModelStatistics are one source: they agree exactly
    assert value(after, "nv_inference_request_success", **labels) == int(stats["inference_stats"]["success"]["count"])
    assert value(after, "nv_inference_count", **labels) == int(stats["inference_count"])
    assert value(after, "nv_inference_compute_infer_duration_us", **labels) == int(
        stats["inference_stats"]["compute_infer"]["ns"]
    ) // 1000


def test_a_full_queue_rejects_and_a_request_past_its_deadline_never_runs(tiny_repo):
    from concurrent.futures import ThreadPoolExecutor

    from histosurv.runtime.server.models import ExecutionConfig

    store = ModelStore(tiny_repo, execution=ExecutionConfig(instances=1, max_queue=1))
    store.load_all()
    running = RunningServer(store, metrics_http=True)
    labels = {"model": "ammasurv", "version": 1}
    # the first request is held on the engine thread until released: "one running, the next queued" is a
    # state the test sets up, whatever the speed of the machine
    gate, scheduler = threading.Event(), store.get("ammasurv").scheduler
    scheduler.before_run = gate.wait

    def call(timeout=None):
        with tritonclient.InferenceServerClient(running.url) as client:
            try:
                client.infer("ammasurv", _inputs(16), client_timeout=timeout)
                return "OK"
            except InferenceServerException as e:
                return e.status()

    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(call)
            _wait_pending(running, 0, running_too=True)
            queued = pool.submit(call)
            _wait_pending(running, 1)
            assert call() == "StatusCode.RESOURCE_EXHAUSTED"
            gate.set()
            assert first.result() == "OK" and queued.result() == "OK"
        # one request queued behind a held one, with a deadline that passes while it waits
        gate.clear()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call)
            _wait_pending(running, 0, running_too=True)
            assert call(timeout=0.2) == "StatusCode.DEADLINE_EXCEEDED"
            _until(lambda: value(running.scrape(), "nv_inference_request_failure", **labels, reason="CANCELED") == 1)
            gate.set()
            assert first.result() == "OK"
        metrics = running.scrape()
        assert value(metrics, "nv_inference_request_failure", **labels, reason="REJECTED") == 1
        assert value(metrics, "nv_inference_request_failure", **labels, reason="CANCELED") == 1
        assert value(metrics, "nv_inference_exec_count", **labels) == 3  # the timed-out request never ran
        assert value(metrics, "nv_inference_pending_request_count", **labels) == 0
        assert value(metrics, "histosurv_request_errors_total", model="ammasurv", rpc="ModelInfer", code="RESOURCE_EXHAUSTED") == 1
    finally:
        gate.set()
        running.stop()


def test_model_ready_is_one_for_the_version_serving_and_zero_for_a_failed_one(tiny_repo, tmp_path):
    import shutil

    from .test_model_control import add_version

    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repo / "ammasurv", repo / "ammasurv")
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store, metrics_http=True)
    try:
        assert value(running.scrape(), "histosurv_model_ready", model="ammasurv", version=1) == 1
        add_version(repo / "ammasurv", 2, corrupt=True)
        assert store.load("ammasurv", raise_errors=False) is None
        metrics = running.scrape()
        assert value(metrics, "histosurv_model_ready", model="ammasurv", version=1) == 1
        assert ("histosurv_model_ready", frozenset({("model", "ammasurv"), ("version", "2")})) in metrics
        assert value(metrics, "histosurv_model_ready", model="ammasurv", version=2) == 0
        store.unload("ammasurv")
        assert value(running.scrape(), "histosurv_model_ready", model="ammasurv", version=1) == 0
    finally:
        running.stop()


def _until(condition, seconds: float = 30) -> None:
    """Waits for a state the server reaches on its own (a cancellation counted after the client gave up)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the server never reached the expected state")
        time.sleep(0.02)


def _wait_pending(running, pending: int, running_too: bool = False) -> None:
    """Until the model has ``pending`` requests queued (and, with ``running_too``, one running)."""
    model = running.store.get("ammasurv")
    _until(lambda: model.stats.pending == pending and (not running_too or model.scheduler.waiting == pending + 1))


def test_every_metric_the_alerts_and_dashboard_read_is_served(server):
    """An alert on a name the server does not export would never fire, silently."""
    import json
    import re
    from pathlib import Path

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    sources = [(deploy / "prometheus" / "alerts.yml").read_text(), json.dumps(json.load(open(deploy / "grafana" / "histosurv.json")))]
    names = {n for source in sources for n in re.findall(r"\b((?:nv|histosurv)_[a-z_]+)", source)}
    from histosurv.runtime.metrics import gpu_memory

    def served(name: str) -> bool:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        return f"# TYPE {name} " in text or f"# TYPE {family} histogram" in text

    exempt = () if gpu_memory() else ("nv_gpu_",)  # GPU gauges exist only where a GPU is visible
    missing = [n for n in sorted(names) if not served(n) and not n.startswith(exempt)]
    assert {"histosurv_model_ready", "histosurv_request_errors_total"} <= names and not missing, missing
