"""A busy port is a clear start-up error, never a second server sharing the port (issue 22)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from histosurv.errors import StartupError
from histosurv.runtime.metrics import ServerMetrics
from histosurv.runtime.server.app import create_server
from histosurv.runtime.server.models import ModelStore

from .conftest import run_cli


def test_a_second_grpc_server_on_a_busy_port_is_refused(tiny_repo):
    async def scenario():
        store = ModelStore(tiny_repo)
        first, port = create_server(store, "127.0.0.1:0")
        await first.start()
        try:
            with pytest.raises(StartupError, match=rf"cannot serve gRPC on 127\.0\.0\.1:{port}: the port is in use"):
                create_server(ModelStore(tiny_repo), f"127.0.0.1:{port}")
            done = run_cli("serve", "--repo", tiny_repo, "--host", "127.0.0.1", "--grpc-port", port)
            return port, done
        finally:
            await first.stop(None)

    port, done = asyncio.run(scenario())
    assert done.returncode == 2
    assert f"histosurv serve: error: cannot serve gRPC on 127.0.0.1:{port}: the port is in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_busy_metrics_port_is_refused_by_name():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: .*--metrics-port"):
            ServerMetrics(lambda: []).start_http("127.0.0.1", port)
