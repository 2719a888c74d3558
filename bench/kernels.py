"""Few-query attention on a GPU: PyTorch SDPA (flash) against the Triton and the CUDA C++ kernels.

For 6 and 16 queries over N = 4k, 16k, 64k and 256k keys, in two head layouts (8 heads x 64, and
AMMASurv's 544 = 8 heads x 68), FP16, one bag, each run of one process prints:

* latency: the median of ``--repeat`` runs timed with CUDA events. Before each run a 256 MB buffer is
  written, which evicts K and V from L2 (a real bag is read from HBM) and keeps the GPU busy while
  the next launch is queued, so the time is the kernels' and not Python's (triton.testing's method);
* bandwidth: bytes of Q, K and V read and of the output written, over that time (the kernels' own
  FP32 scratch is not counted), and its fraction of the device's peak: memory clock x bus width x 2
  from ``torch.cuda.get_device_properties``, or a table of data-sheet figures where the driver does
  not report them;
* speed-up: SDPA time / kernel time, SDPA measured in the same run on the same tensors. SDPA runs
  FlashAttention where it takes the head dim (flash needs d % 8 == 0, so 68 falls to the next backend;
  the column names the one used);
* parity: max |kernel - SDPA| over the output (FP16 tolerance 1e-3). A kernel over it, or one that
  raises, makes the run exit 1 (after every row is measured and written).

The CUDA C++ column appears when ``histosurv.kernels.cuda_ops`` loads ``torch.ops.histosurv.few_query_attention``
(built by CMakeLists.txt; ``--cuda-lib`` names another library file). Without a GPU the script says so and exits 0;
``--interpret`` runs a tiny CPU version through Triton's interpreter so that the script itself is
exercised (its timings mean nothing), and ``--compile-only 90`` compiles the kernels for sm_90 with
the ptxas bundled in the triton wheel and prints registers, spills and shared memory (no GPU needed).

    python bench/kernels.py                                   # the full table, about a minute on an H100
    python bench/kernels.py --sizes 65536 --queries 6 --json /tmp/kernels.json
    python bench/kernels.py --interpret                       # CPU smoke run
    python bench/kernels.py --compile-only 80,90              # what ptxas makes of the kernels, no GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _cli import int_list, pair_list
from _machine import package_version
from _report import problems_line, write_json

ROOT = Path(__file__).resolve().parents[1]
FLUSH_BYTES = 256 * 2**20  # > 2x the L2 of an H100 (50 MB) or H200
PARITY_FP16 = 1e-3
PEAK_TB_S = {  # data-sheet HBM bandwidth, used only where the driver reports no memory clock
    "H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "GH200": 4.0,
    "A100-SXM4-80GB": 2.039, "A100 80GB PCIe": 1.935, "A100": 1.555, "L40S": 0.864, "L4": 0.3, "A10": 0.6,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int_list, default=[4096, 16384, 65536, 262144], help="bag sizes N, comma-separated")
    p.add_argument("--queries", type=int_list, default=[6, 16], help="queries M per head, comma-separated")
    p.add_argument("--layouts", type=pair_list("HEADSxDIM", "8x64,8x68"), default=[(8, 64), (8, 68)], help="heads x head dim, e.g. 8x64,8x68")
    p.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (Triton compiles on the first)")
    p.add_argument("--cuda-lib", type=Path, help="a built library registering torch.ops.histosurv.few_query_attention")
    p.add_argument("--json", type=Path, help="also write the facts and every row here")
    p.add_argument("--interpret", action="store_true", help="tiny CPU run through TRITON_INTERPRET=1 (smoke test)")
    p.add_argument("--compile-only", type=int_list, metavar="ARCHS", help="no GPU needed: compile what the run would "
                   "launch for these compute capabilities (e.g. 90 or 80,90) and print ptxas' registers and spills")
    args = p.parse_args(argv)
    if args.interpret:  # before anything imports triton: triton.jit reads it when it decorates
        os.environ["TRITON_INTERPRET"] = "1"
        args.sizes, args.queries, args.layouts, args.repeat, args.warmup = [257], [6], [(2, 64), (2, 68)], 1, 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        return compile_only(args)
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure (bench/kernels.py --interpret runs a CPU smoke version "
              "through Triton's interpreter)")
        return 0
    from histosurv.kernels import triton_available, triton_unavailable_reason

    if not triton_available():
        print(f"Triton column skipped: {triton_unavailable_reason()}")
    device = torch.device("cpu" if args.interpret else "cuda")
    facts = machine_facts(device, args)
    print_header(facts)
    rows = []
    for heads, head_dim in args.layouts:
        for m in args.queries:
            for n in args.sizes:
                rows.append(measure(heads, head_dim, m, n, device, facts, args))
                print(row_line(rows[-1]), flush=True)
    print_goals(rows)
    problems = parity_problems(rows)
    if args.json:
        write_json(args.json, {"facts": facts, "tolerance": PARITY_FP16, "rows": rows, "problems": problems})
        print(f"wrote {args.json}")
    print(problems_line(problems))
    return 1 if problems else 0


def parity_problems(rows: list[dict]) -> dict[str, int]:
    """What makes the run fail: a kernel over the parity tolerance, or one that raised."""
    problems: dict[str, int] = {}
    for row in rows:
        for name in ("triton", "cuda"):
            r = row.get(name)
            if r is None:
                continue
            if "error" in r:
                kind = f"{name} failed"
            elif not r["max_abs_diff"] <= PARITY_FP16:  # written so that NaN counts as over
                kind = f"{name} over {PARITY_FP16:g}"
            else:
                continue
            problems[kind] = problems.get(kind, 0) + 1
    return problems


# ----------------------------------------------------------------------------- compile only


def compile_only(args) -> int:
    """Each kernel a benchmark row would launch (and the gated pooling of ABMIL, FP16, L = 512), compiled
    for each architecture: catches what the interpreter cannot (compile errors, spills, scalar loads)."""
    import torch

    from histosurv.export.models.blocks import GatedAttention
    from histosurv.kernels import _few_query_triton, _gated_pool_triton, gated_pool
    from histosurv.kernels._compile import compile_launch

    plans = {}
    for heads, head_dim in args.layouts:
        for m in args.queries:
            q = torch.randn(1, heads, m, head_dim, dtype=torch.float16)
            k, v = (torch.randn(1, heads, 4096, head_dim, dtype=torch.float16) for _ in range(2))
            plans[f"{heads}x{head_dim} M={m}"] = _few_query_triton.plan(q, k, v, None, head_dim ** -0.5)[1]
    h, abmil = torch.randn(1, 4096, 512, dtype=torch.float16), GatedAttention(512, 256).half()
    weights = gated_pool._kernel_weights(gated_pool._linears(abmil), h.dtype)
    plans["ABMIL pool L=512"] = _gated_pool_triton.plan(h, *weights)[2]
    failed = 0
    for arch in args.compile_only:
        for label, launches in plans.items():
            for launch in launches:
                try:
                    r = compile_launch(launch, arch)
                except Exception as exc:  # report every kernel, then fail
                    failed += 1
                    print(f"sm_{arch} {label} {launch.kernel.__name__}: FAILED {type(exc).__name__}: {exc}")
                    continue
                print(f"{r['arch']} {label:<17} {r['kernel']:<20} {r['shared_bytes']:>6} B shared, "
                      f"{r['registers']} registers, {r['spill_bytes']} B spilled; {' '.join(r['ptx'])}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- facts


def machine_facts(device, args) -> dict:
    import torch

    from histosurv.kernels import triton_available

    facts = {
        "device": "CPU (Triton interpreter: timings mean nothing)" if device.type == "cpu" else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": package_version("triton") if triton_available() else None,
        "python": platform.python_version(),
        "cuda_op": load_cuda_op(args.cuda_lib),
        "peak_bytes_per_s": None,
        "peak_source": None,
    }
    if device.type == "cuda":
        facts["peak_bytes_per_s"], facts["peak_source"] = peak_bandwidth(torch.cuda.get_device_properties(device))
    return facts


def peak_bandwidth(props) -> tuple[float | None, str]:
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8, f"memory clock {clock_khz / 1e6:.3f} GHz x {bus_bits}-bit bus x 2"
    for name in sorted(PEAK_TB_S, key=len, reverse=True):  # "H100 NVL" before "H100", "GH200" before "H200"
        if name in props.name:
            return PEAK_TB_S[name] * 1e12, f"data sheet ({name})"
    return None, "unknown (no memory clock from the driver, no table entry)"


def load_cuda_op(lib: Path | None) -> str | None:
    """The schema of torch.ops.histosurv.few_query_attention, or None (and why) when it is not loaded.
    ``lib`` overrides where histosurv.kernels.cuda_ops looks for the library."""
    if lib is not None:
        os.environ["HISTOSURV_KERNELS_LIB"] = str(lib)
    try:
        from histosurv.kernels import cuda_ops
    except ImportError as exc:
        print(f"CUDA C++ kernels: {exc}")
        return None
    if not cuda_ops.available():
        print(f"CUDA C++ kernels: {cuda_ops.load_error()}")
        return None
    import torch

    return str(torch.ops.histosurv.few_query_attention.default._schema)


def print_header(facts: dict) -> None:
    peak = facts["peak_bytes_per_s"]
    print(f"device: {facts['device']}; torch {facts['torch']}, triton {facts['triton'] or 'not installed'}")
    if facts["peak_source"] is not None:  # None: the interpreter on the CPU, nothing to compare with
        print(f"peak memory bandwidth: {f'{peak / 1e9:.0f} GB/s' if peak else '?'} ({facts['peak_source']})")
    print(f"CUDA C++ kernel: {facts['cuda_op'] or 'not loaded (column skipped)'}")
    print("FP16, batch 1; us = median microseconds; GB/s = (Q + K + V + out bytes) / time; x SDPA = speed-up; "
          f"max |diff| against SDPA (target {PARITY_FP16:g})")


# ----------------------------------------------------------------------------- measuring


def measure(heads: int, head_dim: int, m: int, n: int, device, facts: dict, args) -> dict:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    q = torch.randn(1, heads, m, head_dim, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dtype, generator=g) for _ in range(2))
    nbytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()  # Q read, out written, K and V read
    row = {"heads": heads, "head_dim": head_dim, "queries": m, "keys": n, "bytes": nbytes}
    sdpa_name, sdpa = sdpa_runner(q, k, v)
    expected = sdpa()
    row["sdpa"] = dict(backend=sdpa_name, **timing(sdpa, nbytes, facts, args))
    for name, fn in kernel_runners(q, k, v, facts).items():
        try:
            diff = float((fn().float() - expected.float()).abs().max())
            row[name] = dict(timing(fn, nbytes, facts, args), max_abs_diff=diff)
            row[name]["speedup"] = row["sdpa"]["us"] / row[name]["us"]
        except Exception as exc:  # one failing kernel still leaves the others' figures
            row[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return row


def sdpa_runner(q, k, v):
    """The first SDPA backend that takes these tensors, flash first; (its name, a closure)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    choices = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    if q.device.type == "cpu":
        choices = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    for backend in choices:
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            run()
            if q.is_cuda:
                torch.cuda.synchronize()
        except RuntimeError:  # "No available kernel": flash needs d % 8 == 0, for one
            continue
        return backend.name.lower(), run
    raise RuntimeError("no SDPA backend takes these tensors")


def kernel_runners(q, k, v, facts: dict) -> dict:
    from histosurv.kernels import few_query_attention, triton_available

    runners = {}
    if triton_available():
        runners["triton"] = lambda: few_query_attention(q, k, v, backend="triton")
    if facts["cuda_op"] and q.is_cuda:
        from histosurv.kernels import cuda_ops

        runners["cuda"] = lambda: cuda_ops.few_query_attention(q, k, v, None, q.shape[-1] ** -0.5)
    return runners


def timing(fn, nbytes: int, facts: dict, args) -> dict:
    seconds = median_seconds(fn, args.repeat, args.warmup, cuda=not args.interpret)
    rate = nbytes / seconds
    peak = facts["peak_bytes_per_s"]
    return {"us": seconds * 1e6, "gb_s": rate / 1e9, "peak_fraction": rate / peak if peak else None}


def median_seconds(fn, repeat: int, warmup: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()  # evicts L2; the GPU is busy with it while the next launch is queued
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


# ----------------------------------------------------------------------------- printing


def row_line(row: dict) -> str:
    head = f"{row['heads']}x{row['head_dim']:<3d} M={row['queries']:<3d} N={row['keys']:<7d}"
    sdpa = row["sdpa"]
    parts = [head, f"sdpa[{sdpa['backend']}] {_cell(sdpa)}"]
    for name in ("triton", "cuda"):
        if name in row:
            r = row[name]
            if "error" in r:
                parts.append(f"{name}: FAILED {r['error'][:120]}")
                continue
            flag = "" if r["max_abs_diff"] <= PARITY_FP16 else " OVER"
            parts.append(f"{name} {_cell(r)} x{r['speedup']:.2f} max |diff| {r['max_abs_diff']:.1e}{flag}")
    return " | ".join(parts)


def print_goals(rows: list[dict]) -> None:
    """The issue's goal: at N = 64k with 6 queries, 3x faster than SDPA and above 50% of peak bandwidth."""
    for row in rows:
        if (row["keys"], row["queries"]) != (65536, 6):
            continue
        for name in ("triton", "cuda"):
            r = row.get(name, {})
            if "us" not in r:
                continue
            frac = r["peak_fraction"]
            print(f"goal, {row['heads']}x{row['head_dim']} M=6 N=64k {name}: x{r['speedup']:.2f} vs SDPA "
                  f"(goal 3), {'?' if frac is None else f'{100 * frac:.0f}%'} of peak bandwidth (goal 50%): "
                  f"{'met' if r['speedup'] >= 3 and (frac or 0) > 0.5 else 'NOT met'}")


def _cell(r: dict) -> str:
    frac = f" {100 * r['peak_fraction']:.0f}%" if r["peak_fraction"] is not None else ""
    return f"{r['us']:9.1f} us {r['gb_s']:7.0f} GB/s{frac}"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    sys.exit(main())
