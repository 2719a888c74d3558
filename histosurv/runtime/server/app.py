"""Assembling and running the gRPC server (``grpc.aio``) on a model store.

Message size limits are set on the server (clients set theirs on the channel): a 64k-patch bag of
1024-d FP32 features is 256 MiB, so the default allows 512 MiB. ``grpc.health.v1`` answers NOT_SERVING
until the models are loaded and again once shutdown begins, so load balancers stop sending first;
server reflection lists the services for grpcurl and friends.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...errors import StartupError
from ..metrics import ServerMetrics
from ._proto._pool import POOL
from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from ._proto import slide_service_pb2 as spb
from ._proto import slide_service_pb2_grpc as spb_grpc
from .access_log import AccessInterceptor, AccessLog
from .kserve import InferenceServicer
from .models import ExecutionConfig, ModelNotFound, ModelStore
from .draining import DrainInterceptor
from .security import HEALTH_METHODS, BearerAuthInterceptor, TLSConfig, exposure_warnings, server_credentials
from .slide_service import SlideService, SlideServiceConfig

__all__ = ["create_server", "serve", "ServeOptions", "DEFAULT_MAX_MESSAGE_BYTES", "INFERENCE_SERVICE"]

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SLIDE_SERVICE = spb.DESCRIPTOR.services_by_name["SlideService"].full_name


@dataclass
class ServeOptions:
    repository: str
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # Triton's
    http_port: int | None = 8000  # Triton's: KServe v2 REST (rest.py); None: gRPC only
    metrics_port: int | None = 8002  # Triton's; None: no metrics endpoint
    metrics_host: str | None = None  # default: host
    model_control: str = "none"  # none | poll | explicit
    poll_seconds: float = 15.0
    engine: str = "auto"
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    slides: SlideServiceConfig = field(default_factory=SlideServiceConfig)
    tls: TLSConfig | None = None
    tokens: frozenset[str] | None = None
    auth_health: bool = False  # tokens on the health endpoints too (open by default: orchestrator probes)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 30.0
    access_log: str | None = None  # a file, or "-" (standard output): one JSON line per call; None: off


def create_server(
    store: ModelStore,
    address: str,
    model_control: str = "none",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    metrics: ServerMetrics | None = None,
    slides: SlideServiceConfig | None = None,
    tls: TLSConfig | None = None,
    tokens: frozenset[str] | None = None,
    access_log: AccessLog | None = None,
    auth_health: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """A server with the KServe v2 service, the slide service, health and reflection, bound to
    ``address`` ("host:port"; port 0: any free port; ``ServeOptions`` holds the defaults); returns it, not yet started, with the bound port. Call it
    inside the loop that runs it. ``server.health`` is the health servicer (SERVING once ``store`` has
    a model loaded: see :func:`set_serving`), ``server.metrics`` the metrics, ``server.drain`` what
    refuses new calls at shutdown. With ``tokens``, the health endpoints (grpc.health, ServerLive,
    ServerReady, ModelReady) need one only with ``auth_health``. Every call to the two services is counted by status in
    ``histosurv_request_errors_total`` and, with ``access_log``, written there as one line."""
    drain = DrainInterceptor()
    metrics = metrics or ServerMetrics(store.loaded, store.index)
    # outermost: calls refused by draining or by the token check are logged and counted too
    recorder = AccessInterceptor((f"/{INFERENCE_SERVICE}/", f"/{SLIDE_SERVICE}/"), metrics.request_errors, access_log)
    interceptors = [recorder, drain, *([BearerAuthInterceptor(tokens, () if auth_health else HEALTH_METHODS)] if tokens else [])]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC turns SO_REUSEPORT on by default: a second server on a busy port then starts "fine" and
            # the kernel splits the traffic between the two without a word. A busy port must be an error.
            ("grpc.so_reuseport", 0),
        ],
    )
    server.metrics = metrics
    server.drain = drain
    server.recorder = recorder  # the REST routes (rest.py) record, drain and count through the same objects
    store.on_load = lambda model: setattr(model, "on_batch", _batch_observer(server.metrics))
    for model in store.loaded():
        store.on_load(model)
    # health follows explicit loads and unloads at once, as it follows poll mode's scans
    servicer = InferenceServicer(store, model_control, server.metrics, changed=lambda: set_serving(server, store.ready))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    server.inference = servicer
    server.slides = SlideService(store, slides or SlideServiceConfig(), server.metrics)
    spb_grpc.add_SlideServiceServicer_to_server(server.slides, server)
    server.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(server.health, server)
    names = (INFERENCE_SERVICE, SLIDE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=POOL)
    try:
        port = server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    except RuntimeError:  # grpcio's "Failed to bind", whatever the cause
        port = 0
    if port == 0:
        raise StartupError(
            f"cannot serve gRPC on {address}: the port is in use (another histosurv serve, or another program) "
            "or the address is not one of this machine's; choose another with --grpc-port / --host"
        )
    return server, port


async def _start_rest(server: grpc.aio.Server, options: ServeOptions):
    """The KServe v2 REST door on ``options.http_port``, over the servicers of the gRPC ``server``."""
    from .rest import RestServer, create_app  # aiohttp is imported only where REST is served

    rest = RestServer(create_app(server, options.tokens, options.auth_health, options.max_message_bytes))
    await rest.start(options.host, options.http_port, options.tls)
    return rest


def _batch_observer(metrics: ServerMetrics):
    def observe(model, n_patches: int) -> None:
        metrics.encoder_batch.labels(model.name).observe(n_patches)

    return observe


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", INFERENCE_SERVICE, SLIDE_SERVICE):  # "" is the whole server, as grpc health checkers ask
        await server.health.set(service, status)


async def serve(options: ServeOptions, ready: Callable[[int, int | None], None] | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then stops taking requests and lets running ones finish within
    ``grace_seconds``. ``ready(grpc_port, metrics_port)`` is called once serving."""
    store = ModelStore(options.repository, engine=options.engine, execution=options.execution)
    metrics = ServerMetrics(store.loaded, store.index)
    access_log = AccessLog(options.access_log) if options.access_log else None
    server, port = create_server(
        store, f"{options.host}:{options.grpc_port}", options.model_control, options.max_message_bytes,
        metrics, options.slides, options.tls, options.tokens, access_log, options.auth_health,
    )
    for warning in exposure_warnings(options.host, options.tls is not None, bool(options.tokens)):
        _warn(warning)
    metrics_port = None
    if options.metrics_port is not None:
        metrics_port = metrics.start_http(options.metrics_host or options.host, options.metrics_port)
    rest = await _start_rest(server, options) if options.http_port is not None else None
    await set_serving(server, False)
    await server.start()
    await asyncio.to_thread(store.load_all)
    for name, version, state, reason in store.index():
        _say(f"model {name} {version or '-'}: {state}{' (' + reason + ')' if reason else ''}")
    _warn_unserved(store)
    await set_serving(server, store.ready)
    scheme = "TLS" if options.tls else "plaintext"
    _say(f"serving KServe v2 and histosurv.v1 gRPC ({scheme}) on {options.host}:{port}")
    if rest is not None:
        _say(f"serving REST (KServe v2 HTTP) on {'https' if options.tls else 'http'}://{options.host}:{rest.port}")
    if metrics_port is not None:
        _say(f"metrics on http://{options.metrics_host or options.host}:{metrics_port}/metrics")
    if ready is not None:
        ready(port, metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    poller = None
    if options.model_control == "poll":
        poller = asyncio.create_task(poll_repository(store, options.poll_seconds, lambda: set_serving(server, store.ready)))
    await stop.wait()
    _say(f"shutting down: finishing running requests (up to {options.grace_seconds:g} s)")
    if poller is not None:
        poller.cancel()
    await set_serving(server, False)
    finished = await server.drain.drain(options.grace_seconds)
    if not finished:
        _say(f"grace period over: cancelling {server.drain.running} running requests")
    await server.stop(grace=1.0)
    if rest is not None:
        await rest.stop()
    server.slides.close()
    store.close()
    metrics.stop_http()
    if access_log is not None:
        access_log.close()
    _say("stopped")


async def poll_repository(store: ModelStore, seconds: float, changed=None) -> None:
    """``--model-control poll``: every ``seconds``, loads what changed in the repository. A new
    version that fails to load is reported and the newest version that loads serves; a removed model
    is unloaded once its running requests finish. ``changed()`` is awaited after every scan."""
    seen = {name: store.fingerprint(name) for name in store.repository.models()}
    while True:
        await asyncio.sleep(seconds)
        await rescan(store, seen)
        if changed is not None:
            await changed()


async def rescan(store: ModelStore, seen: dict) -> None:
    """One scan of poll mode. Only a change to what would serve (the highest version's files and
    manifest record) reloads a model, and only once per change: another version folder being written,
    or a failed version left as it is, reloads nothing."""
    present = set(store.repository.models())
    for name in sorted(present | set(seen)):
        if name not in present:
            seen.pop(name, None)
            _say(f"model {name}: removed from the repository, unloading")
            try:
                store.unload(name)
            except ModelNotFound:
                pass
            continue
        now = store.fingerprint(name)
        if now is None or now == seen.get(name):
            continue  # being copied in, or unchanged since the last scan
        seen[name] = now
        if store.serves(name, now):
            continue  # the version serving is the one that would serve, unchanged
        loaded = await asyncio.to_thread(store.load, name, False)
        _report_load(store, name, loaded)


def _report_load(store: ModelStore, name: str, loaded) -> None:
    version, reason = store.failure(name)
    if loaded is not None and not reason:
        _say(f"model {name} {loaded.version.version}: READY")
    elif loaded is not None:
        _warn(f"model {name}: version {version} does not load ({reason}); serving version {loaded.version.version} instead")
    elif store.loaded_version(name) is not None:
        _warn(f"model {name} {version}: UNAVAILABLE ({reason}); version {store.loaded_version(name)} keeps serving")
    else:
        _warn(f"model {name} {version or '-'}: UNAVAILABLE ({reason}); nothing of it serves, so the server is not ready")


def _warn_unserved(store: ModelStore) -> None:
    """At start-up: a newest version that did not load while an older one serves, and models with no
    version that loads (the server then reports not ready, as Triton's strict readiness does)."""
    for model in store.loaded():
        version, reason = store.failure(model.name)
        if reason:
            _warn(f"model {model.name}: version {version} does not load ({reason}); serving version {model.version.version} instead")
    for name in store.not_ready():
        _warn(
            f"model {name}: no version loads ({store.failure(name)[1]}); the server reports NOT ready until it "
            "does (repair it and restart, or let --model-control poll or explicit load it) or it is unloaded"
        )


def _warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def _say(message: str) -> None:
    # one write, flushed: supervisors and tests read the log line by line, and the access log (--access-log -)
    # writes to the same stream from its own thread (print writes the newline apart)
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
