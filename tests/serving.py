"""Real servers on loopback for the tests: in-process (RunningServer), or `histosurv serve` as a process
(ServeProcess); and a reader of the Prometheus text they serve."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request

from histosurv.runtime.server.app import create_server, set_serving
from histosurv.runtime.server.models import ModelStore

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class RunningServer:
    """A grpc.aio server (with its metrics endpoint) on its own event loop in a background thread,
    stopped inside that loop."""

    def __init__(self, store: ModelStore, model_control: str = "none", metrics_http: bool = False, http: bool = False, **options):
        """``http``: the KServe v2 REST routes too, on their own free port (``http_url``)."""
        self.store = store
        self.rest = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            server, port = create_server(store, "127.0.0.1:0", model_control, **options)
            await server.start()
            await set_serving(server, store.ready)
            if http:
                from histosurv.runtime.server.rest import RestServer, create_app

                self.rest = RestServer(create_app(server, options.get("tokens"), options.get("auth_health", False)))
                await self.rest.start("127.0.0.1", 0, options.get("tls"))
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.url = f"127.0.0.1:{self.port}"
        self.http_url = f"127.0.0.1:{self.rest.port}" if self.rest else None
        self.metrics = self.server.metrics
        self.metrics_url = None
        if metrics_http:
            self.metrics_url = f"http://127.0.0.1:{self.metrics.start_http('127.0.0.1', 0)}/metrics"

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """{(sample name, labels): value} from the real /metrics endpoint."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return parse_samples(response.read().decode())

    def stop(self) -> None:
        if self.rest is not None:
            asyncio.run_coroutine_threadsafe(self.rest.stop(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.server.slides.close()
        self.metrics.stop_http()


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """The sample with exactly these labels (0 where absent: a counter not yet created)."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


class ServeProcess:
    """``histosurv serve`` as a user starts it, on loopback and free ports, its log read line by line.
    ``command`` runs another installation's console script (default: this interpreter's histosurv)."""

    def __init__(self, repo, *extra: str, command: list[str] | None = None):
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "histosurv"]), "serve", "--repo", str(repo), "--host", "127.0.0.1",
             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HISTOSURV_THREADS": "1"},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self.wait_for("serving KServe v2 ").rsplit(" ", 1)[-1]
        self.metrics_url = self.wait_for("metrics on ").rsplit(" ", 1)[-1]

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.log.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r}; server said: {self.log}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def infer_inputs(arrays: dict) -> list:
    """tritonclient inputs for named arrays, with the KServe datatypes the models take (INT64 coords,
    FP32 otherwise)."""
    import tritonclient.grpc as tritonclient

    tensors = []
    for name, array in arrays.items():
        tensor = tritonclient.InferInput(name, list(array.shape), "INT64" if name == "coords" else "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors
