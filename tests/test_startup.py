"""Problems of the machine, not of the input, are clear errors without tracebacks (issue 22): a busy port
(never a second server sharing it), a missing optional package."""

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


def test_a_missing_optional_package_names_the_extra_to_install(tiny_repo, tmp_path):
    import importlib.util
    import shutil

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the refusal cannot happen")
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    done = run_cli("export", "--repo", repo, "--add-engine", "tensorrt", "--name", "ammasurv")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "histosurv export: error: this needs TensorRT, which is not installed: pip install 'histosurv[tensorrt]'" in done.stderr
