"""Fault injection with figures (issue 22): each scenario injects one fault into `histosurv score` or
`histosurv serve --model-control poll`, run as users run them (child processes), and prints one line:
what was injected, what was observed, and the outcome (PASS/FAIL).

1. disk full: `score` writes its run folder on a tmpfs too small for the second slide (a real ENOSPC,
   from h5py or the record's write; needs root to mount, else the scenario says it was skipped; tests/test_faults.py injects
   ENOSPC without root). The run must stop with a message naming the full disk, leave every committed
   record whole, and a rerun after the tmpfs grows must give the tables of an uninterrupted run.
2. damaged cache: a cached features file cut in half; the rerun must say so and recompute, same risks.
3. Ray actor killed: the encoder actor is SIGKILLed while it encodes a slide (`score --ray local`);
   Ray restarts it and retries the slide: each slide once in slides.parquet, the risks of the local run.
4. poll: a new model version is written file by file (manifest first) under a polling server while
   two clients send requests: no request fails, none is answered by the half-written version, then
   the complete version serves.

    python bench/faults.py --repo /tmp/hs-repo          # a few minutes; builds the repository once if needed
    python bench/faults.py --only poll,cache
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import MODEL, ensure_repository  # noqa: E402
from server import SCRIPT as SERVER_SCRIPT  # noqa: E402
from server import ServerProcess, infer_client, infer_inputs, make_bag  # noqa: E402

SCENARIOS = ("disk", "cache", "ray", "poll")


def histosurv(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "histosurv", *map(str, args)], capture_output=True, text=True,
                          timeout=1200, **kw)


class Archive:
    """Three copies of the real SVS for two patients, the gene table, and their uninterrupted local run."""

    def __init__(self, tmp: Path, repo: Path):
        from histosurv.data.demo_slide import demo_slide
        from histosurv.runtime.predict import FusionPredictor

        self.tmp, self.repo = tmp, repo
        names = FusionPredictor.from_repository(repo, MODEL).gene_names
        values = np.random.default_rng(0).standard_normal((2, len(names)))
        self.genes = tmp / "genes.csv"
        pd.DataFrame(values, columns=names).assign(case_id=["P0", "P1"]).to_csv(self.genes, index=False)
        svs = demo_slide()
        rows = [{"path": str(shutil.copy(svs, tmp / f"slide-{i}.svs")), "slide_id": f"S{i}", "case_id": f"P{i // 2}"}
                for i in range(3)]
        self.manifest = tmp / "manifest.csv"
        pd.DataFrame(rows).to_csv(self.manifest, index=False)
        self.two = tmp / "two.csv"
        pd.DataFrame(rows[:2]).to_csv(self.two, index=False)
        self.whole = tmp / "whole"
        done = self.score(self.manifest, self.whole)
        assert done.returncode == 0, done.stderr[-2000:]

    def score(self, manifest, out, *extra) -> subprocess.CompletedProcess:
        return histosurv("score", manifest, "--repo", self.repo, "--out", out, "--genes", self.genes, "--batch-size", 8, *extra)

    def reference(self, manifest, out) -> Path:
        """The uninterrupted run's tables for ``manifest``, from the whole run's feature cache."""
        shutil.copytree(self.whole / "features", out / "features")
        assert self.score(manifest, out).returncode == 0
        return out


def same_tables(a: Path, b: Path) -> bool:
    try:
        for name in ("slides.parquet", "patients.parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name))
        return True
    except AssertionError:
        return False


def scored_events(out: Path) -> Counter:
    lines = (out / "journal.log").read_text().splitlines()
    return Counter(json.loads(line)["slide_id"] for line in lines if json.loads(line)["event"] == "scored")


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1][:220]


# --- 1. disk full ----------------------------------------------------------------------------------


def disk_full(archive: Archive) -> tuple[str, str, bool]:
    mount = archive.tmp / "full"
    mount.mkdir()
    features = archive.whole / "features" / "S0.h5"
    from histosurv.runtime.batch.scoring import HDF5_MARGIN

    # the first slide's files fit (with the space score reserves before HDF5 writes), the second slide's features do not
    size = features.stat().st_size + HDF5_MARGIN + 48 * 1024
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        return "ENOSPC on a small tmpfs", f"skipped: cannot mount one ({made.stderr.strip()[:80]})", True
    try:
        out = mount / "run"
        first = archive.score(archive.two, out)
        records = sorted((out / "results").glob("*.json"))
        whole = all(json.loads(r.read_text())["status"] == "scored" for r in records)
        leftovers = [p.name for p in out.rglob("*.tmp")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)  # space is back
        again = archive.score(archive.two, out)
        reference = archive.reference(archive.two, archive.tmp / "ref-two")
        ok = (first.returncode == 2 and "no space left" in first.stderr and len(records) == 1 and whole and not leftovers
              and again.returncode == 0 and same_tables(out, reference) and set(scored_events(out).values()) == {1})
        observed = (f"exit {first.returncode}, {len(records)} record(s) committed, all whole: "
                    f"{whole}, temporary files left: {len(leftovers)}; message: {last_line(first.stderr)!r}; after "
                    f"growing it, rerun exit {again.returncode}: {last_line(again.stdout)!r}; tables equal an "
                    f"uninterrupted run's: {same_tables(out, reference)}")
        return f"ENOSPC (real: a {size // 1024} KiB tmpfs, room for one slide) while scoring two", observed, ok
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# --- 2. damaged cache ------------------------------------------------------------------------------


def damaged_cache(archive: Archive) -> tuple[str, str, bool]:
    out = archive.tmp / "cache-run"
    shutil.copytree(archive.whole, out)
    cached = out / "features" / "S0.h5"
    size = cached.stat().st_size
    with open(cached, "r+b") as f:
        f.truncate(size // 2)
    again = archive.score(archive.manifest, out, "--restart")
    record = json.loads((out / "results" / "S0.json").read_text())
    said = [line for line in again.stderr.splitlines() if "recomputed" in line]
    ok = (again.returncode == 0 and record.get("cache", "").startswith("recomputed") and bool(said)
          and same_tables(out, archive.whole) and cached.stat().st_size == size)
    observed = (f"rerun exit {again.returncode}, S0 record cache={record.get('cache', '')[:90]!r}; printed: "
                f"{said[0][:120] if said else 'nothing'!r}; tables equal the undamaged run's: {same_tables(out, archive.whole)}")
    return f"features/S0.h5 truncated from {size} to {size // 2} bytes", observed, ok


# --- 3. Ray encoder actor killed -------------------------------------------------------------------


def ray_actor_killed(archive: Archive) -> tuple[str, str, bool]:
    if importlib.util.find_spec("ray") is None:
        return "SIGKILL to the Ray encoder actor", "skipped: Ray is not installed (pip install 'histosurv[ray]')", True
    out = archive.tmp / "ray-run"
    command = [sys.executable, "-m", "histosurv", "score", str(archive.manifest), "--repo", str(archive.repo), "--out",
               str(out), "--genes", str(archive.genes), "--batch-size", "8", "--ray", "local", "--ray-workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    killed, committed_then, deadline = None, None, time.monotonic() + 900
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        busy = [p for p in _descendants(proc.pid) if "_Featurize" in _title(p) and ".submit" in _title(p)]
        committed = len(list((out / "results").glob("*.json"))) if (out / "results").exists() else 0
        if busy and committed >= 1:  # mid-run, and the encoder actor is inside a slide now
            killed, committed_then = busy[0].pid, committed
            busy[0].kill()
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=900)
    if killed is None:
        return "SIGKILL to the Ray encoder actor", f"not injected: no busy actor seen (exit {proc.returncode}, {last_line(stderr)!r})", False
    slides = pd.read_parquet(out / "slides.parquet") if (out / "slides.parquet").exists() else pd.DataFrame()
    events = scored_events(out)
    workers = {json.loads(p.read_text()).get("worker") for p in (out / "results").glob("*.json")}
    reference = pd.read_parquet(archive.whole / "slides.parquet")
    same_risks = len(slides) == 3 and np.allclose(slides["risk"], reference["risk"], rtol=1e-6)
    ok = (proc.returncode == 0 and list(slides.get("slide_id", [])) == ["S0", "S1", "S2"]
          and (slides["status"] == "scored").all() and set(events.values()) == {1} and same_risks)
    observed = (f"killed pid {killed} with {committed_then} slide(s) committed; exit {proc.returncode}; slides.parquet "
                f"rows {list(slides.get('slide_id', []))}, statuses {dict(Counter(slides.get('status', [])))}; "
                f"'scored' journal lines per slide {dict(events)}; encoder pids in the records {len(workers)} "
                f"(a restarted actor is a new pid); risks equal the local run's: {same_risks}")
    return "SIGKILL to the Ray encoder actor while it encodes a slide", observed, ok


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


# --- 4. poll mode ----------------------------------------------------------------------------------


def half_written_version(archive: Archive) -> tuple[str, str, bool]:
    import onnx

    from histosurv.runtime.repository import sha256_file

    repo = archive.tmp / "poll-repo"
    shutil.copytree(archive.repo, repo)
    model = repo / MODEL
    latest = max(int(p.name) for p in model.iterdir() if p.name.isdigit())
    new = latest + 1
    staging = archive.tmp / "staging"
    shutil.copytree(model / str(latest), staging)
    graph = onnx.load(staging / "model.onnx")
    graph.doc_string = f"version {new}"  # other bytes and sha256, the same outputs
    onnx.save(graph, staging / "model.onnx")
    manifest = json.loads((model / "histosurv.json").read_text())
    record = json.loads(json.dumps(manifest["versions"][str(latest)]))
    record["files"] = {name: sha256_file(staging / name) for name in record["files"]}
    manifest["versions"][str(new)] = record

    server = ServerProcess("poll", repo, ["--model-control", "poll", "--poll-seconds", "0.05"])
    n_genes = len(record.get("genes", {}).get("names", [])) or _genes_of(repo)
    bag = make_bag(64, n_genes, seed=1)
    served, errors, stop = [], [], threading.Event()

    def client():
        conn = infer_client(server.url)
        while not stop.is_set():
            try:
                response = conn.infer(MODEL, infer_inputs(bag))
                served.append((time.monotonic(), response.get_response().model_version, float(response.as_numpy("risk")[0])))
            except Exception as e:  # noqa: BLE001
                errors.append(str(e)[:160])

    threads = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(1)
        tmp = model / "histosurv.json.tmp"
        tmp.write_text(json.dumps(manifest))
        tmp.replace(model / "histosurv.json")  # the manifest first: version `new` is listed before its files exist
        (model / str(new)).mkdir()
        for path in sorted(staging.iterdir()):
            data = path.read_bytes()
            with open(model / str(new) / path.name, "wb") as f:
                for k in range(8):  # a piece every 0.1 s: scans see the file growing
                    f.write(data[k * len(data) // 8:(k + 1) * len(data) // 8])
                    f.flush()
                    if k < 7:
                        time.sleep(0.1)
        complete = time.monotonic()
        deadline = complete + 60
        while time.monotonic() < deadline and not any(v == str(new) for _, v, _ in served[-4:]):
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    early = Counter(v for t, v, _ in served if t < complete)
    late = Counter(v for t, v, _ in served if t >= complete)
    refused = sum("UNAVAILABLE" in line and f"{MODEL} {new}" in line for line in server.log)
    ok = not errors and set(early) == {str(latest)} and served and served[-1][1] == str(new) \
        and len({round(r, 6) for _, _, r in served}) == 1
    observed = (f"answers while the copy ran: {dict(early)}, after it: {dict(late)}; failed requests {len(errors)}"
                f"{' (' + errors[0] + ')' if errors else ''}; scans that refused the partial version: {refused}")
    return f"version {new} written file by file (8 pieces, 0.1 s apart) under poll every 0.05 s", observed, ok


def _genes_of(repo: Path) -> int:
    from histosurv.runtime.predict import FusionPredictor

    return len(FusionPredictor.from_repository(repo, MODEL).gene_names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, help="model repository (built once if it lacks the model)")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {','.join(SCENARIOS)}")
    args = p.parse_args(argv)
    chosen = args.only.split(",")
    runs = {"disk": disk_full, "cache": damaged_cache, "ray": ray_actor_killed, "poll": half_written_version}
    failed = 0
    with tempfile.TemporaryDirectory(prefix="histosurv-faults-") as tmp:
        tmp = Path(tmp)
        repo = (args.repo or tmp / "model_repository").resolve()
        ensure_repository(repo, SERVER_SCRIPT)
        archive = Archive(tmp, repo) if set(chosen) - {"poll"} else Archive.__new__(Archive)
        archive.tmp, archive.repo = tmp, repo
        for name in chosen:
            started = time.monotonic()
            injected, observed, ok = runs[name](archive)
            failed += not ok
            print(f"[{name}] injected: {injected}\n    observed: {observed}\n    outcome: {'PASS' if ok else 'FAIL'} "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    print(f"{len(chosen) - failed} of {len(chosen)} scenarios passed; load average {psutil.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
