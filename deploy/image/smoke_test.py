"""Smoke test of the serving image: the server started from it answers tritonclient over gRPC and REST,
runs its own HEALTHCHECK command, and stops cleanly on SIGTERM.

The container runs with ``buildah run --isolation chroot`` (host network; ``podman run`` cannot set
rlimits in this sandbox), the model repository mounted read-only at /models as in production. Exit
status 0 only if every check passed.

    python deploy/image/smoke_test.py [--image localhost/histosurv:cpu] [--repo DIR]

Without --repo a small repository is built first (bench/server.py --build: one training epoch + export).
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
BUILDAH = ["buildah", "--storage-driver", "vfs"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default="localhost/histosurv:cpu")
    p.add_argument("--repo", type=Path, help="model repository with 'ammasurv' (default: build one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="histosurv-image-") as tmp:
        repo = args.repo or _build_repo(Path(tmp) / "model_repository")
        # the image's user (uid 10001) must be able to read the models, as on any host mounting them
        shutil.copytree(repo, Path(tmp) / "mounted")
        repo = Path(tmp) / "mounted"
        for path in [repo, *repo.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        Path(tmp).chmod(0o755)
        container = _run(*BUILDAH, "from", "--quiet", args.image).strip()
        try:
            return smoke(container, repo.resolve())
        finally:
            _run(*BUILDAH, "rm", container)


def smoke(container: str, repo: Path) -> int:
    checks: list[tuple[str, bool]] = []
    uid = _run(*BUILDAH, "run", "--isolation", "chroot", container, "--", "id", "-u").strip()
    checks.append((f"runs as the image's non-root user (uid {uid})", uid not in ("", "0")))
    ports = [8000, 8001, 8002] if all(_free(port) for port in (8000, 8001, 8002)) else [_free_port() for _ in range(3)]
    # NOTE: `buildah run` lays the image's anonymous VOLUME over a bind mount at /models (docker and podman
    # run do not), so the repository is mounted beside it here
    command = [*BUILDAH, "run", "--isolation", "chroot", "-v", f"{repo}:/mnt/models:ro", container, "--",
               "histosurv", "serve", "--repo", "/mnt/models", "--host", "127.0.0.1",
               "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    print("$", " ".join(command), flush=True)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _pump(proc)
    try:
        _wait(lines, "metrics on ", proc)
        checks += _client_checks(ports)
        if ports[0] == 8000:
            checks.append(("the image's HEALTHCHECK command passes", _healthcheck(container)))
        server = _server_process(proc)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log = _wait(lines, "stopped", proc, timeout=5)
        checks.append((f"SIGTERM: drained and exited {code} in {time.monotonic() - started:.1f} s ({log!r})", code == 0))
    finally:
        if proc.poll() is None:  # a check failed: stop the server first, then buildah
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    for what, ok in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    failed = sum(not ok for _, ok in checks)
    print(f"image smoke test: {len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


def _client_checks(ports: list[int]) -> list[tuple[str, bool]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
    checks = []
    for door, client in (("REST", http), ("gRPC", grpc)):
        checks.append((f"{door}: live and ready", client.is_server_live() and client.is_server_ready()))
    meta = http.get_model_metadata("ammasurv")
    over_grpc = grpc.get_model_metadata("ammasurv", as_json=True)
    checks.append((f"metadata: inputs {[(t['name'], t['shape']) for t in meta['inputs']]} over REST and gRPC",
                   [t["name"] for t in meta["inputs"]] == [t["name"] for t in over_grpc["inputs"]]))
    bag = _bag({t["name"]: t["shape"] for t in meta["inputs"]})
    risks = {}
    for door, module, client in (("REST", httpclient, http), ("gRPC", grpcclient, grpc)):
        inputs = []
        for name, array in bag.items():
            tensor = module.InferInput(name, list(array.shape), "INT64" if name == "coords" else "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        risks[door] = float(client.infer("ammasurv", inputs).as_numpy("risk")[0])
    checks.append((f"inference: risk {risks['REST']:.6f} over REST, {risks['gRPC']:.6f} over gRPC", risks["REST"] == risks["gRPC"]))
    return checks


def _bag(shapes: dict) -> dict[str, np.ndarray]:
    rng, n = np.random.default_rng(0), 50
    return {
        "features": np.abs(rng.standard_normal((n, shapes["features"][1]))).astype(np.float32),
        "coords": (np.stack(np.divmod(np.arange(n), 8), axis=1) * 256).astype(np.int64),
        "genes": rng.standard_normal(shapes["genes"][0]).astype(np.float32),
    }


def _healthcheck(container: str) -> bool:
    config = json.loads(_run(*BUILDAH, "inspect", "--type", "container", container))
    test = config["Docker"]["config"]["Healthcheck"]["Test"]  # ["CMD", ...]
    done = subprocess.run([*BUILDAH, "run", "--isolation", "chroot", container, "--", *test[1:]], capture_output=True)
    return done.returncode == 0


def _server_process(proc: subprocess.Popen) -> psutil.Process:
    """The histosurv process inside the container (what a runtime's SIGTERM reaches)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        command = child.cmdline()
        if command and not command[0].startswith("buildah") and "serve" in command and "/mnt/models" in command:
            return child  # not buildah-chroot-exec, which holds the same arguments
    raise AssertionError("no histosurv serve process under buildah run")


def _pump(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            print("  |", line.rstrip(), flush=True)
            lines.put(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait(lines: queue.Queue, prefix: str, proc: subprocess.Popen, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None and lines.empty():
                break
            continue
        if line.startswith(prefix):
            return line
    raise SystemExit(f"image smoke test: no line starting {prefix!r} from the server")


def _build_repo(repo: Path) -> Path:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "server.py"), "--build", str(repo)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"building the model repository failed:\n{done.stderr[-3000:]}")
    return repo


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


if __name__ == "__main__":
    sys.exit(main())
