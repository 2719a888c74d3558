"""Batch scoring of a slide archive (``histosurv score``): slides per hour here and on Ray Data.

Why: ``histosurv score`` runs an archive either in its own process (the local backend) or on Ray
Data (``--ray``), where encoder actors featurize slides and one fusion actor scores them. Ray is
there to scale out; on one machine it costs a cluster start-up and splits the cores between actors.
This bench measures what a user gets from each on the same archive, in the same run, with the local
backend as the baseline:

* ``local``          ``histosurv score MANIFEST --out ...`` (one process, slides one after another);
* ``ray, 1 worker``  the same with ``--ray local --ray-workers 1`` (a local Ray started by the run);
* ``ray, 2 workers`` the same with ``--ray local --ray-workers 2``.

Each is a fresh ``python -m histosurv score`` process scoring every slide into a fresh ``--out``
folder (no feature cache to reuse), with ``RAY_AUTH_MODE=disabled`` in its environment as in the
tests. Two figures per run:

* ``wall``: slides (and tissue patches) per hour over the process's whole wall time: interpreter and
  imports, Ray's start-up and shutdown, actor start-up, ONNX Runtime session creation (which every
  run pays, the local one included) and the final tables. This is what a user waits for.
* ``steady``: the rate at which slides are featurized once running, from the run folder: each
  slide's features file (``features/<slide>.h5``, written by the process that featurized it, just
  before the ~20 ms fusion) dates the end of its featurizing, and the slides are grouped by that
  process (the ``worker`` pid in ``results/<slide>.json`` on Ray; the single score process locally).
  Each worker's first slide is dropped (it carries the start-up and the encoder's first-call costs),
  and the workers' rates (the slides after the first, and their patches, over the time from the
  worker's first slide to its last) are added up. Its ``vs local`` is a ratio of patches/h, since
  the slides it counts differ in size between backends. It needs a worker to featurize at least 2 slides, so it is only meaningful with several
  slides per worker (the default 8; ``--quick``'s 3 give a rough figure). The journal's commit
  times (``journal.log``) are not used for it: on Ray, records reach the driver late and in bunches
  (the table's ``commit lag``), which would make the rate look higher than it is.

The archive: ``--slides`` synthetic pyramidal JPEG TIFFs (``histosurv.data.synthetic_slide``,
pattern "tissue", q90, 256 px tiles, 0.25 µm/px at level 0 as the writer records it, i.e. a 40x
scan), each with its own texture seed and one of three sizes around ``--width`` x ``--height``
(x0.9, x1.0, x1.1 per side), so slides carry about 80, 100 and 120 tissue patches of 256 px at 0.5
µm/px (the ResNet18 encoder's patch as exported here; read as 512 px at level 0 and resized; the
printout gives the figures the runs recorded). The manifest puts them
on a few patients (two slides each) whose case_ids and genes come from the synthetic cohort's
genes.csv. The model repository is built first, in a child process so torch never loads here
(the same build as bench/server.py: AMMASurv, default config, 200 genes, 1 training epoch on a
synthetic cohort, ONNX; the ResNet18 patch encoder with seeded random weights), or reused with
``--repo`` (a repository built by bench/server.py fits too).

Before the measured runs, unless ``--no-warmup``, a 1-slide local run and a 1-slide Ray run (not
reported in the table): they bring the model files, the slides and Python's and Ray's own files
into the page cache, so the first measured run pays no first-touch cost the others do not.

Parity: the three runs' slides.parquet must list the same slides with the same status and patch
counts, every slide must be scored, and the risks must agree to rel 1e-6; otherwise (or if a run
exits non-zero) the bench exits with status 1. Nothing asserts a timing. ``run CPU`` is the CPU time
of the score process and all its descendants (Ray's raylet, GCS and workers; sampled every 0.2 s,
so a process's last fraction of a second before it exits can be missed), ``other CPU`` that of
everything else on the machine, both in % of one core over the run's wall time (200% = both cores
of a 2-core machine): where ``other CPU`` is high, other processes competed and the run is slower
for it. Timings are only meaningful on an otherwise idle machine.

    python bench/batch.py                     # 8 slides, 3 backends: about 5 minutes on an idle 2-core machine
    python bench/batch.py --quick             # 3 slides, no warm-up: a smoke run, about 2-3 minutes
    python bench/batch.py --repo /tmp/hs-repo --json /tmp/batch.json   # builds /tmp/hs-repo once, then reuses it
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT.parents[1]))  # run from a checkout without installing

from _cli import args_json  # noqa: E402
from _fixtures import (  # noqa: E402
    ENCODER, MODEL, build_repository, ensure_repository, open_model, tissue_slide, write_cohort,
)
from _machine import busy_cpu_seconds, format_load_average, host_facts, load_average, now, package_version  # noqa: E402
from _report import cell, print_aligned, problems_line, write_json  # noqa: E402

SIZE_FACTORS = (0.9, 1.0, 1.1)  # slide i has sides x SIZE_FACTORS[i % 3]
SLIDES_PER_PATIENT = 2
RUN_TIMEOUT = 1200.0  # seconds one score run may take before it is killed
RISK_REL = 1e-6
BASELINE = "local"
BACKENDS = {  # label -> extra flags of `histosurv score`
    "local": [],
    "ray, 1 worker": ["--ray", "local", "--ray-workers", "1"],
    "ray, 2 workers": ["--ray", "local", "--ray-workers", "2"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, help="model repository to use; built there first if missing (default: a temporary one)")
    p.add_argument("--workdir", type=Path, help="keep the slides, manifest and run folders here (slides are reused when present)")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--quick", action="store_true", help="3 slides and no warm-up runs: a smoke run")
    p.add_argument("--slides", type=int, default=8, help="slides in the archive (default 8; --quick: 3)")
    p.add_argument("--width", type=int, default=10752, help="level-0 width of the middle slide size, px (0.25 µm/px)")
    p.add_argument("--height", type=int, default=8064, help="level-0 height of the middle slide size, px")
    p.add_argument("--batch-size", type=int, default=32, help="histosurv score --batch-size: patches per encoder call (its default 32)")
    p.add_argument("--backends", type=_backends, default=list(BACKENDS),
                   help=f"comma-separated subset of: {'; '.join(BACKENDS)} (default: all; '{BASELINE}' is the baseline)")
    p.add_argument("--no-warmup", action="store_true", help="skip the two 1-slide warm-up runs")
    p.add_argument("--build", metavar="REPO", help=argparse.SUPPRESS)  # _fixtures.ensure_repository's child
    args = p.parse_args(argv)
    if args.quick:
        args.slides = min(args.slides, 3)
        args.no_warmup = True
    if args.slides < 1:
        p.error("--slides must be at least 1")
    return args


def _backends(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    # "ray, 1 worker" holds a comma: accept the short forms local, ray1, ray2 too
    short = {"local": "local", "ray1": "ray, 1 worker", "ray2": "ray, 2 workers"}
    out, i = [], 0
    while i < len(names):
        if names[i] in short:
            out.append(short[names[i]])
        elif names[i] == "ray" and i + 1 < len(names) and f"ray, {names[i + 1]}" in BACKENDS:
            out.append(f"ray, {names[i + 1]}")
            i += 1
        else:
            raise argparse.ArgumentTypeError(f"unknown backend {names[i]!r}; choose from local, ray1, ray2")
        i += 1
    return [b for b in BACKENDS if b in out]


# --- the archive --------------------------------------------------------------------------------------


def write_archive(root: Path, args) -> dict:
    """The slides, the gene table (the synthetic cohort's genes.csv) and the manifests."""
    root.mkdir(parents=True, exist_ok=True)
    cohort_dir = root / "cohort"
    if not (cohort_dir / "genes.csv").is_file():
        shutil.rmtree(cohort_dir, ignore_errors=True)
        write_cohort(cohort_dir)
    genes = cohort_dir / "genes.csv"
    cases = pd.read_csv(genes, usecols=["case_id"])["case_id"].astype(str).tolist()
    n_patients = math.ceil(args.slides / SLIDES_PER_PATIENT)
    if n_patients > len(cases):
        raise SystemExit(f"{args.slides} slides need {n_patients} patients; the gene table has {len(cases)}")
    rows, written, seconds = [], 0, 0.0
    for i in range(args.slides):
        f = SIZE_FACTORS[i % len(SIZE_FACTORS)]
        w, h = _even(args.width * f), _even(args.height * f)
        path = root / "slides" / f"slide_{i:02d}_{w}x{h}_s{i}.tif"
        spent = tissue_slide(path, w, h, quality=90, seed=i)  # None: reused (the name fixes size and seed)
        if spent is not None:
            seconds += spent
            written += 1
        rows.append({"path": str(path.relative_to(root)), "slide_id": f"S{i:02d}", "case_id": cases[i // SLIDES_PER_PATIENT],
                     "width": w, "height": h, "bytes": path.stat().st_size})
    manifest = pd.DataFrame(rows)
    manifest[["path", "slide_id", "case_id"]].to_csv(root / "manifest.csv", index=False)
    manifest[["path", "slide_id", "case_id"]].iloc[:1].to_csv(root / "warmup.csv", index=False)
    print(f"archive: {args.slides} slides in {root / 'slides'} ({written} written in {seconds:.1f} s, "
          f"{args.slides - written} reused), {n_patients} patients, genes {genes}", flush=True)
    return {"root": root, "manifest": root / "manifest.csv", "warmup": root / "warmup.csv", "genes": genes,
            "slides": rows, "patients": n_patients}


def _even(x: float) -> int:
    return int(round(x / 16)) * 16  # a multiple of the JPEG MCU and of every pyramid downsample's rounding


# --- one score run ------------------------------------------------------------------------------------


class TreeCpu:
    """CPU seconds of a process and all its descendants, polled every ``every`` seconds in a thread
    (a process's last interval before it exits is missed); also the HISTOSURV_THREADS setting and
    title of every Ray worker process seen."""

    def __init__(self, pid: int, every: float = 0.2):
        self.root = psutil.Process(pid)
        self.every = every
        self.cpu: dict[tuple[int, float], float] = {}
        self.seen: dict[tuple[int, float], dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every):
                self.sample()
                return

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                self.cpu[key] = max(self.cpu.get(key, 0.0), t.user + t.system)
                if not _ACTOR.search(self.seen.get(key, {}).get("name", "")):  # Ray's workers exec and retitle themselves
                    name = " ".join(p.cmdline())[:160]
                    self.seen[key] = {"name": name, "threads_env": p.environ().get("HISTOSURV_THREADS")}
            except psutil.Error:
                continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        return sum(self.cpu.values())

    def alive(self) -> list[int]:
        return [pid for pid, created in self.seen if _alive(pid, created)]

    def actors(self) -> dict[str, str | None]:
        """Title -> HISTOSURV_THREADS for the processes of Ray Data's map actors."""
        out = {}
        for info in self.seen.values():
            match = _ACTOR.search(info["name"])
            if match:
                out.setdefault(match.group(1), set()).add(info["threads_env"])
        return {k: ",".join(sorted(str(x) for x in v)) for k, v in out.items()}


_ACTOR = re.compile(r"ray::\S*?(_Featurize|_Fuse)\b")  # a Ray Data map actor's process title names its class


def _alive(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def score_run(label: str, flags: list[str], manifest: Path, out: Path, archive: dict, repo: Path, args) -> dict:
    """One ``python -m histosurv score`` process into a fresh ``out``; its timings and records."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "histosurv", "score", str(manifest), "--repo", str(repo), "--out", str(out),
               "--genes", str(archive["genes"]), "--batch-size", str(args.batch_size), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    print(f"  {label} (histosurv score {manifest.name} --batch-size {args.batch_size}{''.join(' ' + f for f in flags)}) ...",
          end="", flush=True)
    busy, launched, t0 = busy_cpu_seconds(), time.time(), time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, so a timeout can stop Ray's processes too
    tree = TreeCpu(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - t0
    exited = time.time()
    run_cpu = tree.stop()
    other_cpu = max(0.0, busy_cpu_seconds() - busy - run_cpu)
    time.sleep(0.5)
    leftovers = tree.alive()
    result = {"label": label, "flags": flags, "command": command, "returncode": proc.returncode, "timed_out": timed_out,
              "wall_s": wall, "launched": launched, "exited": exited, "stdout": stdout[-4000:], "stderr": stderr[-4000:],
              "run_cpu_percent": 100 * run_cpu / wall, "other_cpu_percent": 100 * other_cpu / wall,
              "processes": len(tree.seen), "leftover_processes": leftovers, "actor_threads": tree.actors()}
    match = re.search(r"in ([\d.]+) s, (\d+) slides/h", stdout)
    result["cli_seconds"], result["cli_per_hour"] = (float(match.group(1)), float(match.group(2))) if match else (None, None)
    result.update(read_run(out, launched))
    state = "ok" if proc.returncode == 0 else f"EXIT STATUS {proc.returncode}" + (" (timed out)" if timed_out else "")
    print(f" {wall:.1f} s, {state}", flush=True)
    if proc.returncode != 0:
        print("    " + "\n    ".join((stderr or stdout).strip().splitlines()[-15:]), flush=True)
    if leftovers:
        print(f"    ! {len(leftovers)} of its processes still alive 0.5 s after it exited: {leftovers}", flush=True)
    return result


def read_run(out: Path, launched: float) -> dict:
    """Timings from the run folder. A slide's features file (features/<slide>.h5, written atomically
    by whichever process featurized it, just before the slide is fused) dates the end of its
    featurizing; the journal's ``scored`` line dates its commit by the driver."""
    if not (out / "slides.parquet").is_file():
        return {"slides": None, "records": {}, "steady": {}}
    slides = pd.read_parquet(out / "slides.parquet")
    records = {}
    for f in sorted((out / "results").glob("*.json")):
        r = json.loads(f.read_text())
        records[r["slide_id"]] = r
    events = [json.loads(line) for line in (out / "journal.log").read_text().splitlines() if line.strip()]
    committed = {e["slide_id"]: e["time"] for e in events if e["event"] in ("scored", "failed")}
    scored = [k for k, r in records.items() if r.get("status") == "scored"]
    featurized = {k: (out / "features" / f"{k}.h5").stat().st_mtime for k in scored if (out / "features" / f"{k}.h5").is_file()}
    by_worker: dict[str, list[tuple[float, int]]] = {}
    for slide_id, t in featurized.items():
        by_worker.setdefault(str(records[slide_id].get("worker", "score process")), []).append((t, int(records[slide_id]["n_patches"])))
    rate = patch_rate = 0.0
    used = 0
    for done in by_worker.values():  # each worker's slides after its first, over the time from its first to its last
        done.sort()
        span = done[-1][0] - done[0][0]
        if len(done) >= 2 and span > 0:
            rate += (len(done) - 1) / span
            patch_rate += sum(n for _, n in done[1:]) / span
            used += len(done) - 1
    lags = [committed[k] - t for k, t in featurized.items() if k in committed]
    attrs = {}
    if featurized:
        import h5py

        with h5py.File(out / "features" / f"{min(featurized, key=featurized.get)}.h5", "r") as f:
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
                     if k in ("patch_size", "read_size", "patch_level", "mpp", "slide_mpp", "reader", "encoder_engine")}
    encode = [records[k].get("seconds", {}).get("encode") for k in scored]
    patches = slides.loc[slides["status"] == "scored", "n_patches"].astype(float)
    return {
        "slides": slides,
        "records": records,
        "n_scored": int((slides["status"] == "scored").sum()),
        "n_failed": int((slides["status"] == "failed").sum()),
        "patches": float(patches.sum()),
        "workers": {k: len(v) for k, v in by_worker.items()},
        "patch_attrs": attrs,
        "steady": {"slides_per_s": rate if used else None, "patches_per_s": patch_rate if used else None, "slides_counted": used},
        "to_first_features_s": min(featurized.values()) - launched if featurized else None,
        "commit_lag_mean_s": float(np.mean(lags)) if lags else None,
        "commit_lag_max_s": float(np.max(lags)) if lags else None,
        "last_commit": max(committed.values()) if committed else None,
        "timeline": {k: {"featurized": featurized.get(k), "committed": committed.get(k), "worker": records.get(k, {}).get("worker"),
                         "n_patches": records.get(k, {}).get("n_patches")} for k in committed},
        "mean_encode_s": float(np.mean(encode)) if encode and None not in encode else None,
    }


def summarise(run: dict) -> dict:
    """slides/h and patches/h, wall and steady; None where there is nothing to divide."""
    out = {}
    n, patches = run.get("n_scored", 0), run.get("patches", 0.0)
    out["wall_slides_per_h"] = 3600 * n / run["wall_s"] if n else None
    out["wall_patches_per_h"] = 3600 * patches / run["wall_s"] if n else None
    rate, patch_rate = run["steady"].get("slides_per_s"), run["steady"].get("patches_per_s")
    out["steady_slides_per_h"] = 3600 * rate if rate else None
    out["steady_patches_per_h"] = 3600 * patch_rate if patch_rate else None
    out["tail_s"] = run["exited"] - run["last_commit"] if run.get("last_commit") else None
    return out


def add_ratios(runs: dict) -> None:
    base = runs.get(BASELINE)
    for run in runs.values():
        # wall: every run scores the same slides, so slides/h and patches/h give the same ratio; steady: patches/h,
        # since the slides counted (all but each worker's first) differ in size between backends
        for key, name in (("wall_slides_per_h", "wall_vs_local"), ("steady_patches_per_h", "steady_vs_local")):
            b = base["figures"].get(key) if base else None
            v = run["figures"].get(key)
            run["figures"][name] = v / b if v and b else None


# --- parity -------------------------------------------------------------------------------------------


def check_parity(runs: dict, n_slides: int) -> dict:
    problems, max_rel = {}, 0.0
    tables = {k: r["slides"] for k, r in runs.items() if r.get("slides") is not None}
    for label, run in runs.items():
        if run["returncode"] != 0:
            problems[f"{label}: exit status {run['returncode']}" + (" (timed out)" if run["timed_out"] else "")] = 1
        if run.get("slides") is None:
            problems[f"{label}: no slides.parquet"] = 1
            continue
        if len(run["slides"]) != n_slides:
            problems[f"{label}: {len(run['slides'])} slides in slides.parquet, expected {n_slides}"] = 1
        if run.get("n_failed"):
            problems[f"{label}: slides failed"] = run["n_failed"]
            for row in run["slides"][run["slides"]["status"] == "failed"].itertuples():
                print(f"  ! {label}: {row.slide_id} failed: {row.error}")
        if run.get("leftover_processes"):
            problems[f"{label}: processes left running after exit"] = len(run["leftover_processes"])
    ref_label = BASELINE if BASELINE in tables else next(iter(tables), None)
    rel = {}
    if ref_label is not None:
        ref = tables[ref_label].set_index("slide_id")
        for label, t in tables.items():
            if label == ref_label:
                continue
            t = t.set_index("slide_id")
            if list(t.index) != list(ref.index):
                problems[f"{label}: slide_ids differ from {ref_label}'s"] = 1
                continue
            for col in ("case_id", "status", "n_patches"):
                differ = int((t[col].astype(str) != ref[col].astype(str)).sum())
                if differ:
                    problems[f"{label}: {col} differs from {ref_label}'s"] = differ
            a, b = ref["risk"].to_numpy(float), t["risk"].to_numpy(float)
            both = ~(np.isnan(a) | np.isnan(b))
            if (np.isnan(a) != np.isnan(b)).any():
                problems[f"{label}: a risk is NaN on one side only"] = int((np.isnan(a) != np.isnan(b)).sum())
            d = np.abs(a[both] - b[both]) / np.maximum(np.maximum(np.abs(a[both]), np.abs(b[both])), 1e-30)
            rel[label] = float(d.max()) if d.size else 0.0
            max_rel = max(max_rel, rel[label])
            if rel[label] > RISK_REL:
                problems[f"{label}: risks differ from {ref_label}'s beyond rel {RISK_REL:g}"] = int((d > RISK_REL).sum())
    return {"reference": ref_label, "max_rel_diff": max_rel, "rel_diff": rel, "problems": problems}


# --- main ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        print(json.dumps(build_repository(Path(args.build))))
        return 0
    facts = machine_facts()
    print_header(facts, args)
    results: dict = {"facts": facts, "args": args_json(args, internal=("build",))}
    with tempfile.TemporaryDirectory(prefix="histosurv-bench-batch-") as tmp:
        tmp = Path(tmp)
        repo = (args.repo or tmp / "model_repository").resolve()
        facts["repository"] = {"path": str(repo), **ensure_repository(repo, SCRIPT)}
        facts["model"] = model_facts(repo, facts["repository"].get("params"))
        print_model(facts["model"])
        work = (args.workdir or tmp / "work").resolve()
        archive = write_archive(work, args)
        results["archive"] = {k: str(v) if isinstance(v, Path) else v for k, v in archive.items()}

        warmups = {}
        if not args.no_warmup:
            print("warm-up runs (1 slide each; not in the table):", flush=True)
            for label, flags in (("local", []), ("ray, 1 worker", BACKENDS["ray, 1 worker"])):
                if label in args.backends:
                    warmups[label] = score_run(f"warm-up {label}", flags, archive["warmup"], work / "runs" / f"warmup-{_slug(label)}",
                                               archive, repo, args)
        print(f"measured runs ({args.slides} slides each, a fresh --out folder each):", flush=True)
        runs = {}
        for label in args.backends:
            runs[label] = score_run(label, BACKENDS[label], archive["manifest"], work / "runs" / _slug(label), archive, repo, args)
            runs[label]["figures"] = summarise(runs[label])
        add_ratios(runs)
        parity = check_parity(runs, args.slides)
        for label, run in warmups.items():
            if run["returncode"] != 0:
                parity["problems"][f"warm-up {label}: exit status {run['returncode']}"] = 1

        print_runs(runs, warmups, archive, args, facts)
        print_parity(parity, runs)
        results["warmups"] = {k: _run_json(v) for k, v in warmups.items()}
        results["runs"] = {k: _run_json(v) for k, v in runs.items()}
    results["parity"] = parity
    facts["load_average_end"] = load_average()
    problems = parity["problems"]
    print(f"\nload average at the end: {format_load_average(facts['load_average_end'])} (1, 5, 15 min)")
    print(problems_line(problems))
    if args.json:
        write_json(args.json, results)
        print(f"figures written to {args.json}")
    return 1 if problems else 0


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _run_json(run: dict) -> dict:
    out = {k: v for k, v in run.items() if k not in ("slides", "records")}
    if run.get("slides") is not None:
        out["slides"] = run["slides"][["slide_id", "case_id", "status", "n_patches", "risk", "error"]].to_dict("records")
    out["records_seconds"] = {k: r.get("seconds") for k, r in run.get("records", {}).items()}
    return out


# --- output -------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    return {
        **host_facts(),
        "ray": package_version("ray"),
        "onnxruntime": package_version("onnxruntime"),
        "cucim": package_version("cucim-cu12", "cucim-cu13", "cucim", missing="not installed"),
        "openslide-python": package_version("openslide-python", missing="not installed"),
        "histosurv": package_version("histosurv", missing="not installed"),
        "date": now(),
        "load_average": load_average(),
    }


def model_facts(repo: Path, params) -> dict:
    mv, encoder = open_model(repo)
    return {"name": MODEL, "version": mv.version, "architecture": mv.info.architecture, "config": mv.info.config,
            "artifacts": sorted(mv.info.engines), "params": params, "encoder": f"{ENCODER} v{encoder.version}",
            "encoder_artifacts": sorted(encoder.info.engines)}


def print_header(facts: dict, args) -> None:
    print("histosurv score: batch scoring of a slide archive, local backend vs Ray Data")
    print(f"date    : {facts['date']}")
    print(f"machine : {facts['cpu']}, {facts['logical_cpus']} logical CPUs ({facts['physical_cpus']} physical), "
          f"{facts['memory_total_bytes'] / 1e9:.1f} GB RAM, no GPU used; {facts['platform']}")
    print(f"load    : {format_load_average(facts['load_average'])} (1, 5, 15 min) at the start")
    print(f"software: python {facts['python']}, ray {facts['ray']}, onnxruntime {facts['onnxruntime']}, "
          f"cucim {facts['cucim']}, openslide-python {facts['openslide-python']}, histosurv {facts['histosurv']}")
    print(f"runs    : {'--quick; ' if args.quick else ''}{args.slides} slides per run; backends: {'; '.join(args.backends)}; "
          f"--batch-size {args.batch_size}; {'no warm-up' if args.no_warmup else 'after 1-slide warm-ups (local, Ray)'}\n", flush=True)


def print_model(m: dict) -> None:
    c = m["config"]
    params = f", {m['params'] / 1e6:.2f} M parameters" if m.get("params") else ""
    print(f"model   : {m['name']} v{m['version']} ({m['architecture']}), d = {c.get('feature_dim')} + {c.get('pos_dim')}, "
          f"{c.get('heads')} heads, depth {c.get('depth')}, {c.get('gene_groups')} gene tokens from {c.get('n_genes')} genes"
          f"{params}; artifacts {', '.join(m['artifacts'])}; encoder {m['encoder']} ({', '.join(m['encoder_artifacts'])})",
          flush=True)


def print_runs(runs: dict, warmups: dict, archive: dict, args, facts: dict) -> None:
    ref = runs.get(BASELINE) or next(iter(runs.values()))
    patches = ref["slides"]["n_patches"].dropna().astype(int).tolist() if ref.get("slides") is not None else []
    sizes = sorted({(s["width"], s["height"]) for s in archive["slides"]})
    mb = sum(s["bytes"] for s in archive["slides"]) / 1e6
    print(f"\narchive : {len(archive['slides'])} synthetic JPEG TIFFs ({', '.join(f'{w}x{h}' for w, h in sizes)} px at 0.25 µm/px, "
          f"{mb:.0f} MB in all), {archive['patients']} patients")
    a = ref.get("patch_attrs") or {}
    if patches:
        how = (f"; {a['patch_size']} px at {a['mpp']:g} µm/px, read as {a['read_size']} px at level {a['patch_level']} "
               f"(slide {a['slide_mpp']:g} µm/px) by {a['reader']}, encoded by {a['encoder_engine']}") if len(a) == 7 else ""
        print(f"patches : {sum(patches)} tissue patches in all, {np.mean(patches):.1f} per slide on average "
              f"(min {min(patches)}, max {max(patches)}){how}")
    if warmups:
        print("warm-up : " + "; ".join(f"{k} {v['wall_s']:.1f} s" for k, v in warmups.items()))

    print("\nslides/h and patches/h. wall: over the whole `histosurv score` process, start-up and shutdown included;\n"
          "steady: the rate slides are featurized once each worker has done its first (see the notes); vs local: slides/h\n"
          "(wall) or patches/h (steady: the slides counted differ in size) over the local backend's, measured in this run\n")
    header = ["backend", "wall s", "slides/h", "patches/h", "vs local", "steady slides/h", "steady patches/h", "vs local",
              "1st slide s", "commit lag s", "tail s", "CLI slides/h", "encode s", "slides/worker", "run CPU", "other CPU"]
    rows = []
    for label, r in runs.items():
        f = r["figures"]
        workers = "/".join(str(n) for n in sorted(r.get("workers", {}).values(), reverse=True)) or "-"
        lag = f"{r['commit_lag_mean_s']:.1f}/{r['commit_lag_max_s']:.1f}" if r.get("commit_lag_max_s") is not None else "-"
        rows.append([
            label, f"{r['wall_s']:.1f}", cell(f.get("wall_slides_per_h"), ".0f"), cell(f.get("wall_patches_per_h"), ".0f"),
            cell(f.get("wall_vs_local"), ".2f", "x"), cell(f.get("steady_slides_per_h"), ".0f"),
            cell(f.get("steady_patches_per_h"), ".0f"), cell(f.get("steady_vs_local"), ".2f", "x"),
            cell(r.get("to_first_features_s")), lag, cell(f.get("tail_s")), cell(r.get("cli_per_hour"), ".0f"),
            cell(r.get("mean_encode_s"), ".2f"), workers,
            cell(r.get("run_cpu_percent"), ".0f", "%"), cell(r.get("other_cpu_percent"), ".0f", "%"),
        ])
    print_aligned(header, rows)
    print("1st slide s: from launching the process to the first slide's features written (start-up and one slide);\n"
          "commit lag s: mean/max from a slide's features written to its record committed by the driver (journal.log);\n"
          "tail s: from the last commit to the process's exit (tables, Ray shutdown); CLI slides/h: what `histosurv\n"
          "score` itself prints (timed from after its start-up checks, Ray start-up included); encode s: the mean of\n"
          "results/<slide>.json seconds.encode; slides/worker: slides featurized by each featurizing process")
    for label, r in runs.items():
        if r.get("actor_threads"):
            print(f"{label}: HISTOSURV_THREADS (ONNX Runtime intra-op threads) seen in the Ray actors' environments: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(r["actor_threads"].items())))

    cpus, phys = facts["logical_cpus"], facts["physical_cpus"]
    print("\nnotes:")
    print(f"- this machine has {cpus} logical CPUs ({phys} physical) and no GPU. Ray's encoder actors share them with\n"
          f"  each other, with the fusion actor, with Ray's own processes (raylet, GCS, agents) and with the driver, so\n"
          f"  2 encoder workers cannot be 2x as fast as 1 here, and neither can beat a local backend that already keeps\n"
          f"  every core busy (its ONNX Runtime intra-op threads default to the physical core count, plus 2 read-ahead\n"
          f"  decode threads). Ray's figures here are its overhead on one small machine, not its scaling on a cluster.")
    print("- every run creates its ONNX Runtime sessions afresh (the encoder and the fusion model; on Ray in each actor),\n"
          "  part of '1st slide s' for all backends. Ray's runs add the local cluster's start-up and shutdown.")
    print("- 'steady' takes each slide's end of featurizing from its features file's mtime, groups slides by the process\n"
          "  that featurized them (the record's 'worker'), drops each worker's first slide and adds up the workers' rates.\n"
          "  It rests on few intervals with few slides per worker: rough below ~4. Fusing (~20 ms a slide) is left out.")
    base_encode = (runs.get(BASELINE) or {}).get("mean_encode_s")
    for label, r in runs.items():
        threads = (r.get("actor_threads") or {}).get("_Featurize")
        n = len(r.get("workers") or {})
        if threads and threads.isdigit() and n and n * int(threads) < (phys or cpus) and base_encode and r.get("mean_encode_s"):
            total = n * int(threads)
            print(f"- {label}: {n} encoder actor{'s' if n > 1 else ''} x HISTOSURV_THREADS {threads} = {total} ONNX Runtime intra-op "
                  f"thread{'s' if total > 1 else ''}\n  in all on {phys or cpus} cores, where the local backend's encoder has ONNX Runtime's "
                  f"default ({phys}); its mean\n  encode s per slide is {r['mean_encode_s'] / base_encode:.2f}x the local backend's.")
    lagging = [k for k, r in runs.items() if (r.get("commit_lag_max_s") or 0) > 1.0]
    if lagging:
        print(f"- {', '.join(lagging)}: records reached the driver (and were committed) seconds after the slide's features\n"
              "  were written; see 'commit lag s'. A kill in that window loses the record, though not the cached features.")


def print_parity(parity: dict, runs: dict) -> None:
    if parity["reference"] is None:
        print("\nparity: no run produced slides.parquet")
        return
    others = ", ".join(f"{k} {v:.1e}" for k, v in parity["rel_diff"].items()) or "no other run"
    ok = not parity["problems"]
    print(f"\nparity against {parity['reference']}: slide_ids, case_ids, status and n_patches "
          f"{'identical' if ok else 'see errors'}; largest relative risk difference: {others} "
          f"(tolerance {RISK_REL:g}): {'agree' if parity['max_rel_diff'] <= RISK_REL else 'DIFFER'}")


if __name__ == "__main__":
    sys.exit(main())
