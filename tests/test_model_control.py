"""Model versions on a running server: poll mode picks up new versions, a corrupt one never replaces
the version serving, and requests already running finish on the version they started on."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")

from histosurv.runtime.server.app import poll_repository  # noqa: E402
from histosurv.runtime.server.models import ModelStore  # noqa: E402

from .serving import RunningServer  # noqa: E402
from .test_metrics import _inputs  # noqa: E402


def add_version(model_dir, new: int, corrupt: bool = False) -> None:
    """Copies version 1 to ``new`` and lists it in the manifest, as an export of a retrained model would."""
    shutil.copytree(model_dir / "1", model_dir / f"{new}.tmp")
    if corrupt:  # a copy cut short: its sha256 no longer matches the manifest
        onnx = model_dir / f"{new}.tmp" / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    (model_dir / f"{new}.tmp").rename(model_dir / str(new))
    manifest = json.loads((model_dir / "histosurv.json").read_text())
    manifest["versions"][str(new)] = manifest["versions"]["1"]
    (model_dir / "histosurv.json.tmp").write_text(json.dumps(manifest))
    (model_dir / "histosurv.json.tmp").replace(model_dir / "histosurv.json")


def _wait(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("the server did not pick up the change")


def test_poll_mode_keeps_the_working_version_when_a_new_one_is_corrupt(tiny_repo, tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repo / "ammasurv", repo / "ammasurv")
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store)
    poller = asyncio.run_coroutine_threadsafe(poll_repository(store, 0.2), running.loop)
    try:
        with tritonclient.InferenceServerClient(running.url) as client:
            def served_version():
                return client.infer("ammasurv", _inputs(12)).get_response().model_version

            assert served_version() == "1"
            add_version(repo / "ammasurv", 2, corrupt=True)
            _wait(lambda: any(m["version"] == "2" for m in client.get_model_repository_index(as_json=True)["models"]))
            index = {m["version"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
            assert index["1"]["state"] == "READY"
            assert index["2"]["state"] == "UNAVAILABLE" and "sha256 does not match" in index["2"]["reason"]
            assert served_version() == "1" and client.is_model_ready("ammasurv", "1")

            # repaired: the next scan loads it and requests move to it
            shutil.copy(repo / "ammasurv" / "1" / "model.onnx", repo / "ammasurv" / "2" / "model.onnx")
            _wait(lambda: client.is_model_ready("ammasurv", "2"))
            assert served_version() == "2" and not client.is_model_ready("ammasurv", "1")

            shutil.rmtree(repo / "ammasurv")
            _wait(lambda: not client.is_model_ready("ammasurv"))
    finally:
        poller.cancel()
        running.stop()


# a slide running while a new version loads: tests/test_server_determinism.py (held by a hook, not timed)
