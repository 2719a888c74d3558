"""Prometheus metrics of a server: Triton's names and meanings, plus real histograms.

Dashboards and alerts written for Triton read ``nv_inference_*`` unchanged: the counters come from
the same per-version statistics that ``ModelStatistics`` returns, so the two can never disagree.
Triton reports latency only as cumulative sums, which cannot give percentiles nor be aggregated across replicas; the
``histosurv_*`` histograms can (``histogram_quantile`` over summed buckets). Triton's counters are
written by hand: prometheus_client would rename a counter ``x`` to ``x_total``.

``nv_inference_request_failure`` counts what Triton counts there: inference that the server failed to
do (REJECTED: queue full; CANCELED: the client went away or its deadline passed; BACKEND: the engine
failed or gave non-finite outputs). A request the server refused before inference (bad tensors, an
unknown model, a slide outside the roots) is the client's mistake, not the server's failure: it is
counted in ``histosurv_request_errors_total{code}`` alone, so a failure-ratio alert does not fire on
users' mistakes. That counter has every call that ended with a status other than OK, by gRPC code.

Each server owns a registry, so several servers in one process (tests, benchmarks) do not mix.
"""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric

from ..errors import StartupError

__all__ = ["ServerMetrics", "STAGES", "gpu_memory"]

STAGES = ("open", "mask", "read", "encode", "fuse")  # the pipeline stages with their own histogram

# Bucket edges in seconds: from a 1k-patch bag on a GPU (milliseconds) to a 64k-patch slide encoded on
# a CPU (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
PATCH_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# What Triton serves, and what every Prometheus release parses (prometheus_client's newer default,
# version=1.0.0, is refused by some scrapers).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """The metrics of one server. ``models`` returns the loaded models (name, version, stats) at
    scrape time; Triton's counters are read from their statistics. ``index`` returns the repository's
    (name, version, state, reason) rows (``ModelStore.index``) for ``histosurv_model_ready``."""

    def __init__(self, models: Callable[[], Iterable] = lambda: (), index: Callable[[], Iterable] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_errors = Counter(
            "histosurv_request_errors",
            "Calls that ended with a gRPC status other than OK, by code: client errors (INVALID_ARGUMENT, "
            "NOT_FOUND, ...) and server failures alike; model is empty where the call named no loaded model",
            ["model", "rpc", "code"], registry=self.registry,
        )
        self.request_seconds = Histogram(
            "histosurv_request_duration_seconds",
            "Time from receiving a request to sending its response, by RPC",
            ["model", "version", "rpc"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "histosurv_queue_duration_seconds",
            "Time a request waited for an engine (or a slide for a pipeline slot) before running",
            ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "histosurv_stage_duration_seconds",
            "Time per slide in each pipeline stage (read and encode overlap)",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.slide_patches = Histogram(
            "histosurv_slide_patches", "Tissue patches per scored slide or streamed bag",
            ["model"], buckets=PATCH_BUCKETS, registry=self.registry,
        )
        self.encoder_batch = Histogram(
            "histosurv_encoder_batch_size", "Patches per encoder run of the dynamic batcher",
            ["model"], buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.triton = _TritonCounters(models)
        self.registry.register(_MachineCollector())
        if index is not None:
            self.registry.register(_ReadinessCollector(index))
        self._http = None

    def observe_stages(self, model: str, seconds: dict) -> None:
        for stage in STAGES:
            if stage in seconds:
                self.stage_seconds.labels(model, stage).observe(seconds[stage])

    def render(self) -> bytes:
        """The whole exposition, in the Prometheus text format 0.0.4."""
        return (self.triton.render() + generate_latest(self.registry).decode()).encode()

    def start_http(self, host: str, port: int) -> int:
        """Serves ``/metrics`` on ``host:port`` (port 0: any free port) in a daemon thread; returns the port."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = metrics.render()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds would flood the server's log
                pass

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise StartupError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}; choose another port with --metrics-port "
                "(or leave metrics off)"
            ) from None
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self._http = (server, thread)
        return server.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(5)
            self._http = None


class _TritonCounters:
    """Triton's per-model counters and queue gauge, from each loaded version's statistics, written in
    the text format by hand so that the names stay exactly Triton's."""

    COUNTERS = {
        "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
        "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
        "nv_inference_count": "Number of inferences performed (a batch of n counts n)",
        "nv_inference_exec_count": "Number of model executions performed (batches)",
        "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
        "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
        "nv_inference_compute_input_duration_us": "Cumulative compute input duration in microseconds",
        "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
        "nv_inference_compute_output_duration_us": "Cumulative compute output duration in microseconds",
    }
    PENDING = "nv_inference_pending_request_count"
    REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

    def __init__(self, models: Callable[[], Iterable]):
        self.models = models

    def render(self) -> str:
        samples: dict[str, list] = {name: [] for name in (*self.COUNTERS, self.PENDING)}
        for model in self.models():
            labels = {"model": model.name, "version": str(model.version.version)}
            s = model.stats
            with s.lock:
                values = {
                    "nv_inference_request_success": s.success.count,
                    "nv_inference_count": s.inference_count,
                    "nv_inference_exec_count": s.execution_count,
                    "nv_inference_request_duration_us": (s.success.ns + s.fail.ns) // 1000,
                    "nv_inference_queue_duration_us": s.queue.ns // 1000,
                    "nv_inference_compute_input_duration_us": s.compute_input.ns // 1000,
                    "nv_inference_compute_infer_duration_us": s.compute_infer.ns // 1000,
                    "nv_inference_compute_output_duration_us": s.compute_output.ns // 1000,
                    self.PENDING: s.pending,
                }
                failures = dict(s.failures)
            for name, value in values.items():
                samples[name].append((labels, value))
            for reason in self.REASONS:
                samples["nv_inference_request_failure"].append(({**labels, "reason": reason}, failures.get(reason, 0)))
        lines = []
        for name, rows in samples.items():
            kind = "gauge" if name == self.PENDING else "counter"
            doc = self.COUNTERS.get(name, "Instantaneous number of pending requests awaiting execution per-model")
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{_labels(labels)} {int(value)}" for labels, value in rows]
        return "\n".join(lines) + "\n"


def _labels(labels: dict) -> str:
    def escape(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


class _ReadinessCollector:
    """``histosurv_model_ready{model, version}``: 1 for the version serving, 0 for a version that failed
    to load (listed beside the one still serving) or a model of the repository that is not loaded.
    ModelReady answers the same question per call; this is what an alert can watch."""

    def __init__(self, index: Callable[[], Iterable]):
        self.index = index

    def describe(self):
        return []

    def collect(self):
        ready = Metric("histosurv_model_ready", "Whether a model version is loaded and serving (1) or unavailable (0)", "gauge")
        for name, version, state, _reason in self.index():
            ready.add_sample(ready.name, {"model": name, "version": str(version)}, 1.0 if state == "READY" else 0.0)
        yield ready


class _MachineCollector:
    """Triton's CPU and GPU gauges; GPU ones only where a GPU is visible."""

    def __init__(self):
        self._cpu = _CpuUtilization()

    def describe(self):
        return []

    def collect(self):
        util = Metric("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge")
        util.add_sample(util.name, {}, self._cpu.sample())
        yield util
        total, available = _meminfo()
        if total:
            for name, value, doc in (
                ("nv_cpu_memory_total_bytes", total, "CPU total memory (RAM), in bytes"),
                ("nv_cpu_memory_used_bytes", total - available, "CPU used memory (RAM), in bytes"),
            ):
                m = Metric(name, doc, "gauge")
                m.add_sample(name, {}, value)
                yield m
        gpus = gpu_memory()
        if gpus:
            total_m = Metric("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge")
            used_m = Metric("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge")
            for uuid, total_b, used_b in gpus:
                total_m.add_sample(total_m.name, {"gpu_uuid": uuid}, total_b)
                used_m.add_sample(used_m.name, {"gpu_uuid": uuid}, used_b)
            yield total_m
            yield used_m


def gpu_memory() -> list[tuple[str, int, int]]:
    """(uuid, total bytes, used bytes) per visible GPU, through NVML where installed, else torch where
    it has CUDA; empty on a machine without a GPU (checked without importing torch on such a box)."""
    if not os.path.exists("/dev/nvidia0"):
        return []
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            out.append((uuid.decode() if isinstance(uuid, bytes) else uuid, int(info.total), int(info.used)))
        return out
    except Exception:  # no NVML: fall back on torch
        pass
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append((str(torch.cuda.get_device_properties(i).uuid), int(total), int(total - free)))
        return out
    except Exception:
        return []


def _meminfo() -> tuple[int, int]:
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError):
        return 0, 0


class _CpuUtilization:
    """Busy share of all CPUs since the previous scrape (from /proc/stat; 0 where it is absent)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    def sample(self) -> float:
        now = self._read()
        with self._lock:
            last, self._last = self._last, now
        if now is None or last is None or now[0] <= last[0]:
            return 0.0
        total, idle = now[0] - last[0], now[1] - last[1]
        return max(0.0, min(1.0, 1.0 - idle / total))
