"""Graceful shutdown: refuse new calls with a retryable status while the running ones finish.

grpc's own ``server.stop(grace)`` lets running calls finish but cancels calls that arrive meanwhile
(the client sees CANCELLED, which clients do not retry). Draining first answers them UNAVAILABLE
("retry elsewhere"), counts the calls still running, and stops the server once none is left or the
grace period is over. Health checks are never refused: they report NOT_SERVING while draining.
"""

from __future__ import annotations

import asyncio

import grpc

from .security import HEALTH_PREFIX, refusing_handler

__all__ = ["DrainInterceptor"]


class DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.draining = False
        self.running = 0
        self._idle: asyncio.Event | None = None  # made in the server's loop, on first use

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self.draining:
            return refusing_handler(handler, "the server is shutting down; retry on another replica", grpc.StatusCode.UNAVAILABLE)
        return _counted(handler, self)

    def _enter(self) -> None:
        self.running += 1
        self._event().clear()

    def _exit(self) -> None:
        self.running -= 1
        if self.running == 0:
            self._event().set()

    def _event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    async def drain(self, timeout: float) -> bool:
        """Refuses new calls from now on; waits up to ``timeout`` seconds for the running ones.
        Returns whether they all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._event().wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _counted(handler: grpc.RpcMethodHandler, drain: DrainInterceptor) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour counted as running from start to last response."""
    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behaviour(request, context):
            drain._enter()
            try:
                async for response in inner(request, context):
                    yield response
            finally:
                drain._exit()
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behaviour(request, context):
            drain._enter()
            try:
                return await inner(request, context)
            finally:
                drain._exit()

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
