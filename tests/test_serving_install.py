"""The serving set installs without torch and serves what the full install exported.

A fresh virtual environment gets ``pip install <checkout>`` (the base install: no extra, so no torch),
then its ``histosurv predict`` and ``histosurv serve`` run on a model repository that this (full) install
trained and exported: the risks must be the ones the full install computes, ModelInfer and ScoreSlide
must both answer, and SIGTERM must stop the server cleanly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")

from histosurv.data.cohort import case_files  # noqa: E402
from histosurv.data.features import read_bag  # noqa: E402
from histosurv.data.tables import GeneTable, patients_from_clinical, read_clinical  # noqa: E402
from histosurv.runtime.predict import FusionPredictor  # noqa: E402
from histosurv.runtime.server._proto import slide_service_pb2 as spb  # noqa: E402
from histosurv.runtime.server._proto import slide_service_pb2_grpc as spb_grpc  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .serving import ServeProcess, infer_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8  # patches per encoder call, in the server and in the full install's predict alike
# what pip prints when it cannot reach an index (no route, no DNS, a proxy refusing, a timeout)
NETWORK_ERRORS = (
    "Could not find a version that satisfies", "No matching distribution found", "NewConnectionError",
    "Failed to establish a new connection", "Temporary failure in name resolution", "Name or service not known",
    "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "Max retries exceeded",
)


def _pip(venv: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})


def _tail(text: str, lines: int = 15) -> str:
    # pip warns once per package about index folders that do not exist: keep the lines that tell
    kept = [line for line in text.splitlines() if " is ignored: " not in line]
    return "\n".join(kept[-lines:])


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory):
    """A fresh venv with the checkout's base install: the serving set, without torch."""
    base = tmp_path_factory.mktemp("serving_install")
    # pip builds the wheel where the source lies; a copy keeps build/ and egg-info out of the checkout
    # (and files a stale build/ left there out of the wheel)
    src = base / "src"
    shutil.copytree(ROOT / "histosurv", src / "histosurv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)

    # the index reachable? A small package of the serving set, downloaded alone, tells
    probe = _pip(venv, "download", "--no-deps", "--quiet", "--dest", str(base / "probe"), "click", timeout=300)
    if probe.returncode != 0:
        if any(marker in probe.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"no package index reachable to install the serving set: {_tail(probe.stderr, 3)}")
        pytest.fail(f"pip download failed:\n{_tail(probe.stderr)}")
    started = time.monotonic()
    install = _pip(venv, "install", "--quiet", str(src))
    assert install.returncode == 0, f"pip install of the serving set failed:\n{_tail(install.stderr)}"
    print(f"serving set installed in {time.monotonic() - started:.0f} s")
    yield venv
    shutil.rmtree(base, ignore_errors=True)  # about 700 MB, and pytest keeps the temp folders of three sessions


@pytest.fixture(scope="module")
def case(slide_repo):
    """The fixture case's feature file, its model-ordered gene vector and the full install's predictor."""
    repo, cohort_dir, case_id = slide_repo
    patients = patients_from_clinical(read_clinical(cohort_dir / "clinical.csv"))
    [(_, paths)] = [c for c in case_files(patients, cohort_dir / "features") if c[0] == case_id]
    predictor = FusionPredictor.from_repository(repo, "ammasurv", engine="onnxruntime")
    genes = predictor.genes_for(GeneTable.read(cohort_dir / "genes.csv"), case_id)
    return paths[0], genes, predictor


def _run(venv: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "histosurv"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HISTOSURV_THREADS": "1"})


def _first_json(stdout: str) -> dict:
    """The JSON report predict prints (a timing line follows it)."""
    return json.JSONDecoder().raw_decode(stdout.lstrip())[0]


def test_the_serving_set_has_no_torch_and_names_the_extra(serving_venv):
    python = str(serving_venv / "bin" / "python")
    for module in ("torch", "onnxscript", "safetensors"):
        found = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert found.returncode != 0 and "ModuleNotFoundError" in found.stderr, f"{module} is in the serving set"
    # the serving path imports neither torch nor the export side
    loaded = subprocess.run(
        [python, "-c", "import sys, histosurv.cli, histosurv.cli.serve, histosurv.runtime.server.app, "
         "histosurv.runtime.pipeline, histosurv.runtime.batch.runner; histosurv.cli.build_parser(); "
         "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('histosurv.export')))"],
        capture_output=True, text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"

    listing = _run(serving_venv, "--help")
    assert listing.returncode == 0, listing.stderr
    for command in ("predict", "tile", "score", "serve", "train", "export"):
        assert f"    {command} " in listing.stdout
    for command in ("predict", "serve", "tile", "score"):
        assert _run(serving_venv, command, "--help").returncode == 0
    assert subprocess.run([python, "-m", "histosurv", "--version"], capture_output=True, text=True).returncode == 0

    # the PyTorch side explains itself: its help, and one line naming the install command when run
    helped = _run(serving_venv, "train", "--help")
    assert helped.returncode == 0 and "histosurv[train]" in helped.stdout
    for argv in (("train", "--clinical", "c.csv", "--out", "run"), ("export", "--run", "run", "--repo", "repo"), ("demo",)):
        refused = _run(serving_venv, *argv)
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"histosurv {argv[0]}: error: needs the PyTorch side, which this install lacks (no module named 'torch'): "
            "pip install 'histosurv[train]'"
        )


def test_predict_gives_the_full_install_risk(serving_venv, slide_repo, case):
    repo, cohort_dir, case_id = slide_repo
    features, _, _ = case
    argv = ("predict", "--repo", repo, "--model", "ammasurv", "--case-id", case_id, "--features", features,
            "--genes", cohort_dir / "genes.csv")
    served = _run(serving_venv, *argv)
    assert served.returncode == 0, served.stderr
    full = run_cli(*argv)
    assert full.returncode == 0, full.stderr
    risk, expected = _first_json(served.stdout)["risk"], _first_json(full.stdout)["risk"]
    assert math.isfinite(risk) and risk == pytest.approx(expected, rel=1e-6)
    assert "on onnxruntime" in served.stdout


def test_serve_answers_model_infer_and_score_slide_then_stops_on_sigterm(serving_venv, slide_repo, case, cmu_svs):
    repo, cohort_dir, case_id = slide_repo
    features, genes, predictor = case
    server = ServeProcess(repo, "--slide-root", str(cmu_svs.parent), "--reader", "openslide", "--no-batching",
                          "--batch-size", str(BATCH), "--grace", "30", command=[str(serving_venv / "bin" / "histosurv")])
    try:
        assert any(line.startswith("model ammasurv 1: READY") for line in server.log)

        # ModelInfer: a bag of the cohort, exactly as the full install's runtime scores it
        bag = read_bag(features)
        arrays = {"features": bag.features.astype(np.float32), "coords": bag.coords.astype(np.int64),
                  "genes": np.asarray(genes, dtype=np.float32)}
        with tritonclient.InferenceServerClient(server.url) as client:
            result = client.infer("ammasurv", infer_inputs(arrays))
        risk = float(result.as_numpy("risk")[0])
        expected = predictor.slide(bag, genes).risk
        assert math.isfinite(risk) and risk == pytest.approx(expected, rel=1e-5)

        # ScoreSlide: the real Aperio slide, read by OpenSlide (the serving set has no cuCIM)
        with grpc.insecure_channel(server.url) as channel:
            events = list(spb_grpc.SlideServiceStub(channel).ScoreSlide(
                spb.ScoreSlideRequest(slide_uri=cmu_svs.name, model_name="ammasurv", genes=genes, id="cmu"), timeout=300))
        scored = events[-1].result
        assert scored.id == "cmu" and math.isfinite(scored.risk) and scored.n_patches > 0
        full = run_cli("predict", "--repo", repo, "--case-id", case_id, "--genes", cohort_dir / "genes.csv",
                       "--slide", cmu_svs, "--reader", "openslide", "--batch-size", BATCH)
        assert full.returncode == 0, full.stderr
        report = _first_json(full.stdout)
        assert scored.n_patches == report["slides"][0]["n_patches"]
        assert scored.risk == pytest.approx(report["risk"], rel=1e-5)

        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            assert 'nv_inference_request_success{model="ammasurv",version="1"} 2' in response.read().decode()

        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("stopped")
        assert server.proc.wait(30) == 0
    finally:
        server.close()
