"""The gRPC server under load: its overhead against the in-process engine, and what dynamic batching gains.

Why: a served model should cost little more than calling its engine directly, so the server's figures
are given as ratios against the same engine called in this process, measured in the same run; and the
dynamic encoder batcher is there to raise slide throughput, so ScoreSlide runs with and without it.

The servers (``python -m histosurv serve``) run in their own processes, started here on loopback with
``--grpc-port 0``; this process is only the load generator, so the clients' work (serialising tensors,
gRPC's client side) never shares a GIL with a server. They do share the machine's cores, as a client
on the same host would. Both servers (one with the batcher, one without) are started at the outset
and stay up; an idle server costs nothing. The model repository is built first, in a child process so
that torch never loads in the load generator: AMMASurv with its default config (d = 512 + 32, 8 heads,
depth 2, 16 gene tokens) for 200 genes, trained 1 epoch on a small synthetic cohort (quality is
irrelevant here), and the ResNet18 patch encoder (seeded random weights), both ONNX Runtime graphs.

1. ModelInfer on a 4k-patch bag (``tritonclient.grpc``: features FP32 [N, 512], coords INT64 [N, 2],
   genes FP32 [G]), on the batching server. The baseline is the same engine in this process
   (``FusionPredictor.from_repository(repo, "ammasurv").engine.run``), called as many times as the
   server gets requests at concurrency 1, and alternately with them (in-process, server, in-process,
   ...) so a change in the machine's background load hits both alike. Each further ``--concurrency``
   level runs that many threads, each with its own client, through a fixed number of requests
   (``--requests``). ``p50 / in-proc`` is the server's median latency at concurrency 1 over the
   in-process median: the server's overhead (decoding, queue, engine thread, encoding, gRPC both ways).
   ``thr / in-proc`` is requests/s over the in-process rate 1/mean: below 1, the server serves fewer
   bags per second than a plain loop over the engine. Every risk must equal the in-process risk (rel 1e-6).
2. ScoreSlide with and without the dynamic encoder batcher (``--max-batch 64 --max-delay-ms 20`` vs
   ``--no-batching``, both ``--batch-size 8 --max-active-slides 4``): rounds of ``--slide-concurrency``
   simultaneous calls, alternating between the two servers, until each has scored ``--slides`` copies
   of the demo SVS (2220 x 2967 Aperio, a few dozen tissue patches). slides/s is slides over the summed
   wall time of a server's rounds. The encoder's average batch is the delta of ``nv_inference_count``
   over ``nv_inference_exec_count`` for ``resnet18_encoder`` in /metrics. ``vs unbatched`` is slides/s
   over the unbatched server's. All risks must agree (rel 1e-5: ONNX Runtime's convolutions differ in
   the last bits between batch sizes).
3. A bounded closed-loop load on the batching server: ``--load-concurrency`` threads, each sending its
   next request when its last one returns, for ``--load-seconds``; three in four requests are
   ModelInfer on a 1k-patch bag, the fourth a health check (KServe ServerLive, ServerReady,
   grpc.health.v1 Check in turn). Reports requests, errors by status code, req/s and latency
   percentiles per kind, then checks that ``nv_inference_request_success`` for ammasurv moved by
   exactly the number of ModelInfer calls that succeeded.

Latency percentiles are numpy's (linear interpolation), so a p99 over few requests is near the
maximum. ``server CPU``, ``client CPU`` and ``other CPU`` are the CPU time of the server process, of
this process (the clients, or the in-process engine) and of everything else on the machine over the
wall time, in % of one core (200% = both cores of a 2-core machine): where ``other CPU`` is high, other
processes were competing and every figure of that row is slower for it. ``engine ms`` and
``queue ms`` are the server's own mean compute and queue time per request (Triton's cumulative
counters in /metrics). Nothing asserts a timing; the run fails (exit status 1) only if a request
errored or a parity or metrics check failed. Timings are only meaningful on an otherwise idle machine.

    python bench/server.py                      # about 4 minutes on an idle 2-core machine (more on a busy one)
    python bench/server.py --quick              # smoke run, 1-2 minutes
    python bench/server.py --repo /tmp/hs-repo --json /tmp/server.json   # builds /tmp/hs-repo once, then reuses it
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT.parents[1]))  # run from a checkout without installing

from _cli import args_json, positive_int_list  # noqa: E402
from _fixtures import ENCODER, MODEL, build_repository, ensure_repository, open_model  # noqa: E402
from _machine import (  # noqa: E402
    busy_cpu_seconds, format_load_average, host_facts, load_average, now, package_version, process_cpu_seconds,
)
from _report import cell, plural, print_aligned, problems_line, write_json  # noqa: E402

SERVER_START_TIMEOUT = 300.0
CALL_TIMEOUT = 900.0  # seconds a client allows one call: 32 queued 4k bags take a minute or more on 2 cores
HEALTH_KINDS = ("ServerLive", "ServerReady", "grpc.health")
SLIDE_BATCH = 8  # --batch-size: patches per read-ahead chunk, so a slide of a few dozen patches is several chunks
SLIDE_FLAGS = {"batched": ["--max-batch", "64", "--max-delay-ms", "20"], "unbatched": ["--no-batching"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, help="model repository to use; built there first if missing (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--quick", action="store_true", help="shrink every count for a smoke run (under 3 minutes)")
    p.add_argument("--bag", type=int, default=4096, help="part 1: patches in the ModelInfer bag")
    p.add_argument("--concurrency", type=positive_int_list, default=[1, 8, 32], help="part 1: client concurrency levels")
    p.add_argument("--requests", type=positive_int_list, default=[24, 48, 64],
                   help="part 1: requests per concurrency level (one number per level, or one for all); the "
                        "in-process baseline makes as many calls as the first level")
    p.add_argument("--slides", type=int, default=8, help="part 2: slides scored per server")
    p.add_argument("--slide-concurrency", type=int, default=4, help="part 2: ScoreSlide calls at once (and --max-active-slides)")
    p.add_argument("--load-seconds", type=float, default=30.0, help="part 3: duration of the load run")
    p.add_argument("--load-concurrency", type=int, default=16, help="part 3: requests in flight")
    p.add_argument("--load-bag", type=int, default=1024, help="part 3: patches per ModelInfer bag")
    p.add_argument("--health-every", type=int, default=4, help="part 3: every n-th request of a thread is a health check")
    p.add_argument("--door-bags", type=positive_int_list, default=[64, 4096],
                   help="part 4: bag sizes at which gRPC and REST are compared with the in-process engine")
    p.add_argument("--door-calls", type=int, default=15, help="part 4: calls per door and bag size")
    p.add_argument("--only-doors", action="store_true", help="run part 4 alone (one server, no slides)")
    p.add_argument("--build", metavar="REPO", help=argparse.SUPPRESS)  # _fixtures.ensure_repository's child
    args = p.parse_args(argv)
    if len(args.requests) == 1:
        args.requests = args.requests * len(args.concurrency)
    if len(args.requests) != len(args.concurrency):
        p.error(f"--requests gives {len(args.requests)} counts for {len(args.concurrency)} concurrency levels")
    if args.quick:  # at least one request per thread, so every level reaches its concurrency
        args.requests = [min(r, 3 if c == 1 else c) for c, r in zip(args.concurrency, args.requests)]
        args.slides = min(args.slides, args.slide_concurrency)
        args.load_seconds = min(args.load_seconds, 5.0)
        args.door_calls = min(args.door_calls, 3)
    return args


# --- the server processes --------------------------------------------------------------------------


class ServerProcess:
    """``python -m histosurv serve`` in a child process; a thread drains its log."""

    def __init__(self, label: str, repo: Path, flags: list[str]):
        self.label = label
        self.command = [sys.executable, "-m", "histosurv", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                        "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", *flags]
        self.log: list[str] = []
        self.url = self.metrics_url = self.http_url = None
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ps = psutil.Process(self.proc.pid)
        lines: queue.Queue = queue.Queue()
        self._drain = threading.Thread(target=self._read, args=(lines,), daemon=True)
        self._drain.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while self.url is None or self.metrics_url is None or self.http_url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:  # the log ended (the server exited) or the deadline passed
                self.stop()
                raise SystemExit(f"server {label} did not start ({' '.join(self.command[2:])}):\n" + "".join(self.log[-30:]))
            if line.startswith("serving KServe v2 "):
                self.url = line.split()[-1]
            elif line.startswith("serving REST "):
                self.http_url = line.split()[-1].split("://", 1)[1]
            elif line.startswith("metrics on "):
                self.metrics_url = line.split()[-1]
        self.start_seconds = time.perf_counter() - started
        print(f"server {label} up in {self.start_seconds:.1f} s at {self.url}: {' '.join(self.command[3:])}", flush=True)

    def _read(self, lines: queue.Queue) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            lines.put(line)
        lines.put(None)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.ps)

    def scrape(self) -> dict:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            return parse_samples(response.read().decode())

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited 30 s later; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                print(f"server {self.label} did not exit 30 s after SIGTERM; killing it", flush=True)
                self.proc.kill()
                self.proc.wait(30)
        self._drain.join(5)
        return self.proc.returncode


class CpuAccount:
    """Wall time and CPU time summed over the stretches measured with :meth:`measure`: the server
    process's, this process's (the clients, or the in-process engine) and everything else's."""

    def __init__(self, server: ServerProcess):
        self.server, self.me = server, psutil.Process()
        self.wall = self.srv = self.own = self.other = 0.0

    @contextmanager
    def measure(self):
        wall, busy, srv, own = time.perf_counter(), busy_cpu_seconds(), self.server.cpu_seconds(), process_cpu_seconds(self.me)
        try:
            yield
        finally:
            srv, own = self.server.cpu_seconds() - srv, process_cpu_seconds(self.me) - own
            self.other += max(0.0, busy_cpu_seconds() - busy - srv - own)
            self.srv, self.own = self.srv + srv, self.own + own
            self.wall += time.perf_counter() - wall

    @property
    def percent(self) -> dict:
        """% of one core over the wall time."""
        w = self.wall or float("nan")
        return {"server": 100 * self.srv / w, "client": 100 * self.own / w, "other": 100 * self.other / w}


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value} from the Prometheus text format."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if match:
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, frozenset((k, str(v)) for k, v in labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


# --- clients ----------------------------------------------------------------------------------------


def make_bag(n: int, n_genes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1]  # (x, y) on a square patch grid
    return {
        "features": rng.standard_normal((n, 512), dtype=np.float32),
        "coords": (grid * 256).astype(np.int64),
        "genes": rng.standard_normal(n_genes).astype(np.float32),
    }


def infer_inputs(bag: dict[str, np.ndarray]) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, datatype in (("features", "FP32"), ("coords", "INT64"), ("genes", "FP32")):
        tensor = grpcclient.InferInput(name, list(bag[name].shape), datatype)
        tensor.set_data_from_numpy(bag[name])
        inputs.append(tensor)
    return inputs


def infer_client(url: str):
    """A tritonclient connection, connected before any clock starts."""
    import tritonclient.grpc as grpcclient

    conn = grpcclient.InferenceServerClient(url)
    conn.is_server_live()
    return conn


def error_code(e: BaseException) -> str:
    """The gRPC status name of a failed call (UNAVAILABLE, RESOURCE_EXHAUSTED, ...)."""
    status = getattr(e, "status", None)
    if callable(status):  # tritonclient's InferenceServerException: "StatusCode.UNAVAILABLE"
        return str(status() or type(e).__name__).split(".")[-1]
    code = getattr(e, "code", None)
    if callable(code):  # grpc.RpcError
        return code().name
    return type(e).__name__


def summarise(latencies_ms: list[float]) -> dict:
    if not latencies_ms:
        return {"n": 0}
    a = np.asarray(latencies_ms)
    return {"n": len(a), "mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


class Tally:
    """Latencies per kind of call, errors by status code and parity failures, shared by client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []  # the first few error messages and mismatches, printed and kept

    def ok(self, kind: str, ms: float) -> None:
        with self.lock:
            self.latencies.setdefault(kind, []).append(ms)

    def error(self, kind: str, e: BaseException) -> None:
        key = f"{kind} {error_code(e)}"
        self._count(key, f"{key}: {str(e)[:300]}")

    def mismatch(self, what: str) -> None:
        self._count("parity", what)

    def _count(self, key: str, message: str) -> None:
        with self.lock:
            self.errors[key] = self.errors.get(key, 0) + 1
            if len(self.samples) < 5:
                self.samples.append(message)
                print(f"    ! {message}", flush=True)

    def n(self, kind: str) -> int:
        return len(self.latencies.get(kind, []))


def run_threads(n_threads: int, target, on_release=None) -> float:
    """Runs ``target(i, barrier)`` in ``n_threads`` threads, each waiting on the barrier once ready (so
    connecting is not timed); returns the seconds from the barrier's release to the last thread's end.
    ``on_release`` runs as the barrier opens."""
    barrier = threading.Barrier(n_threads + 1, action=on_release)
    threads = [threading.Thread(target=target, args=(i, barrier), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=120)  # a client that cannot connect breaks the barrier instead of hanging the run
    except threading.BrokenBarrierError:
        raise SystemExit("the client threads did not all connect within 120 s (see their tracebacks above)") from None
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def rel_close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def first_risk(result) -> float:
    return float(np.asarray(result).reshape(-1)[0])


# --- part 1: ModelInfer against the in-process engine -----------------------------------------------


def part_infer(server: ServerProcess, engine, args, n_genes: int) -> dict:
    bag = make_bag(args.bag, n_genes, seed=1)
    risk = first_risk(engine.run(bag)["risk"])  # also the in-process warm-up (ORT's lazy initialisation)
    conn = infer_client(server.url)
    inputs = infer_inputs(bag)
    conn.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT)  # the server's first run of the engine
    levels = list(zip(args.concurrency, args.requests))
    calls = levels[0][1]
    interleaved = levels[0][0] == 1
    base_cpu, base_ms = CpuAccount(server), []
    tally, c1_cpu = Tally(), CpuAccount(server)
    what = f"alternately with {calls} server calls at concurrency 1" if interleaved else "alone"
    print(f"[1] in-process engine, {calls} calls on a {args.bag}-patch bag, {what} ...", flush=True)
    before = server.scrape()
    for _ in range(calls):
        with base_cpu.measure():
            start = time.perf_counter()
            engine.run(bag)
            base_ms.append((time.perf_counter() - start) * 1e3)
        if interleaved:
            with c1_cpu.measure():
                _infer_once(conn, inputs, risk, tally)
    after = server.scrape()
    conn.close()
    base = {"label": "in-process", "concurrency": 1, "requests": calls, "errors": 0, **summarise(base_ms),
            "engine_ms": statistics.fmean(base_ms), "cpu_percent": base_cpu.percent}
    base["req_per_s"] = 1e3 / base["mean_ms"]
    rows = [base]
    if interleaved:
        rows.append(_level_row(1, calls, tally, c1_cpu.wall, before, after, c1_cpu.percent))
        levels = levels[1:]
    for concurrency, requests in levels:
        print(f"[1] server, {requests} ModelInfer at concurrency {concurrency} ...", flush=True)
        rows.append(infer_level(server, bag, concurrency, requests, risk))
    for row in rows[1:]:
        row["throughput_vs_in_process"] = row["req_per_s"] / base["req_per_s"]
        if row["concurrency"] == 1 and row.get("n"):  # at higher levels the median is mostly time in the queue
            row["p50_vs_in_process"] = row["p50_ms"] / base["p50_ms"]
    for row in rows:
        print(f"    {row['label']}: p50 {row.get('p50_ms', float('nan')):.1f} ms, {row['req_per_s']:.3f} req/s, "
              f"errors {row['errors']}", flush=True)
    return {"bag": args.bag, "in_process_risk": risk, "interleaved": interleaved, "rows": rows}


def _infer_once(conn, inputs: list, risk: float, tally: Tally) -> None:
    start = time.perf_counter()
    try:
        result = conn.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - every failure is counted by its status code
        tally.error("ModelInfer", e)
        return
    tally.ok("ModelInfer", (time.perf_counter() - start) * 1e3)
    got = first_risk(result.as_numpy("risk"))
    if not rel_close(got, risk, 1e-6):
        tally.mismatch(f"ModelInfer risk {got!r} != in-process {risk!r}")


def infer_level(server: ServerProcess, bag: dict, concurrency: int, requests: int, risk: float) -> dict:
    tally, counter, cpu = Tally(), itertools.count(), CpuAccount(server)

    def client(_: int, barrier: threading.Barrier) -> None:
        conn, inputs = infer_client(server.url), infer_inputs(bag)
        barrier.wait()
        while next(counter) < requests:
            _infer_once(conn, inputs, risk, tally)
        conn.close()

    before = server.scrape()
    with cpu.measure():
        wall = run_threads(concurrency, client)
    after = server.scrape()
    return _level_row(concurrency, requests, tally, wall, before, after, cpu.percent)


def _level_row(concurrency: int, requests: int, tally: Tally, wall: float, before: dict, after: dict, cpu: dict) -> dict:
    lat = tally.latencies.get("ModelInfer", [])
    row = {"label": f"server c={concurrency}", "concurrency": concurrency, "requests": requests,
           "errors": sum(tally.errors.values()), "error_breakdown": dict(tally.errors), "error_samples": tally.samples,
           "wall_s": wall, **summarise(lat), "req_per_s": len(lat) / wall if wall else 0.0, "cpu_percent": cpu}
    done = delta(before, after, "nv_inference_request_success", model=MODEL, version=1)
    if done:  # the server's own account (Triton's cumulative counters), per successful request
        for key, name in (("engine_ms", "nv_inference_compute_infer_duration_us"),
                          ("queue_ms", "nv_inference_queue_duration_us")):
            row[key] = delta(before, after, name, model=MODEL, version=1) / done / 1e3
    return row


# --- part 4: gRPC and REST against the in-process engine -------------------------------------------


def part_doors(server: ServerProcess, engine, args, n_genes: int) -> dict:
    """For each bag size: the in-process engine, then ModelInfer through each door, call by call in turn
    (so background load hits all alike), at concurrency 1; every risk must equal the in-process one."""
    import tritonclient.http as httpclient

    grpc_conn = infer_client(server.url)
    http_conn = httpclient.InferenceServerClient(server.http_url, connection_timeout=CALL_TIMEOUT, network_timeout=CALL_TIMEOUT)
    tally, sizes = Tally(), []
    for n in args.door_bags:
        bag = make_bag(n, n_genes, seed=4)
        risk = first_risk(engine.run(bag)["risk"])
        doors = {
            "in-process": lambda: None,
            "gRPC": lambda inputs=infer_inputs(bag): grpc_conn.infer(MODEL, inputs, client_timeout=CALL_TIMEOUT),
            "REST binary": lambda inputs=rest_inputs(bag, True): http_conn.infer(MODEL, inputs),
            "REST JSON": lambda inputs=rest_inputs(bag, False): http_conn.infer(
                MODEL, inputs, outputs=[httpclient.InferRequestedOutput("risk", binary_data=False)]),
        }
        doors["in-process"] = lambda: engine.run(bag)
        for call in doors.values():  # warm-up: each door's first call (connections, ORT's first run)
            call()
        print(f"[4] {n}-patch bag: in-process, gRPC, REST binary, REST JSON in turn, {args.door_calls} calls each ...", flush=True)
        ms = {label: [] for label in doors}
        for _ in range(args.door_calls):
            for label, call in doors.items():
                start = time.perf_counter()
                result = call()
                ms[label].append((time.perf_counter() - start) * 1e3)
                got = first_risk(result["risk"] if label == "in-process" else result.as_numpy("risk"))
                if not rel_close(got, risk, 1e-6):
                    tally.mismatch(f"{label} risk {got!r} != in-process {risk!r} ({n} patches)")
        base = statistics.median(ms["in-process"])
        rows = [{"door": label, **summarise(v), "overhead_ms": statistics.median(v) - base,
                 "p50_vs_in_process": statistics.median(v) / base} for label, v in ms.items()]
        sizes.append({"patches": n, "rows": rows})
    grpc_conn.close()
    http_conn.close()
    return {"calls": args.door_calls, "sizes": sizes, "error_breakdown": dict(tally.errors)}


def rest_inputs(bag: dict[str, np.ndarray], binary: bool) -> list:
    import tritonclient.http as httpclient

    inputs = []
    for name, datatype in (("features", "FP32"), ("coords", "INT64"), ("genes", "FP32")):
        tensor = httpclient.InferInput(name, list(bag[name].shape), datatype)
        tensor.set_data_from_numpy(bag[name], binary_data=binary)
        inputs.append(tensor)
    return inputs


def print_doors(part: dict) -> None:
    print(f"\n4. ModelInfer through each door at concurrency 1, {part['calls']} calls each, in turn call by call "
          "(tritonclient.grpc; tritonclient.http with binary tensors, and with JSON tensors)")
    header = ["patches", "door", "p50 ms", "p95 ms", "p50 overhead ms", "p50 / in-proc"]
    rows = []
    for size in part["sizes"]:
        for r in size["rows"]:
            rows.append([str(size["patches"]), r["door"], cell(r.get("p50_ms")), cell(r.get("p95_ms")),
                         cell(r["overhead_ms"], ".2f"), cell(r["p50_vs_in_process"], ".3f", "x")])
    print_aligned(header, rows)
    print("overhead: the door's median latency minus the in-process engine's median (same bag, same run)")


# --- part 2: ScoreSlide with and without the batcher ------------------------------------------------


def score_slide(channel, uri: str, genes: np.ndarray):
    from histosurv.runtime.server._proto import slide_service_pb2 as spb
    from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc

    request = spb.ScoreSlideRequest(slide_uri=uri, model_name=MODEL, genes=genes.tolist(), id=uri)
    events = list(spb_grpc.SlideServiceStub(channel).ScoreSlide(request, timeout=CALL_TIMEOUT))
    if not events or not events[-1].HasField("result"):
        raise RuntimeError(f"ScoreSlide {uri}: the stream ended without a result")
    return events[-1].result


class SlideSide:
    """One server's share of part 2: its rounds' latencies, results, wall time and CPU."""

    def __init__(self, label: str, server: ServerProcess):
        self.label, self.server = label, server
        self.tally, self.cpu, self.results = Tally(), CpuAccount(server), []

    def round(self, names: list[str], genes: np.ndarray) -> None:
        import grpc

        def client(i: int, barrier: threading.Barrier) -> None:
            with grpc.insecure_channel(self.server.url) as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
                barrier.wait()
                start = time.perf_counter()
                try:
                    result = score_slide(channel, names[i], genes)
                except Exception as e:  # noqa: BLE001
                    self.tally.error("ScoreSlide", e)
                    return
                self.tally.ok("ScoreSlide", (time.perf_counter() - start) * 1e3)
                with self.tally.lock:
                    self.results.append(result)

        with self.cpu.measure():
            run_threads(len(names), client)


def part_slides(servers: dict[str, ServerProcess], names: list[str], genes: np.ndarray, args) -> dict:
    import grpc

    sides = {label: SlideSide(label, server) for label, server in servers.items()}
    warm = {}
    for label, server in servers.items():  # each server's first slide: the encoder's and the model's first runs
        with grpc.insecure_channel(server.url) as channel:
            warm[label] = score_slide(channel, names[0], genes)
    before = {label: server.scrape() for label, server in servers.items()}
    k = args.slide_concurrency
    rounds = [names[i:i + k] for i in range(0, len(names), k)]
    print(f"[2] ScoreSlide: {plural(len(rounds), 'round')} of up to {k} slides at once on each server, alternating ...", flush=True)
    for i, batch in enumerate(rounds):
        for side in (sides.values() if i % 2 == 0 else reversed(list(sides.values()))):
            side.round(batch, genes)
    after = {label: server.scrape() for label, server in servers.items()}
    n_patches = warm["batched"].n_patches
    out = {"slide_patches": n_patches, "rounds": len(rounds)}
    for label, side in sides.items():
        lat = side.tally.latencies.get("ScoreSlide", [])
        patches = delta(before[label], after[label], "nv_inference_count", model=ENCODER, version=1)
        runs = delta(before[label], after[label], "nv_inference_exec_count", model=ENCODER, version=1)
        stages = {}
        for key in ("read", "encode", "wait", "queue", "fuse", "total"):
            values = [r.stage_seconds[key] for r in side.results if key in r.stage_seconds]
            if values:
                stages[key] = statistics.fmean(values)
        expected = len(lat) * n_patches
        if patches != expected:
            side.tally.mismatch(f"{label}: encoder nv_inference_count moved by {patches:g}, "
                                f"expected {expected} ({len(lat)} slides x {n_patches} patches)")
        wall = side.cpu.wall
        out[label] = {
            "flags": SLIDE_FLAGS[label], "slides": len(names), "errors": sum(side.tally.errors.values()),
            "error_breakdown": dict(side.tally.errors), "error_samples": side.tally.samples, "wall_s": wall,
            "slides_per_s": len(lat) / wall if wall else 0.0, **summarise(lat),
            "encoder_patches": patches, "encoder_runs": runs, "avg_encoder_batch": patches / runs if runs else None,
            # chunks (read-ahead batches of --batch-size patches) joined per encoder run: 1 without the batcher
            "chunks_per_run": len(lat) * -(-n_patches // SLIDE_BATCH) / runs if runs else None,
            "patches_per_s": patches / wall if wall else None, "cpu_percent": side.cpu.percent,
            "mean_stage_seconds": stages, "risks": [warm[label].risk] + [r.risk for r in side.results],
        }
    risks = out["batched"]["risks"] + out["unbatched"]["risks"]
    out["risk"] = risks[0]
    out["risk_max_rel_diff"] = max(abs(r - risks[0]) / abs(risks[0]) for r in risks) if risks[0] else None
    out["risks_agree"] = all(rel_close(r, risks[0], 1e-5) for r in risks)
    if out["unbatched"]["slides_per_s"]:
        out["batched"]["vs_unbatched"] = out["batched"]["slides_per_s"] / out["unbatched"]["slides_per_s"]
        out["unbatched"]["vs_unbatched"] = 1.0
    for label in sides:
        r = out[label]
        print(f"    {label}: {r['slides_per_s']:.3f} slides/s, average encoder batch {cell(r['avg_encoder_batch'])}, "
              f"errors {r['errors']}", flush=True)
    return out


# --- part 3: bounded closed-loop load -------------------------------------------------------------


def part_load(server: ServerProcess, args, risk: float, bag: dict) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tally, cpu = Tally(), CpuAccount(server)
    issued = dict.fromkeys(("ModelInfer", *HEALTH_KINDS), 0)
    issued_lock = threading.Lock()
    clock = {"deadline": float("inf")}  # set as the barrier releases the clients

    def client(index: int, barrier: threading.Barrier) -> None:
        conn, inputs = infer_client(server.url), infer_inputs(bag)
        channel = grpc.insecure_channel(server.url)
        health = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        barrier.wait()
        for j in itertools.count():
            if time.perf_counter() >= clock["deadline"]:
                break
            if (j + index) % args.health_every == args.health_every - 1:  # staggered: some threads start with one
                kind = HEALTH_KINDS[(j // args.health_every + index) % len(HEALTH_KINDS)]
            else:
                kind = "ModelInfer"
            with issued_lock:
                issued[kind] += 1
            if kind == "ModelInfer":
                _infer_once(conn, inputs, risk, tally)
                continue
            start = time.perf_counter()
            try:
                if kind == "ServerLive":
                    ok = conn.is_server_live(client_timeout=60)
                elif kind == "ServerReady":
                    ok = conn.is_server_ready(client_timeout=60)
                else:
                    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60).status
                    ok = status == health_pb2.HealthCheckResponse.SERVING
            except Exception as e:  # noqa: BLE001
                tally.error(kind, e)
                continue
            tally.ok(kind, (time.perf_counter() - start) * 1e3)
            if not ok:
                tally.mismatch(f"{kind} answered not live / not serving")
        conn.close()
        channel.close()

    def release() -> None:
        clock["deadline"] = time.perf_counter() + args.load_seconds

    print(f"[3] closed-loop load: {args.load_concurrency} in flight for {args.load_seconds:g} s "
          f"({args.load_bag}-patch ModelInfer, every {args.health_every}th request a health check) ...", flush=True)
    before = server.scrape()
    with cpu.measure():
        wall = run_threads(args.load_concurrency, client, on_release=release)
    after = server.scrape()
    success = delta(before, after, "nv_inference_request_success", model=MODEL, version=1)
    failures = sum(delta(before, after, "nv_inference_request_failure", model=MODEL, version=1, reason=r)
                   for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER"))
    kinds = {}
    for kind in issued:
        lat = tally.latencies.get(kind, [])
        kinds[kind] = {"issued": issued[kind], "ok": len(lat), "req_per_s": len(lat) / wall, **summarise(lat)}
    every = [x for v in tally.latencies.values() for x in v]
    result = {
        "concurrency": args.load_concurrency, "seconds": args.load_seconds, "wall_s": wall, "bag": args.load_bag,
        "requests": sum(issued.values()), "errors": sum(v for k, v in tally.errors.items() if k != "parity"),
        "error_breakdown": dict(tally.errors), "error_samples": tally.samples,
        "req_per_s": len(every) / wall, "all": summarise(every), "kinds": kinds, "cpu_percent": cpu.percent,
        "metrics_success_delta": success, "metrics_failure_delta": failures,
        "client_infer_ok": tally.n("ModelInfer"), "metrics_check": success == tally.n("ModelInfer"),
    }
    print(f"    {result['requests']} requests, {result['req_per_s']:.2f} req/s, errors {result['errors']}, "
          f"metrics check {'OK' if result['metrics_check'] else 'MISMATCH'}", flush=True)
    return result


# --- main ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        print(json.dumps(build_repository(Path(args.build))))
        return 0
    facts = machine_facts()
    print_header(facts, args)
    results: dict = {"facts": facts, "args": args_json(args, internal=("build",))}
    with tempfile.TemporaryDirectory(prefix="histosurv-bench-server-") as tmp:
        tmp = Path(tmp)
        repo = (args.repo or tmp / "model_repository").resolve()
        facts["repository"] = {"path": str(repo), **ensure_repository(repo, SCRIPT)}

        from histosurv.data.demo_slide import demo_slide
        from histosurv.runtime.predict import FusionPredictor

        mv, encoder = open_model(repo)
        predictor = FusionPredictor.from_repository(repo, MODEL)
        facts["model"] = {"name": MODEL, "version": mv.version, "architecture": mv.info.architecture,
                          "config": mv.info.config, "artifacts": sorted(mv.info.engines),
                          "params": facts["repository"].get("params"), "engine": predictor.engine.describe(),
                          "encoder": f"{ENCODER} v{encoder.version}"}
        print_model(facts)
        n_genes = len(predictor.gene_names)

        if args.only_doors:
            server = ServerProcess("batched", repo, SLIDE_FLAGS["batched"])
            try:
                results["doors"] = part_doors(server, predictor.engine, args, n_genes)
            finally:
                code = server.stop()
            print_doors(results["doors"])
            problems = {f"part 4: {k}": v for k, v in results["doors"]["error_breakdown"].items()}
            if code != 0:
                problems["server exit status"] = code
            print(problems_line(problems))
            if args.json:
                write_json(args.json, results)
            return 1 if problems else 0
        root = tmp / "slides"
        root.mkdir()
        svs = demo_slide(log=lambda m: print(m, flush=True))
        names = [f"slide_{i:02d}.svs" for i in range(args.slides)]
        for name in names:
            shutil.copy(svs, root / name)
        common = ["--slide-root", str(root), "--batch-size", str(SLIDE_BATCH), "--max-active-slides", str(args.slide_concurrency)]
        servers: dict[str, ServerProcess] = {}
        facts["server_exit"] = {}
        try:
            for label in ("batched", "unbatched"):
                servers[label] = ServerProcess(label, repo, [*SLIDE_FLAGS[label], *common])
            facts["server_start_seconds"] = {k: s.start_seconds for k, s in servers.items()}
            print()
            results["infer"] = part_infer(servers["batched"], predictor.engine, args, n_genes)
            results["slides"] = part_slides(servers, names, np.random.default_rng(2).standard_normal(n_genes).astype(np.float32), args)
            results["slides"]["slide"] = svs.name
            load_bag = make_bag(args.load_bag, n_genes, seed=3)
            results["load"] = part_load(servers["batched"], args, first_risk(predictor.engine.run(load_bag)["risk"]), load_bag)
            results["doors"] = part_doors(servers["batched"], predictor.engine, args, n_genes)
        finally:
            for label, server in servers.items():
                facts["server_exit"][label] = server.stop()

    print_infer(results["infer"])
    print_slides(results["slides"], args)
    print_load(results["load"])
    print_doors(results["doors"])
    problems = collect_problems(results)
    results["problems"] = problems
    facts["load_average_end"] = load_average()
    print(f"\nload average at the end: {format_load_average(facts['load_average_end'])} (1, 5, 15 min)")
    print(problems_line(problems))
    if args.json:
        write_json(args.json, results)
        print(f"figures written to {args.json}")
    return 1 if problems else 0


def collect_problems(results: dict) -> dict:
    problems = {}
    for row in results["infer"]["rows"]:
        for key, value in row.get("error_breakdown", {}).items():
            problems[f"part 1 {row['label']}: {key}"] = value
    for label in ("batched", "unbatched"):
        for key, value in results["slides"][label]["error_breakdown"].items():
            problems[f"part 2 {label}: {key}"] = value
    if not results["slides"]["risks_agree"]:
        problems["ScoreSlide risks differ (rel 1e-5)"] = 1
    load = results["load"]
    for key, value in load["error_breakdown"].items():
        problems[f"part 3: {key}"] = value
    for key, value in results["doors"]["error_breakdown"].items():
        problems[f"part 4: {key}"] = value
    if not load["metrics_check"]:
        problems["load metrics check"] = 1
    for label, code in results["facts"]["server_exit"].items():
        if code != 0:
            problems[f"server {label} exit status {code}"] = 1
    return problems


# --- output -----------------------------------------------------------------------------------------


def machine_facts() -> dict:
    return {
        **host_facts(),
        **{p: package_version(p, missing="not installed") for p in ("onnxruntime", "grpcio", "tritonclient", "histosurv")},
        "date": now(),
        "load_average": load_average(),
    }


def print_header(facts: dict, args) -> None:
    print("histosurv gRPC server: overhead against the in-process engine, dynamic batching, bounded load")
    print(f"date    : {facts['date']}")
    print(f"machine : {facts['cpu']}, {facts['logical_cpus']} logical CPUs ({facts['physical_cpus']} physical), "
          f"{facts['memory_total_bytes'] / 1e9:.1f} GB RAM; {facts['platform']}")
    print(f"load    : {format_load_average(facts['load_average'])} (1, 5, 15 min) at the start")
    print(f"software: python {facts['python']}, onnxruntime {facts['onnxruntime']}, grpcio {facts['grpcio']}, "
          f"tritonclient {facts['tritonclient']}, histosurv {facts['histosurv']}")
    levels = ", ".join(f"{r} at c={c}" for c, r in zip(args.concurrency, args.requests))
    print(f"runs    : {'--quick; ' if args.quick else ''}part 1 {args.bag}-patch bag, {levels}; part 2 {args.slides} slides "
          f"per server, {args.slide_concurrency} at a time; part 3 {args.load_concurrency} in flight for {args.load_seconds:g} s")
    print("servers : separate processes (python -m histosurv serve), loopback, engine auto\n", flush=True)


def print_model(facts: dict) -> None:
    m, c = facts["model"], facts["model"]["config"]
    params = f", {m['params'] / 1e6:.2f} M parameters" if m.get("params") else ""
    print(f"model   : {m['name']} v{m['version']} ({m['architecture']}), d = {c['feature_dim']} + {c['pos_dim']}, "
          f"{c['heads']} heads, depth {c['depth']}, {c['gene_groups']} gene tokens from {c['n_genes']} genes{params}; "
          f"artifacts {', '.join(m['artifacts'])}; served by {m['engine'].get('engine')} on {m['engine'].get('device')}; "
          f"encoder {m['encoder']}")
    print(f"config  : {json.dumps(c)}\n", flush=True)


def cpu_cells(percent: dict | None) -> list[str]:
    percent = percent or {}
    return [cell(percent.get(k), ".0f", "%") for k in ("server", "client", "other")]


def print_infer(part: dict) -> None:
    how = "alternating call by call with the server's c=1 requests" if part["interleaved"] else "measured alone"
    print(f"\n1. ModelInfer, {part['bag']}-patch bag (tritonclient.grpc); baseline: the same engine in this process, {how}")
    header = ["", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s", "p50 / in-proc", "thr / in-proc",
              "engine ms", "queue ms", "server CPU", "client CPU", "other CPU"]
    rows = []
    for r in part["rows"]:
        rows.append([
            r["label"], str(r["requests"]), str(r["errors"]), cell(r.get("p50_ms")), cell(r.get("p95_ms")), cell(r.get("p99_ms")),
            cell(r.get("req_per_s"), ".3f"), cell(r.get("p50_vs_in_process"), ".3f", "x"),
            cell(r.get("throughput_vs_in_process"), ".3f", "x"), cell(r.get("engine_ms")), cell(r.get("queue_ms")),
            *cpu_cells(r.get("cpu_percent")),
        ])
    print_aligned(header, rows)
    print("engine ms, queue ms: the server's mean compute-infer and queue time per request from /metrics (in-process: "
          "the engine call's mean); CPU: % of one core over the wall time (client = this process)")


def print_slides(part: dict, args) -> None:
    print(f"\n2. ScoreSlide, {part['batched']['slides']} cop{'y' if part['batched']['slides'] == 1 else 'ies'} of {part['slide']} ({part['slide_patches']} tissue patches) per "
          f"server, in {plural(part['rounds'], 'round')} of up to {args.slide_concurrency} at once alternating between the servers; both "
          f"--batch-size {SLIDE_BATCH} --max-active-slides {args.slide_concurrency}")
    header = ["server", "slides/s", "vs unbatched", "mean ms", "p95 ms", "avg enc batch", "chunks/run", "enc runs", "patches/s",
              "encode s", "server CPU", "client CPU", "other CPU", "errors"]
    rows = []
    for label in ("batched", "unbatched"):
        r = part[label]
        rows.append([
            f"{label} ({' '.join(r['flags'])})", cell(r["slides_per_s"], ".3f"), cell(r.get("vs_unbatched"), ".2f", "x"),
            cell(r.get("mean_ms"), ".0f"), cell(r.get("p95_ms"), ".0f"), cell(r["avg_encoder_batch"], ".1f"), cell(r["chunks_per_run"], ".2f"),
            f"{r['encoder_runs']:.0f}", cell(r["patches_per_s"], ".1f"), cell(r["mean_stage_seconds"].get("encode"), ".2f"),
            *cpu_cells(r["cpu_percent"]), str(r["errors"]),
        ])
    print_aligned(header, rows)
    n = len(part["batched"]["risks"]) + len(part["unbatched"]["risks"])
    print(f"chunks/run: read-ahead chunks joined per encoder run; encode s: the server's mean encode stage per slide. Risks: {n} (warm-ups included), largest relative "
          f"difference {cell(part['risk_max_rel_diff'], '.1e')}: {'agree' if part['risks_agree'] else 'DIFFER'} at rel 1e-5")


def print_load(part: dict) -> None:
    cpu = part["cpu_percent"]
    print(f"\n3. Closed-loop load, {part['concurrency']} in flight for {part['seconds']:g} s ({part['wall_s']:.1f} s with the "
          f"last replies), {part['bag']}-patch ModelInfer mixed with health checks; CPU: server {cell(cpu['server'], '.0f', '%')}, "
          f"client {cell(cpu['client'], '.0f', '%')}, other {cell(cpu['other'], '.0f', '%')}")
    header = ["kind", "issued", "ok", "req/s", "p50 ms", "p99 ms", "max ms"]
    rows = [["all", str(part["requests"]), str(part["all"].get("n", 0)), cell(part["req_per_s"], ".2f"),
             cell(part["all"].get("p50_ms")), cell(part["all"].get("p99_ms")), cell(part["all"].get("max_ms"))]]
    for kind, k in part["kinds"].items():
        rows.append([kind, str(k["issued"]), str(k["ok"]), cell(k["req_per_s"], ".2f"), cell(k.get("p50_ms")),
                     cell(k.get("p99_ms")), cell(k.get("max_ms"))])
    print_aligned(header, rows)
    errors = part["error_breakdown"]
    print(f"errors by status: {', '.join(f'{k}: {v}' for k, v in errors.items()) if errors else 'none'}")
    print(f"metrics check: nv_inference_request_success{{model=\"{MODEL}\"}} moved by {part['metrics_success_delta']:.0f}, "
          f"the client counted {part['client_infer_ok']} successful ModelInfer calls: "
          f"{'OK' if part['metrics_check'] else 'MISMATCH'} (failures the server counted: {part['metrics_failure_delta']:.0f})")


if __name__ == "__main__":
    sys.exit(main())
