"""Faults injected into batch scoring and a polling server (issue 22): a full disk stops `score` cleanly
and a rerun completes it, a damaged feature-cache entry is caught by its checksum and recomputed, and
a model version being written under `serve --model-control poll` never serves half-written.

The full disk is injected at the lowest level Python reaches without root: ``os.fsync`` of a record's
temporary file (where ext4 and xfs report delayed-allocation ENOSPC) and the h5py write of the cached
features; ``bench/faults.py`` runs the same scenario on a real, small tmpfs where it may mount one."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time

import pandas as pd
import pytest

from histosurv.runtime.batch import scoring
from histosurv.runtime.batch.rundir import DiskFull
from histosurv.runtime.batch.runner import score_archive
from histosurv.runtime.batch.scoring import ScoringConfig
from histosurv.runtime.pipeline import SlideConfig
from histosurv.runtime.repository import sha256_file

tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")


@pytest.fixture(scope="module")
def archive3(slide_repo, cmu_svs, tmp_path_factory):
    """Three copies of the real SVS for two patients, and the uninterrupted run of them (the reference
    tables and a feature cache the fault runs start from, so they fuse instead of encoding again)."""
    repo, cohort_dir, _ = slide_repo
    root = tmp_path_factory.mktemp("archive3")
    cases = pd.read_csv(cohort_dir / "genes.csv")["case_id"].astype(str).tolist()[:2]
    rows = []
    for i in range(3):
        shutil.copy(cmu_svs, root / f"slide-{i}.svs")
        rows.append({"path": str(root / f"slide-{i}.svs"), "slide_id": f"S{i}", "case_id": cases[i // 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    config = ScoringConfig(repository=str(repo), genes=str(cohort_dir / "genes.csv"), slide=SlideConfig(batch_size=8))
    score_archive(root / "manifest.csv", root / "whole", config)
    return root, config


def _seeded(archive3, out):
    """A run folder whose feature cache is the reference run's (files and checksums)."""
    root, _ = archive3
    shutil.copytree(root / "whole" / "features", out / "features")
    return out


def _tables_equal(out, reference):
    for name in ("slides.parquet", "patients.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / name), pd.read_parquet(reference / name))


def _journal(out):
    return [json.loads(line) for line in (out / "journal.log").read_text().splitlines()]


def test_a_full_disk_at_a_record_stops_the_run_and_a_rerun_completes_it(archive3, tmp_path, monkeypatch):
    root, config = archive3
    out = _seeded(archive3, tmp_path / "run")
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        # the second slide's record meets a full disk; everything else (run.json, other files) is written
        if "/results/" in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFull) as stopped:
        score_archive(root / "manifest.csv", out, config)
    message = str(stopped.value)
    assert "no space left" in message and "record of slide 'S1'" in message and "run the same command again" in message
    # stopped, not recorded as failed: S0 committed whole, S1 and S2 not at all, no temporary file left
    assert sorted(p.name for p in (out / "results").iterdir()) == ["S0.json"]
    assert json.loads((out / "results" / "S0.json").read_text())["status"] == "scored"
    assert not (out / "slides.parquet").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)  # space is back

    again = score_archive(root / "manifest.csv", out, config)
    assert (again.scored_now, again.skipped, again.failed) == (2, 1, 0)
    _tables_equal(out, root / "whole")
    scored = [e["slide_id"] for e in _journal(out) if e["event"] == "scored"]
    assert sorted(scored) == ["S0", "S1", "S2"]  # each committed exactly once


# what h5py 3 raises on a full tmpfs: from a dataset's write, and from the file's close (as RuntimeError)
H5PY_FULL = {
    "write": OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, "
                     "error message = 'No space left on device')"),
    "close": RuntimeError("Can't decrement id ref count (file write failed: errno = 28, error message = "
                          "'No space left on device')"),
}


@pytest.mark.parametrize("where", list(H5PY_FULL))
def test_a_full_disk_while_caching_features_stops_the_run_instead_of_failing_slides(archive3, tmp_path, monkeypatch, where):
    root, config = archive3
    manifest = tmp_path / "one.csv"
    pd.read_csv(root / "manifest.csv").iloc[:1].to_csv(manifest, index=False)

    def write_bag(path, bag):
        raise H5PY_FULL[where]

    monkeypatch.setattr(scoring, "write_bag", write_bag)
    with pytest.raises(DiskFull, match="features of slide 'S0'"):
        score_archive(manifest, tmp_path / "run", config)
    assert list((tmp_path / "run" / "results").iterdir()) == []  # not a 'failed' record to retry by hand
    assert list((tmp_path / "run" / "features").iterdir()) == []


def test_the_cli_names_the_full_disk(archive3, tmp_path, monkeypatch, capsys):
    from histosurv.cli import main

    root, config = archive3
    out = _seeded(archive3, tmp_path / "run")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)  # full from the start: not even run.json fits
    code = main(["score", str(root / "manifest.csv"), "--repo", config.repository, "--out", str(out), "--genes", config.genes])
    err = capsys.readouterr().err
    assert code == 2 and "histosurv score: error: no space left on the disk of" in err and "run.json" in err


def test_a_damaged_cache_entry_is_caught_by_its_checksum_and_recomputed(archive3, tmp_path):
    root, config = archive3
    out = _seeded(archive3, tmp_path / "run")
    truncated, altered = out / "features" / "S0.h5", out / "features" / "S1.h5"
    size = truncated.stat().st_size
    with open(truncated, "r+b") as f:
        f.truncate(size // 2)
    data = bytearray(altered.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte changed: only a checksum sees it
    altered.write_bytes(bytes(data))

    notes = []
    result = score_archive(root / "manifest.csv", out, config, log=notes.append)
    assert result.failed == 0
    _tables_equal(out, root / "whole")  # the same risks as from the undamaged cache
    records = {s: json.loads((out / "results" / f"{s}.json").read_text()) for s in ("S0", "S1", "S2")}
    assert records["S0"]["cache"].startswith("recomputed: S0.h5 does not match its checksum")
    assert f"{size // 2} bytes" in records["S0"]["cache"]
    assert records["S1"]["cache"].startswith("recomputed: S1.h5 does not match its checksum")
    assert records["S2"]["cache"] == "hit"
    assert [e["slide_id"] for e in _journal(out) if e["event"] == "cache"] == ["S0", "S1"]
    assert any("slide S0: cached features recomputed" in n for n in notes)
    assert truncated.stat().st_size == size  # rewritten whole, with a checksum that matches again
    assert scoring.cache_problem(truncated) is None and scoring.cache_problem(altered) is None

    (out / "features" / "S2.h5.sha256").unlink()  # a cache entry written before checksums (or cut before its sidecar)
    assert "has no checksum" in scoring.cache_problem(out / "features" / "S2.h5")


# --- poll mode -----------------------------------------------------------------------------------------


def _slow_copy(src, dest, chunks: int = 6, pause: float = 0.15) -> None:
    """Writes ``src`` to ``dest`` in pieces, flushed, with pauses: a scan sees each partial state."""
    data = src.read_bytes()
    step = -(-len(data) // chunks)
    with open(dest, "wb") as f:
        for start in range(0, len(data), step):
            if start:
                time.sleep(pause)
            f.write(data[start:start + step])
            f.flush()


def _new_version_files(model_dir, new: int):
    """Version ``new``: version 1's files with the ONNX graph's doc string changed (other bytes, other
    sha256, same outputs), and the manifest listing it."""
    import onnx

    staging = model_dir.parent.parent / f"staging-{new}"
    shutil.copytree(model_dir / "1", staging)
    graph = onnx.load(staging / "model.onnx")
    graph.doc_string = f"version {new}"
    onnx.save(graph, staging / "model.onnx")
    manifest = json.loads((model_dir / "histosurv.json").read_text())
    record = json.loads(json.dumps(manifest["versions"]["1"]))
    record["files"] = {name: sha256_file(staging / name) for name in record["files"]}
    manifest["versions"][str(new)] = record
    return staging, manifest


@pytest.mark.parametrize("manifest_first", [True, False], ids=["manifest-first", "files-first"])
def test_poll_mode_never_serves_a_half_written_version(tiny_repo, tmp_path, manifest_first):
    from histosurv.runtime.server.app import poll_repository
    from histosurv.runtime.server.models import ModelStore

    from .serving import RunningServer
    from .test_metrics import _inputs

    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_repo / "ammasurv", repo / "ammasurv")
    model_dir = repo / "ammasurv"
    staging, manifest = _new_version_files(model_dir, 2)
    store = ModelStore(repo)
    store.load_all()
    running = RunningServer(store)
    poller = asyncio.run_coroutine_threadsafe(poll_repository(store, 0.05), running.loop)
    served, errors, stop, complete_at = [], [], threading.Event(), []

    def client_loop():
        with tritonclient.InferenceServerClient(running.url) as client:
            while not stop.is_set():
                try:
                    response = client.infer("ammasurv", _inputs(12))
                    served.append((time.monotonic(), response.get_response().model_version,
                                   float(response.as_numpy("risk").reshape(-1)[0])))
                except Exception as e:  # noqa: BLE001 - every failure is a finding here
                    errors.append(repr(e))

    clients = [threading.Thread(target=client_loop) for _ in range(2)]
    try:
        for t in clients:
            t.start()

        def write_manifest():
            tmp = model_dir / "histosurv.json.tmp"
            tmp.write_text(json.dumps(manifest))
            tmp.replace(model_dir / "histosurv.json")

        if manifest_first:
            write_manifest()
        (model_dir / "2").mkdir()
        for name in sorted(p.name for p in staging.iterdir()):
            time.sleep(0.15)
            _slow_copy(staging / name, model_dir / "2" / name)
        if not manifest_first:
            time.sleep(0.3)  # scans of the complete folder not yet listed: nothing changes
            write_manifest()
        complete_at.append(time.monotonic())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(v == "2" for _, v, _ in served[-5:]):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
        poller.cancel()
        running.stop()
    assert errors == []
    early = [v for t, v, _ in served if t < complete_at[0]]
    assert len(early) > 10 and set(early) == {"1"}  # requests ran throughout the copy, all on version 1
    assert served[-1][1] == "2"  # the complete version serves
    risks = {round(r, 6) for _, _, r in served}
    assert len(risks) == 1, risks  # every answer is the same model's, whichever version
