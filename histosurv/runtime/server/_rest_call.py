"""One REST call run through the gRPC servicers: the context they abort on, and the HTTP status of a gRPC code.

The servicers only ever ``await context.abort(code, message)``; :class:`CallContext` turns that into
:class:`Aborted`, which the REST side answers with the HTTP status gRPC's own mapping gives the code
(google.rpc.Code) and ``{"error": message}``. It also answers what the access recorder asks of a gRPC
context (peer, code, details), so a REST call is logged and counted exactly as a gRPC call is.
"""

from __future__ import annotations

import grpc

__all__ = ["Aborted", "CallContext", "HTTP_STATUS"]

# google.rpc.Code -> HTTP, as grpc-gateway and Google's APIs map them
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicers and the access recorder use."""

    def __init__(self, peer: tuple | None):
        host, port = (peer or ("", 0))[:2]
        self._peer = f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
        self._code: grpc.StatusCode | None = None
        self._details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.fail(code, details)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        raise Aborted(code, details)

    def peer(self) -> str:
        return self._peer

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details

    def time_remaining(self):
        return None

    def invocation_metadata(self):
        return ()
