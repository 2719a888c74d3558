"""AMMASurv: latency, peak memory and attention FLOP rate of every engine at large bag sizes.

Engines, all running the same weights (seed 0) on the same random bag:

* ``naive``            torch eager, attention as softmax(QK^T / sqrt(d)) V, the reference repositories'
                       form, which materialises the (N+1+m) x (N+1) score matrix per head: the baseline;
* ``sdpa``             torch eager with ``F.scaled_dot_product_attention``;
* ``onnxruntime``      model.onnx (attention fused as com.microsoft.MultiHeadAttention) on ONNX Runtime;
* ``onnxruntime_fp16`` model.fp16.onnx, the FP16 graph for GPU providers;
* ``torch``            model.pt2, the AOTInductor package compiled for the CPU (``torch_cuda`` on a GPU);
* ``tensorrt``         model.plan, built on this GPU from model.opset23.onnx (where TensorRT is installed).

All but the eager two are artifacts of a real model repository, exported once per run into a
temporary directory by histosurv's own export (``prepare``) and loaded with ``load_engine`` as
``histosurv predict`` loads them. ``--device cuda`` runs the eager baselines on the GPU too.

Every (engine, N) pair runs in a fresh subprocess: it loads the model or engine and builds the inputs,
records its RSS (the baseline), resets the kernel's peak-RSS mark, then runs 1 warm-up and up to
``--repeat`` timed passes (fewer once ``--budget`` seconds are spent, never fewer than one). It reports
the median time, the peak RSS (``ru_maxrss``) and the peak minus the baseline ("extra"), i.e. what the
forward pass itself needed; on a GPU also the torch allocator's peak ("GPU MB": it does not see ONNX
Runtime's or TensorRT's own device memory). The parent never imports torch, because a child's
``ru_maxrss`` starts from its parent's peak.

Reading the table: ``speed-up`` is baseline_ms / engine_ms (above 1 is faster than the baseline) and
``memory`` is engine extra / baseline extra (below 1 needs less). The baseline is ``naive`` at the same
N; where naive was skipped (its score matrices would not fit), failed or not run, it is ``sdpa``, and the
row says so. ``vs sdpa`` compares with eager SDPA at the same N. ``attn GFLOP/s`` divides the
attention's FLOPs (depth x 4 x (N+1+m) x (N+1) x d: QK^T and PV) by the whole forward time, so it is a
lower bound on the attention kernels' rate; at N >= 4k attention is over 90% of the work. ``% peak``
sets it against the CPU's FP32 peak, estimated as threads x SIMD lanes (8 with AVX2, 16 with AVX-512)
x 2 FMA units x 2 FLOPs x clock (the clock /proc/cpuinfo reports, so turbo makes it approximate).
MB and GB are 10^6 and 10^9 bytes. Timings are only meaningful on an otherwise idle machine.

    python bench/engines.py                           # N = 1k, 4k, 16k, 64k on the CPU; about an hour
    python bench/engines.py --sizes 1024,16384 --engines sdpa,onnxruntime
    python bench/engines.py --device cuda --sizes 16384,65536 --json /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import psutil

from _cli import args_json, choice_list, int_list
from _isolated import run_measurement
from _machine import cpu_simd_and_clock, host_facts, package_version
from _report import mb, print_aligned, size, write_json

SCRIPT = Path(__file__).resolve()
EAGER = ("naive", "sdpa")
ARTIFACT_ENGINES = ("onnxruntime", "onnxruntime_fp16", "torch", "torch_cuda", "tensorrt")
ENGINES = EAGER + ARTIFACT_ENGINES
NAIVE_MEMORY_FRACTION = 0.6  # leave room for the rest of the forward pass and for other processes
NAIVE_COPIES = 3  # scores, their softmax and one temporary of the same shape, float32


def default_engines(device: str) -> list[str]:
    if device == "cpu":  # the FP16 graph is for GPU providers; ORT's CPU kernels mostly cast it back
        return ["naive", "sdpa", "onnxruntime", "torch"]
    engines = ["naive", "sdpa", "torch_cuda"]
    if package_version("onnxruntime-gpu") is not None:
        engines += ["onnxruntime", "onnxruntime_fp16"]
    if importlib.util.find_spec("tensorrt") is not None:
        engines.append("tensorrt")
    return engines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int_list, default=[1024, 4096, 16384, 65536], help="bag sizes N, comma-separated")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the engines run (default: cpu)")
    p.add_argument("--engines", type=choice_list(ENGINES, "engines"), help=f"comma-separated subset of {','.join(ENGINES)} "
                   "(default: cpu: naive,sdpa,onnxruntime,torch; cuda: naive,sdpa,torch_cuda and what is installed)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, after one warm-up")
    p.add_argument("--budget", type=float, default=120, help="seconds of timed runs per measurement, at least one run")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each worker process")
    p.add_argument("--json", type=Path, help="also write the header facts and rows here")
    p.add_argument("--naive-budget-gb", type=float, help="memory allowed to the naive score matrices "
                   f"(default: {NAIVE_MEMORY_FRACTION * 100:.0f}%% of available memory)")  # %% for argparse
    p.add_argument("--worker", nargs=3, metavar=("ENGINE", "N", "REPO"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", metavar="REPO", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.engines = args.engines or default_engines(args.device)
    wrong = {"cpu": "torch_cuda", "cuda": "torch"}[args.device]
    if wrong in args.engines:
        p.error(f"engine {wrong} is not the compiled-torch package for --device {args.device}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker or args.prepare:
        return child_main(args)
    with tempfile.TemporaryDirectory(prefix="histosurv-bench-") as tmp:
        needs_repo = any(e in ARTIFACT_ENGINES for e in args.engines)
        repo = str(Path(tmp) / "model_repository") if needs_repo else "-"
        print("exporting the model's artifacts (the AOTInductor compile takes a minute or two) ...", flush=True)
        facts = run_child(["--prepare", repo], args)
        if facts["status"] != "ok":
            print(f"preparing the model failed: {facts['detail']}", file=sys.stderr)
            return 1
        del facts["status"]
        facts["machine"] = machine_facts(args.threads)
        print_header(facts, args)
        rows = [measure_one(engine, n, repo, facts, args) for n in args.sizes for engine in args.engines]
    add_ratios(rows, facts)
    print_table(rows)
    print_work(facts, args.sizes)
    if args.json:
        write_json(args.json, {"facts": facts, "args": args_json(args, internal=("worker", "prepare")), "rows": rows})
        print(f"\nrows written to {args.json}")
    return 0


def child_main(args: argparse.Namespace) -> int:
    # Imported here only: the parent must not load torch (see _measure's docstring).
    sys.path.insert(0, str(SCRIPT.parent))
    import _measure

    if args.prepare:
        repo = None if args.prepare == "-" else args.prepare
        result = _measure.prepare(repo, [e for e in args.engines if e in ARTIFACT_ENGINES], max(args.sizes))
    else:
        engine, n, repo = args.worker
        result = _measure.worker(
            engine, int(n), None if repo == "-" else repo, args.device, args.repeat, args.threads, args.budget
        )
    print(json.dumps(result))
    return 0


# --- the parent: one subprocess per measurement --------------------------------------------------------


def run_child(child_args: list[str], args: argparse.Namespace) -> dict:
    """Runs this script in a fresh process; its last stdout line is its JSON result."""
    cmd = [
        sys.executable, str(SCRIPT), *child_args, "--repeat", str(args.repeat), "--threads", str(args.threads),
        "--device", args.device, "--engines", ",".join(args.engines), "--sizes", ",".join(map(str, args.sizes)),
        "--budget", str(args.budget),
    ]
    return run_measurement(cmd, args.threads, args.timeout)


def measure_one(engine: str, n: int, repo: str, facts: dict, args: argparse.Namespace) -> dict:
    skip = naive_skip_reason(n, facts, args) if engine == "naive" else None
    if skip:
        row = {"status": "skipped", "detail": skip}
    else:
        row = run_child(["--worker", engine, str(n), repo], args)
    row.update(engine=engine, n=n)
    print(progress_line(row), flush=True)
    return row


def naive_skip_reason(n: int, facts: dict, args: argparse.Namespace) -> str | None:
    """Why the naive engine must not run at this N, or None if its score matrices fit."""
    need = naive_attention_bytes(n, facts)
    if args.naive_budget_gb is not None:
        budget, have = args.naive_budget_gb * 1e9, f"budget {size(args.naive_budget_gb * 1e9)} (--naive-budget-gb)"
    elif args.device == "cuda":
        return None  # the worker finds out; a CUDA out-of-memory error is reported as such
    else:
        available = psutil.virtual_memory().available  # now, not at start-up: earlier workers may linger
        budget = NAIVE_MEMORY_FRACTION * available
        have = f"{size(available)} available (limit {NAIVE_MEMORY_FRACTION:.0%}: {size(budget)})"
    if need <= budget:
        return None
    return f"needs ~{size(need)} for the score matrices, {have}"


def naive_attention_bytes(n: int, facts: dict) -> int:
    return facts["heads"] * (n + 1 + facts["gene_tokens"]) * (n + 1) * 4 * NAIVE_COPIES


def progress_line(row: dict) -> str:
    head = f"{row['engine']} N={row['n']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}, {row['detail']}"
    peak, extra = mb(row["peak_rss_bytes"]), mb(row["extra_rss_bytes"])
    line = f"{head} on {row.get('device', '?')}: {row['median_ms']:.1f} ms, peak {peak} MB, extra {extra} MB"
    if "gpu_extra_bytes" in row:
        line += f", GPU (torch allocator) {mb(row['gpu_extra_bytes'])} MB"
    if row.get("providers"):
        line += f", providers {row['providers']}"
    if not row["peak_reset"]:
        line += " (peak not reset after loading: extra includes load-time transients)"
    return line


# --- figures --------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict], facts: dict) -> None:
    """Adds each row's baseline, speed-up, memory ratio and throughput, comparing within one N."""
    by_n = {}
    for row in rows:
        by_n.setdefault(row["n"], {})[row["engine"]] = row
    for n, engines in by_n.items():
        base_name, label = pick_baseline(engines)
        base, sdpa = engines.get(base_name), engines.get("sdpa")
        attention, _ = flop_parts(n, facts)
        peak = facts["machine"].get("cpu_peak_gflop_per_s")
        for row in engines.values():
            row["gflop"] = forward_flops(n, facts) / 1e9
            if row["status"] != "ok":
                continue
            seconds = row["median_ms"] / 1e3
            row["gflop_per_s"] = row["gflop"] / seconds
            row["attention_gflop_per_s"] = attention / 1e9 / seconds
            if peak and row.get("device", "cpu") == "cpu":
                row["percent_of_cpu_peak"] = 100 * row["attention_gflop_per_s"] / peak
            row["baseline"] = label
            if base is not None:
                row["speedup"] = base["median_ms"] / row["median_ms"]
                row["memory_ratio"] = _ratio(_memory(row), _memory(base))
            if sdpa is not None and sdpa["status"] == "ok":
                row["vs_sdpa"] = sdpa["median_ms"] / row["median_ms"]


def pick_baseline(engines: dict[str, dict]) -> tuple[str | None, str]:
    """naive where it ran; otherwise sdpa, labelled with why naive is missing."""
    naive = engines.get("naive")
    if naive is not None and naive["status"] == "ok":
        return "naive", "naive"
    sdpa = engines.get("sdpa")
    if sdpa is None or sdpa["status"] != "ok":
        return None, "no baseline (naive and sdpa missing)"
    why = "not run" if naive is None else naive["status"]
    return "sdpa", f"vs sdpa (naive {why})"


def _memory(row: dict) -> int:
    """What a row's forward pass needed: GPU allocator peak on a GPU, extra RSS on the CPU."""
    return row.get("gpu_extra_bytes", row["extra_rss_bytes"])


def _ratio(value: int, base: int) -> float | None:
    return value / base if base >= 1e6 else None  # below 1 MB the baseline's extra is noise


def forward_flops(n: int, facts: dict) -> float:
    return sum(flop_parts(n, facts))


def flop_parts(n: int, facts: dict) -> tuple[float, float]:
    """(attention, linear layers) FLOPs of one forward pass: N+1+m queries against N+1 keys per layer."""
    tokens, keys = n + 1 + facts["gene_tokens"], n + 1
    attention = facts["depth"] * 4 * tokens * keys * facts["dim"]  # QK^T and PV, 2 FLOPs per multiply-add
    return attention, 2 * facts["encoder_linear_params"] * tokens


# --- output ---------------------------------------------------------------------------------------------


def machine_facts(threads: int) -> dict:
    host = host_facts(memory_available=True)
    lanes, ghz = cpu_simd_and_clock()
    return {
        "cpu": host.pop("cpu"),
        "fp32_lanes": lanes,
        "clock_ghz": ghz,
        # threads x lanes x 2 FMA units x 2 FLOPs per FMA x clock
        "cpu_peak_gflop_per_s": threads * lanes * 2 * 2 * ghz if lanes and ghz else None,
        **host,
    }


def print_header(facts: dict, args: argparse.Namespace) -> None:
    m, c = facts["machine"], facts["config"]
    print(f"AMMASurv engines on {'the CPU' if args.device == 'cpu' else facts.get('gpu') or 'a CUDA GPU'}")
    print(f"machine : {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cpus']} physical), "
          f"{size(m['memory_total_bytes'])} RAM, {size(m['memory_available_bytes'])} available; {m['platform']}")
    if m.get("cpu_peak_gflop_per_s"):
        print(f"CPU peak: {m['cpu_peak_gflop_per_s']:.0f} GFLOP/s FP32 for {args.threads} threads "
              f"({m['fp32_lanes']} lanes x 2 FMA units x 2 x {m['clock_ghz']:.2f} GHz; an estimate)")
    print(f"threads : {args.threads} (torch.set_num_threads; ONNX Runtime intra-op {args.threads})")
    print(f"software: python {m['python']}, torch {facts['torch']}, onnxruntime {facts['onnxruntime']}, "
          f"tensorrt {facts['tensorrt']}")
    print(f"model   : ammasurv d = {facts['dim']} ({c['feature_dim']} features + {c['pos_dim']} positional), "
          f"{facts['heads']} heads, depth {facts['depth']}, m = {facts['gene_tokens']} gene tokens from "
          f"{c['n_genes']} genes, {facts['params'] / 1e6:.2f} M parameters")
    if "onnx_ops" in facts:
        ops = facts["onnx_ops"]
        print(f"onnx    : {ops.get('com.microsoft::MultiHeadAttention', 0)} com.microsoft.MultiHeadAttention nodes, "
              f"{sum(ops.values())} nodes in all")
    for key, entry in facts.get("engines", {}).items():
        if "attention_kernels" in entry.get("details", {}):
            print(f"{key:8s}: AOTInductor for {entry['device']}, attention kernels {entry['details']['attention_kernels']}")
    print(f"runs    : sizes {','.join(map(str, args.sizes))}; engines {','.join(args.engines)}; 1 warm-up + "
          f"{args.repeat} timed per worker, median reported; timeout {args.timeout:g} s per worker\n")


def print_table(rows: list[dict]) -> None:
    print()
    header = ["N", "engine", "device", "median ms", "peak MB", "extra MB", "GPU MB", "attn GFLOP/s", "% peak",
              "speed-up", "memory", "vs sdpa", "baseline"]
    print_aligned(header, [table_cells(row) for row in rows], left=(1, 2, 12))


def table_cells(row: dict) -> list[str]:
    if row["status"] != "ok":
        note = row["detail"] if len(row["detail"]) <= 90 else row["detail"][:87] + "..."  # in full above and in --json
        return [str(row["n"]), row["engine"], "-", row["status"], *["-"] * 8, note]
    speedup, memory, vs_sdpa = row.get("speedup"), row.get("memory_ratio"), row.get("vs_sdpa")
    return [
        str(row["n"]),
        row["engine"],
        row.get("device", "?"),
        f"{row['median_ms']:.1f}",
        mb(row["peak_rss_bytes"]),
        mb(row["extra_rss_bytes"]),
        mb(row["gpu_extra_bytes"]) if "gpu_extra_bytes" in row else "-",
        f"{row['attention_gflop_per_s']:.1f}",
        f"{row['percent_of_cpu_peak']:.0f}%" if "percent_of_cpu_peak" in row else "-",
        f"{speedup:.2f}x" if speedup is not None else "n/a",
        f"{memory:.3f}" if memory is not None else "n/a",
        f"{vs_sdpa:.2f}x" if vs_sdpa is not None else "n/a",
        row["baseline"],
    ]


def print_work(facts: dict, sizes: list[int]) -> None:
    print("\nwork per forward (approximate; attn GFLOP/s above = attention / median time):")
    for n in sizes:
        attention, linear = (x / 1e9 for x in flop_parts(n, facts))
        print(f"  N={n}: {attention + linear:.2f} GFLOP = {attention:.2f} attention + {linear:.2f} linear layers")


if __name__ == "__main__":
    sys.exit(main())
