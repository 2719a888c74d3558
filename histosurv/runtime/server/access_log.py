"""One record per call: the access log (``serve --access-log``) and the count of calls by error status.

An interceptor opens a :class:`Call` for every KServe and slide-service call and closes it with the
status the call ended with; the handlers fill in what only they know (:func:`note`: the model and
version, the bag size, queue and compute time) through a context variable, so no handler signature
changes. Every call that ends with a status other than OK is counted in
``histosurv_request_errors_total{model, rpc, code}``; with an :class:`AccessLog`, every call also
becomes one JSON line:

    {"time": "2025-01-31T12:00:00.123Z", "request_id": "...", "peer": "10.0.0.7", "model": "ammasurv",
     "version": "1", "rpc": "ModelInfer", "patches": 4096, "status": "OK", "queue_ms": 0.02,
     "compute_ms": 41.3, "total_ms": 45.9}

Lines are written by one background thread (logging's ``QueueListener``), so a slow disk never holds
a request and lines never interleave; a full queue drops lines and counts them (``dropped``) rather
than block. The file is reopened when logrotate moves it (``WatchedFileHandler``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import logging.handlers
import queue
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

import grpc

from ...errors import StartupError

__all__ = ["AccessLog", "AccessInterceptor", "Call", "note"]

MAX_QUEUED_LINES = 65536  # lines waiting for the writer; beyond that they are dropped, never waited for


@dataclass
class Call:
    """What is known of one call; handlers add to it with :func:`note`."""

    rpc: str
    peer: str = ""
    request_id: str = ""
    model: str = ""
    version: str = ""
    patches: int | None = None
    queue_ns: int | None = None
    compute_ns: int | None = None

    def __post_init__(self):
        self.time = time.time()
        self.started_ns = time.perf_counter_ns()

    def fields(self, status: str, error: str = "") -> dict:
        ms = lambda ns: None if ns is None else round(ns / 1e6, 3)  # noqa: E731
        line = {
            "time": datetime.fromtimestamp(self.time, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id or uuid.uuid4().hex,
            "peer": self.peer, "model": self.model, "version": self.version, "rpc": self.rpc,
            "patches": self.patches, "status": status,
            "queue_ms": ms(self.queue_ns), "compute_ms": ms(self.compute_ns),
            "total_ms": ms(time.perf_counter_ns() - self.started_ns),
        }
        if error:
            line["error"] = error[:500]
        return line


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("histosurv_call", default=None)


def note(**fields) -> None:
    """Records facts about the running call (``model``, ``version``, ``patches``, ``request_id``,
    ``queue_ns``, ``compute_ns``); outside a call (a servicer used directly) it does nothing."""
    call = _CURRENT.get()
    if call is not None:
        for key, value in fields.items():
            setattr(call, key, value)


class AccessLog:
    """JSON lines to ``target`` (a file path, appended to, or "-" for standard output), written by a
    background thread."""

    def __init__(self, target: str):
        self.target = target
        if target == "-":
            self._handler: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            try:
                self._handler = logging.handlers.WatchedFileHandler(Path(target), encoding="utf-8")
            except OSError as e:
                raise StartupError(f"--access-log {target}: cannot open it for appending ({e.strerror or e})") from None
        self._queue: queue.Queue = queue.Queue(MAX_QUEUED_LINES)
        self._listener = logging.handlers.QueueListener(self._queue, self._handler)
        self._listener.start()
        self.dropped = 0

    def write(self, fields: dict) -> None:
        record = logging.makeLogRecord({"msg": json.dumps(fields, separators=(",", ":")), "levelno": logging.INFO})
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        """Writes the lines still queued, then closes the file."""
        self._listener.stop()
        self._handler.close()


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Opens a :class:`Call` for each call to a method under ``prefixes`` (the served services; health
    checks and reflection are left out: load balancers would flood the log), and on its end counts a
    non-OK status in ``errors`` (a ``histosurv_request_errors`` counter) and writes the log line."""

    def __init__(self, prefixes: tuple[str, ...], errors, log: AccessLog | None = None):
        self.prefixes, self.errors, self.log = prefixes, errors, log

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefixes):
            return handler
        return _recorded(handler, handler_call_details.method.rsplit("/", 1)[-1], self)

    def _open(self, rpc: str, request, context) -> tuple[Call, contextvars.Token]:
        call = Call(rpc, peer=_peer_ip(context.peer()), request_id=str(getattr(request, "id", "") or ""))
        return call, _CURRENT.set(call)

    def _close(self, opened: tuple[Call, contextvars.Token], context, error: BaseException | None) -> None:
        call, token = opened
        try:
            _CURRENT.reset(token)
        except ValueError:  # a streaming call closed from another task's context: nothing to restore there
            pass
        code = _status(context, error)
        if code is not grpc.StatusCode.OK:
            self.errors.labels(call.model, call.rpc, code.name).inc()
        if self.log is not None:
            details = context.details() if code is not grpc.StatusCode.OK else ""
            self.log.write(call.fields(code.name, details.decode() if isinstance(details, bytes) else (details or "")))


def _recorded(handler: grpc.RpcMethodHandler, rpc: str, interceptor: AccessInterceptor) -> grpc.RpcMethodHandler:
    """``handler`` with a :class:`Call` open from its start to its last response."""
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behaviour(request, context):
            opened, error = interceptor._open(rpc, request, context), None
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as e:
                error = e
                raise
            finally:
                interceptor._close(opened, context, error)
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behaviour(request, context):
            opened, error = interceptor._open(rpc, request, context), None
            try:
                return await inner(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                interceptor._close(opened, context, error)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _status(context, error: BaseException | None) -> grpc.StatusCode:
    """The status the client receives: the one the handler aborted with or set, CANCELLED or
    DEADLINE_EXCEEDED for a call that went away, UNKNOWN for an exception gRPC reports as such."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc releases keep the raw status number
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


def _peer_ip(peer: str) -> str:
    """The address of ``context.peer()`` without scheme and port: "ipv4:10.0.0.7:51234" -> "10.0.0.7",
    "ipv6:[::1]:51234" -> "::1"; a Unix socket keeps its path."""
    scheme, _, address = unquote(peer).partition(":")  # grpc writes "ipv6:%5B::1%5D:51234"
    if scheme == "ipv4":
        return address.rsplit(":", 1)[0]
    if scheme == "ipv6":
        return address.rsplit(":", 1)[0].strip("[]")
    return address or peer
