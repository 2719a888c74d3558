"""Soak: `histosurv serve` under a bounded closed loop for --minutes on loopback, its memory and file
descriptors sampled all along (issue 22).

Each of --clients threads sends one request at a time, drawn at random: ModelInfer on bags of mixed
sizes (16 to 4096 patches), ScoreSlide on the real Aperio slide (data/demo_slide.py), and bad requests
the server must refuse with a stated gRPC code (a bag of the wrong width, coordinates off any slide,
an unknown model, a slide that does not exist). A good request that fails, a bad one answered with
another code (or answered at all), or a risk that differs from the first answer for the same bag is
an unexpected error. RSS and open fds of the server process are sampled every --sample-seconds.

Printed: requests per kind, unexpected errors, RSS at the end of warm-up and at the end, the least-squares
slope of RSS after warm-up in % of the warm-up RSS per 10 minutes (goal: under 5), fds min/max. The exit
status is 1 when there was an unexpected error or the slope exceeds --max-growth.

    OMP_NUM_THREADS=1 python bench/soak.py                       # 10 minutes, builds a repository once
    python bench/soak.py --minutes 1 --warmup-minutes 0.3 --repo /tmp/hs-repo   # a smoke run
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fixtures import MODEL, ensure_repository  # noqa: E402
from server import SCRIPT as SERVER_SCRIPT  # noqa: E402
from server import ServerProcess, error_code, infer_client, infer_inputs, make_bag, score_slide  # noqa: E402

BAG_SIZES = (16, 64, 256, 1024, 4096)
# kind -> (weight, the gRPC code a refusal must carry; None: must succeed)
KINDS = {
    "ModelInfer": (70, None),
    "ScoreSlide": (8, None),
    "bad: wrong width": (6, "INVALID_ARGUMENT"),
    "bad: coords off slide": (6, "INVALID_ARGUMENT"),
    "bad: unknown model": (5, "NOT_FOUND"),
    "bad: missing slide": (5, "NOT_FOUND"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="excluded from the slope (default 2)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--max-growth", type=float, default=5.0, help="%% per 10 minutes allowed after warm-up")
    p.add_argument("--repo", type=Path, help="model repository (built here once if it lacks the model)")
    p.add_argument("--samples", type=Path, help="write the samples (seconds, rss bytes, fds) to this CSV")
    return p.parse_args(argv)


class Load:
    """The closed loop's shared state: counts per kind and outcome, unexpected errors, reference risks."""

    def __init__(self, url: str, genes: np.ndarray, stop_at: float):
        self.url, self.genes, self.stop_at = url, genes, stop_at
        self.counts: Counter = Counter()
        self.unexpected: list[str] = []
        self.bags = {n: make_bag(n, len(genes), seed=n) for n in BAG_SIZES}
        self.risks: dict = {}
        self.lock = threading.Lock()

    def client(self, index: int) -> None:
        import grpc

        rng = random.Random(index)
        conn = infer_client(self.url)
        channel = grpc.insecure_channel(self.url)
        kinds, weights = list(KINDS), [w for w, _ in KINDS.values()]
        while time.monotonic() < self.stop_at:
            kind = rng.choices(kinds, weights)[0]
            expected = KINDS[kind][1] or "ok"
            try:
                answer = self.send(kind, rng, conn, channel)
                outcome, detail = ("ok" if expected == "ok" else "answered"), f"{kind}: answered, expected {expected}"
            except Exception as e:  # noqa: BLE001 - every failure is classified below
                answer, outcome = None, error_code(e)
                detail = f"{kind}: {outcome}: {str(e)[:200]}"
            with self.lock:
                self.counts[(kind, outcome)] += 1
                if outcome != expected:
                    self.unexpected.append(detail)
                elif answer is not None:
                    self.check_same(*answer)
        conn.close()
        channel.close()

    def send(self, kind: str, rng: random.Random, conn, channel):
        if kind == "ModelInfer":
            n = rng.choice(BAG_SIZES)
            return ("bag", n), float(conn.infer(MODEL, infer_inputs(self.bags[n])).as_numpy("risk").reshape(-1)[0])
        if kind == "ScoreSlide":
            return ("slide",), float(score_slide(channel, "slide.svs", self.genes).risk)
        bag = dict(self.bags[16])
        if kind == "bad: wrong width":
            bag["features"] = bag["features"][:, :100].copy()
        elif kind == "bad: coords off slide":
            bag["coords"] = -bag["coords"] - 256
        elif kind == "bad: missing slide":
            score_slide(channel, "no-such-slide.svs", self.genes)
            return None
        model = "no_such_model" if kind == "bad: unknown model" else MODEL
        conn.infer(model, infer_inputs(bag))
        return None

    def check_same(self, key, risk: float) -> None:
        """Deterministic serving: every answer for the same bag (or slide) is the first one's."""
        first = self.risks.setdefault(key, risk)
        if abs(risk - first) > 1e-5 * max(1.0, abs(first)):
            self.unexpected.append(f"{key}: risk {risk!r} differs from the first answer {first!r}")


def sample(ps: psutil.Process, every: float, stop: threading.Event, out: list) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        out.append((time.monotonic() - t0, ps.memory_info().rss, ps.num_fds()))
        stop.wait(every)


def slope_percent(samples: list, warmup_s: float) -> tuple[float, float, float]:
    """(RSS at the end of warm-up, RSS at the end, least-squares slope after warm-up in % per 10 min)."""
    after = [(t, rss) for t, rss, _ in samples if t >= warmup_s]
    t, rss = np.array([a[0] for a in after]), np.array([a[1] for a in after], dtype=np.float64)
    slope = np.polyfit(t, rss, 1)[0] if len(after) >= 3 else float("nan")  # bytes per second
    return rss[0], rss[-1], 100 * slope * 600 / rss[0]


def window_median(samples: list, start_s: float, seconds: float) -> float:
    return float(np.median([rss for t, rss, _ in samples if start_s <= t < start_s + seconds]))


def main(argv=None) -> int:
    args = parse_args(argv)
    from histosurv.data.demo_slide import demo_slide
    from histosurv.runtime.predict import FusionPredictor

    with tempfile.TemporaryDirectory(prefix="histosurv-soak-") as tmp:
        tmp = Path(tmp)
        repo = (args.repo or tmp / "model_repository").resolve()
        ensure_repository(repo, SERVER_SCRIPT)
        genes = np.random.default_rng(2).standard_normal(len(FusionPredictor.from_repository(repo, MODEL).gene_names))
        (tmp / "slides").mkdir()
        shutil.copy(demo_slide(log=print), tmp / "slides" / "slide.svs")
        server = ServerProcess("soak", repo, ["--slide-root", str(tmp / "slides"), "--batch-size", "8",
                                              "--max-active-slides", "2"])
        samples: list = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(server.ps, args.sample_seconds, stop, samples), daemon=True)
        load = Load(server.url, genes.astype(np.float32), time.monotonic() + 60 * args.minutes)
        print(f"soak: {args.clients} clients for {args.minutes:g} min on {server.url}, sampling every "
              f"{args.sample_seconds:g} s; load average {psutil.getloadavg()[0]:.1f}", flush=True)
        sampler.start()
        clients = [threading.Thread(target=load.client, args=(i,)) for i in range(args.clients)]
        try:
            for c in clients:
                c.start()
            for c in clients:
                c.join()
        finally:
            stop.set()
            sampler.join(10)
            exit_status = server.stop()
    if args.samples:
        args.samples.write_text("seconds,rss_bytes,fds\n" + "".join(f"{t:.1f},{r},{f}\n" for t, r, f in samples))
    return report(args, load, samples, exit_status)


def report(args, load: Load, samples: list, exit_status) -> int:
    print("\nrequests (kind: outcome count):")
    for (kind, outcome), n in sorted(load.counts.items()):
        print(f"  {kind:24s} {outcome:18s} {n:7d}")
    print(f"unexpected errors: {len(load.unexpected)}")
    for line in Counter(load.unexpected).most_common(10):
        print(f"  {line[1]} x {line[0]}")
    warm, end, slope = slope_percent(samples, 60 * args.warmup_minutes)
    fds = [f for _, _, f in samples]
    print(f"RSS: {warm / 2**20:.1f} MiB at the end of warm-up ({args.warmup_minutes:g} min), {end / 2**20:.1f} MiB at "
          f"the end ({100 * (end - warm) / warm:+.1f}%), max {max(s[1] for s in samples) / 2**20:.1f} MiB; slope after "
          f"warm-up {slope:+.2f}% per 10 min ({len(samples)} samples)")
    first, last = window_median(samples, 60 * args.warmup_minutes, 60), window_median(samples, samples[-1][0] - 60, 60)
    print(f"RSS median over the first minute after warm-up {first / 2**20:.1f} MiB, over the last minute "
          f"{last / 2**20:.1f} MiB ({100 * (last - first) / first:+.1f}%; single samples swing with the bag in flight)")
    print(f"open fds: min {min(fds)}, max {max(fds)}; server exit status {exit_status}; "
          f"load average at the end {psutil.getloadavg()[0]:.1f}")
    ok = not load.unexpected and slope <= args.max_growth
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
