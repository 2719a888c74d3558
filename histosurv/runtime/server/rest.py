"""KServe v2 over HTTP/REST (the Open Inference Protocol's REST binding, Triton's port 8000), beside gRPC.

Every route builds the gRPC request its RPC takes and calls the same servicer the gRPC server calls,
so the two doors share one scheduler, one set of checks and messages, one ``ModelStatistics`` and
the same metrics: a request counts once, whichever door it came in by. Around each call: the access
recorder (log line and ``histosurv_request_errors_total``, the RPC's name as on gRPC), draining at
shutdown (503, retry elsewhere) and the bearer tokens (``Authorization: Bearer <token>``; the health
routes open unless ``auth_health``). Errors are the HTTP status of the gRPC code (:mod:`._rest_call`)
with ``{"error": message}``.

Routes (``[/versions/{v}]`` optional): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``,
``/v2/models/{m}[/versions/{v}]`` (+ ``/ready``, ``/config``, ``/stats``), ``/v2/models/stats``;
``POST .../infer`` (JSON tensors or Triton's binary data extension), ``.../score_slide`` (the result
as JSON, or progress as server-sent events with ``Accept: text/event-stream``),
``/v2/repository/index``, ``/v2/repository/models/{m}/load`` and ``/unload``.

aiohttp serves it: its C parser, and it runs in the event loop grpc.aio already runs, so the servicers
are called directly (no second loop, no thread hop). bench/server.py measures its overhead.
"""

from __future__ import annotations

import json
import ssl
from typing import Awaitable, Callable

import grpc
from aiohttp import web
from google.protobuf import json_format

from ...errors import InputError, StartupError
from ._proto import grpc_service_pb2 as pb
from ._proto import slide_service_pb2 as spb
from ._rest_call import Aborted, CallContext
from ._rest_wire import HEADER_LENGTH, infer_request, infer_response, message_json, parse_json
from . import access_log
from .security import BearerAuthInterceptor, TLSConfig, _bearer_token

__all__ = ["RestServer", "create_app"]

Work = Callable[[CallContext], Awaitable[web.StreamResponse]]


class _Routes:
    def __init__(self, server, tokens, auth_health: bool):
        self.inference, self.slides = server.inference, server.slides
        self.drain, self.recorder = server.drain, server.recorder
        self.tokens = BearerAuthInterceptor(tokens) if tokens else None
        self.auth_health = auth_health

    async def call(self, request: web.Request, rpc: str, work: Work, health: bool = False) -> web.StreamResponse:
        """``work`` as the gRPC interceptors would run it: recorded, drained, authorised."""
        context = CallContext(request.transport.get_extra_info("peername") if request.transport else None)
        opened, error, running = self.recorder._open(rpc, None, context), None, False
        try:
            if not health and self.drain.draining:
                context.fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            if self.tokens is not None and (not health or self.auth_health):
                self._authorise(request, context)
            if not health:
                self.drain._enter()
                running = True
            return await work(context)
        except Aborted as e:
            return _error(e.http_status, e.message)
        except InputError as e:  # the body itself is malformed (JSON, binary sizes)
            context._code, context._details = grpc.StatusCode.INVALID_ARGUMENT, str(e)
            return _error(400, str(e))
        except BaseException as e:
            error = e
            raise
        finally:
            if running:
                self.drain._exit()
            self.recorder._close(opened, context, error)

    def _authorise(self, request: web.Request, context: CallContext) -> None:
        token = _bearer_token([("authorization", request.headers.get("Authorization"))])
        if token is None:
            context.fail(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send header 'Authorization: Bearer <token>'")
        if not self.tokens._accepts(token):
            context.fail(grpc.StatusCode.UNAUTHENTICATED, "bearer token not accepted")

    # --- health and metadata -------------------------------------------------------------------

    async def live(self, request):
        async def work(context):
            return _json({"live": True})

        return await self.call(request, "ServerLive", work, health=True)

    async def ready(self, request):
        async def work(context):
            ready = self.inference.store.ready and not self.drain.draining
            return _json({"ready": ready}, 200 if ready else 400)  # KServe: 200 true, 4xx false

        return await self.call(request, "ServerReady", work, health=True)

    async def server_metadata(self, request):
        async def work(context):
            return _json(message_json(await self.inference.ServerMetadata(pb.ServerMetadataRequest(), context)))

        return await self.call(request, "ServerMetadata", work)

    async def model_ready(self, request):
        name, version = _model(request)

        async def work(context):
            reply = await self.inference.ModelReady(pb.ModelReadyRequest(name=name, version=version), context)
            return _json({"name": name, "ready": reply.ready}, 200 if reply.ready else 400)

        return await self.call(request, "ModelReady", work, health=True)

    async def model_metadata(self, request):
        name, version = _model(request)

        async def work(context):
            reply = await self.inference.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), context)
            return _json(message_json(reply))

        return await self.call(request, "ModelMetadata", work)

    async def model_config(self, request):
        name, version = _model(request)

        async def work(context):
            reply = await self.inference.ModelConfig(pb.ModelConfigRequest(name=name, version=version), context)
            return _json(message_json(reply.config))  # Triton's REST answer is the config itself

        return await self.call(request, "ModelConfig", work)

    async def statistics(self, request):
        name, version = _model(request)

        async def work(context):
            reply = await self.inference.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version), context)
            return _json(message_json(reply))

        return await self.call(request, "ModelStatistics", work)

    # --- inference -----------------------------------------------------------------------------

    async def infer(self, request):
        name, version = _model(request)

        async def work(context):
            body = await request.read()
            message, binary = infer_request(body, request.headers.get(HEADER_LENGTH), name, version)
            access_log.note(request_id=message.id)
            reply = await self.inference.ModelInfer(message, context)
            data, header_length = infer_response(reply, binary)
            if header_length is None:
                return web.Response(body=data, content_type="application/json")
            return web.Response(body=data, content_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

        return await self.call(request, "ModelInfer", work)

    async def score_slide(self, request):
        name, version = _model(request)

        async def work(context):
            message = _slide_request(parse_json(await request.read()), context)
            message.model_name, message.model_version = name, version
            access_log.note(request_id=message.id)
            events = self.slides.ScoreSlide(message, context)
            if "text/event-stream" in request.headers.get("Accept", ""):
                return await _event_stream(request, events)
            async for event in events:
                if event.HasField("result"):
                    return _json(message_json(event.result))
            raise RuntimeError("ScoreSlide ended without a result")

        return await self.call(request, "ScoreSlide", work)

    # --- repository control --------------------------------------------------------------------

    async def repository_index(self, request):
        async def work(context):
            body = parse_json(await request.read())
            ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
            reply = await self.inference.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), context)
            return _json([message_json(row) for row in reply.models])

        return await self.call(request, "RepositoryIndex", work)

    async def load(self, request):
        async def work(context):
            message = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
            body = parse_json(await request.read())
            for key, value in ((body.get("parameters") or {}) if isinstance(body, dict) else {}).items():
                message.parameters[key].string_param = value if isinstance(value, str) else json.dumps(value)
            await self.inference.RepositoryModelLoad(message, context)
            return _json({})

        return await self.call(request, "RepositoryModelLoad", work)

    async def unload(self, request):
        async def work(context):
            message = pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
            await self.inference.RepositoryModelUnload(message, context)
            return _json({})

        return await self.call(request, "RepositoryModelUnload", work)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


def _json(value, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value, separators=(",", ":")), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _slide_request(body, context: CallContext) -> spb.ScoreSlideRequest:
    if not isinstance(body, dict):
        context.fail(grpc.StatusCode.INVALID_ARGUMENT, 'the score_slide request must be a JSON object (e.g. {"slide_uri": ...})')
    try:
        return json_format.ParseDict(body, spb.ScoreSlideRequest())
    except json_format.ParseError as e:
        context.fail(grpc.StatusCode.INVALID_ARGUMENT, f"score_slide request: {e}")


async def _event_stream(request: web.Request, events) -> web.StreamResponse:
    """Server-sent events: ``progress`` while the slide is read and encoded, then ``result``; a failure
    after the first event ends the stream with an ``error`` event (its status line is already sent)."""
    first = await anext(events)  # a request refused up front is a plain HTTP error
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        event = first
        while True:
            kind = event.WhichOneof("event")
            await response.write(f"event: {kind}\ndata: {json.dumps(message_json(getattr(event, kind)))}\n\n".encode())
            event = await anext(events)
    except StopAsyncIteration:
        pass
    except Aborted as e:
        await response.write(f"event: error\ndata: {json.dumps({'error': e.message, 'status': e.http_status})}\n\n".encode())
    finally:
        await events.aclose()
    await response.write_eof()
    return response


def create_app(server, tokens: frozenset[str] | None = None, auth_health: bool = False,
               max_message_bytes: int = 512 * 1024 * 1024) -> web.Application:
    """The REST routes over the servicers of ``server`` (from ``app.create_server``)."""
    routes = _Routes(server, tokens, auth_health)
    app = web.Application(client_max_size=max_message_bytes)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server_metadata)
    app.router.add_get("/v2/models/stats", routes.statistics)
    app.router.add_post("/v2/repository/index", routes.repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", routes.load)
    app.router.add_post("/v2/repository/models/{model}/unload", routes.unload)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, routes.model_metadata)
        app.router.add_get(base + "/ready", routes.model_ready)
        app.router.add_get(base + "/config", routes.model_config)
        app.router.add_get(base + "/stats", routes.statistics)
        app.router.add_post(base + "/infer", routes.infer)
        app.router.add_post(base + "/score_slide", routes.score_slide)
    return app


class RestServer:
    """The REST app on ``host:port`` (0: a free port), in the running event loop."""

    def __init__(self, app: web.Application):
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port: int | None = None

    async def start(self, host: str, port: int, tls: TLSConfig | None = None) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=_ssl_context(tls) if tls else None, reuse_port=False)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise StartupError(
                f"cannot serve HTTP on {host}:{port}: {e.strerror or e} (another histosurv serve or another "
                "program has the port, or the address is not one of this machine's); choose another with --http-port / --host"
            ) from None
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()


def _ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:  # mutual TLS, as on gRPC
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
