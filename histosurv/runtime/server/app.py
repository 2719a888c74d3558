"""Assembling and running the gRPC server (``grpc.aio``) on a model store.

Message size limits are set on the server (clients set theirs on the channel): a 64k-patch bag of
1024-d FP32 features is 256 MiB, so the default allows 512 MiB. ``grpc.health.v1`` answers NOT_SERVING
until the models are loaded and again once shutdown begins, so load balancers stop sending first;
server reflection lists the services for grpcurl and friends.
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto import grpc_service_pb2 as pb
from ._proto import grpc_service_pb2_grpc as pb_grpc
from .kserve import InferenceServicer
from .models import ModelStore

__all__ = ["create_server", "serve", "ServeOptions", "DEFAULT_MAX_MESSAGE_BYTES", "INFERENCE_SERVICE"]

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass
class ServeOptions:
    repository: str
    host: str = "0.0.0.0"
    grpc_port: int = 8001  # Triton's
    model_control: str = "none"  # none | explicit
    engine: str = "auto"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 30.0


def create_server(
    store: ModelStore,
    address: str = "127.0.0.1:8001",
    model_control: str = "none",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int]:
    """A server with the KServe v2 service, health and reflection, bound to ``address`` (port 0: any
    free port); returns it, not yet started, with the bound port. Call it inside the loop that runs it.
    The health servicer is ``server.health``; it reports SERVING once ``store`` has a model loaded."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(store, model_control), server)
    server.health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(server.health, server)
    names = (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=pb.POOL)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the gRPC server to {address}")
    return server, port


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", INFERENCE_SERVICE):  # "" is the whole server, as grpc health checkers ask
        await server.health.set(service, status)


async def serve(options: ServeOptions) -> None:
    """Runs until SIGTERM or SIGINT, then stops taking requests and lets running ones finish within
    ``grace_seconds``."""
    store = ModelStore(options.repository, engine=options.engine)
    server, port = create_server(
        store, f"{options.host}:{options.grpc_port}", options.model_control, options.max_message_bytes
    )
    await set_serving(server, False)
    await server.start()
    await asyncio.to_thread(store.load_all)
    for name, version, state, reason in store.index():
        _say(f"model {name} {version or '-'}: {state}{' (' + reason + ')' if reason else ''}")
    await set_serving(server, store.ready)
    _say(f"serving KServe v2 gRPC on {options.host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _say(f"shutting down: finishing running requests (up to {options.grace_seconds:g} s)")
    await set_serving(server, False)
    await server.stop(grace=options.grace_seconds)
    _say("stopped")


def _say(message: str) -> None:
    print(message, flush=True)  # flushed: supervisors and tests read the log line by line
