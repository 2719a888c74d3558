"""The model zoo on the CPU: each exported engine against eager torch as the reference repositories run it.

For every model (mcat, abmil, snn, porpoise, early_fusion, ghanet, mome; ``--models ...,ammasurv``
adds AMMASurv, which bench/engines.py covers in depth, as a last reference row) and bag size N
(default 4096 and 16384), two measurements on the same seed-0 weights and the same bag:

* ``onnxruntime``: the engine histosurv serves. The model is exported once per run by histosurv's own
  ``export_model`` (artifacts=(): model.onnx and the opset-23 graph) into a temporary model repository,
  loaded with ``load_engine(version, "onnxruntime")`` as ``histosurv predict`` loads it, and run with
  ``engine.run`` on one unbatched bag (features (N, D), genes (G,)); it returns the risk and, for
  models that read patches, the (N,) attention map.
* ``eager``: the baseline, histosurv's own module (its golden tests tie it to the reference code) run
  the way the reference repositories run theirs: eval mode under ``torch.no_grad()`` (not
  inference_mode, which they predate), FP32, a batch of one bag, ``attention_impl="naive"``: every
  attention as explicit matmul + softmax, as they write it. What that means per model:

  - mcat: the naive form changes the 2 x 2 transformer layers over the 6 group tokens (the
    co-attention of 6 queries over N patches is explicit in every build); returns the co-attention.
  - abmil, porpoise, early_fusion: gated-attention MIL, no dot-product attention, so "naive" is the
    only form; one pass returning the attention weights.
  - snn: genes only, no attention; one pass (N does not matter: both rows measure the same work).
  - ghanet: CAB cross-attention and the 6-token self-attention as explicit matmul + softmax.
  - mome: Nystrom attention in both builds (the reference uses lucidrains' library, reproduced here).
    The baseline is the reference's evaluation procedure (BearCleverProud/MoME trainer/mb_trainer.py,
    ``validate_survival_coattn_mb``; shared/research/models.md section 1.2): the patches are shuffled
    (Python's ``random.shuffle``, seeded here with ``--seed``, once per measurement process, so
    successive passes see different but reproducible orders), split with ``np.array_split`` into
    ``N // 4096 + 1`` chunks (``bs_micro`` = 4096), the model runs once per chunk with the genes
    reused, and the chunks' risks are averaged. The engine runs the whole bag in one pass (histosurv's
    deterministic inference), so its risk differs from the baseline's; the rows time each one's way
    of producing a patient's risk. Eager MoME runs only the expert the router picks, as the reference
    does; so does the exported single-bag graph, through ONNX If nodes (see histosurv/export/models/mome.py).
  - ammasurv (optional): attention over all N + 1 + m tokens, the (N + 1 + m) x (N + 1) score matrix
    materialised per head; skipped where it would not fit in 60% of the available memory.

Configurations are the references' real sizes: feature_dim 1024; MCAT and MoME with the BLCA signature
groups (94, 334, 521, 468, 1495, 479), n_genes their sum; PORPOISE, SNN and early fusion with 2000
genes; G-HANet and ABMIL with their reference defaults; MoME dim 512, 256 landmarks; AMMASurv as
bench/engines.py (d = 512 + 32). Weights: ``torch.manual_seed(0)`` before ``build_model`` in every
process (same weights in the export and in every measurement); inputs from
``example_inputs(model, n=N, seed=0)``.

Every (model, engine, N) runs in a fresh subprocess (this script with ``--child``; the parent never
imports torch, because a child's ``ru_maxrss`` starts at its parent's peak). The child loads the model
or engine and the inputs, records its RSS (the baseline), resets the kernel's peak-RSS mark
(/proc/self/clear_refs), runs 1 warm-up and up to ``--repeat`` timed passes (fewer once ``--budget``
seconds are spent, at least one) and reports the median time, the peak RSS and the peak minus the
baseline ("extra": what the forward pass needed). ``speed-up`` = eager ms / engine ms and ``memory`` =
engine extra / eager extra, both at the same N and from this run (n/a where the eager extra is under
1 MB: noise). ``risk`` is the warm-up pass's risk, a check that both rows ran the same weights (equal
to ~1e-5 except for MoME, see above). ``others`` is the share of the machine's CPU time that other
processes (and a hypervisor's steal) took during the timed passes, from /proc/stat: timings are only
meaningful on an idle machine, and rows above 10% are flagged ("-": timed passes under 0.5 s,
too short for /proc/stat's 10 ms ticks). MB are 10^6 bytes.

    python bench/models.py                                 # N = 4096, 16384; every zoo model
    python bench/models.py --quick                         # N = 256, 1024, one timed pass: a smoke run
    python bench/models.py --models mcat,mome --sizes 1024,65536 --json /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

from _cli import args_json, choice_list, int_list
from _isolated import peak_rss_bytes, reset_peak_rss, rss_bytes, run_measurement, time_calls
from _machine import host_facts
from _report import cell, mb, print_aligned, write_json
from engines import NAIVE_MEMORY_FRACTION, naive_attention_bytes  # AMMASurv's naive attention: engines.py's rule

SCRIPT = Path(__file__).resolve()
BLCA_OMIC_SIZES = [94, 334, 521, 468, 1495, 479]  # MCAT's and MoME's BLCA signature groups
ZOO = ("mcat", "abmil", "snn", "porpoise", "early_fusion", "ghanet", "mome")
REFERENCE_ROWS = ("ammasurv",)  # covered by bench/engines.py; a reference row on request
CONFIGS = {  # plain dicts: the parent does not import histosurv's models (they import torch)
    "mcat": {"omic_sizes": BLCA_OMIC_SIZES, "feature_dim": 1024},
    "abmil": {"feature_dim": 1024},
    "snn": {"n_genes": 2000, "feature_dim": 1024},
    "porpoise": {"n_genes": 2000, "feature_dim": 1024},
    "early_fusion": {"n_genes": 2000, "feature_dim": 1024},
    "ghanet": {"feature_dim": 1024},
    "mome": {"omic_sizes": BLCA_OMIC_SIZES, "feature_dim": 1024, "dim": 512, "num_landmarks": 256},
    "ammasurv": {"n_genes": 200, "feature_dim": 512},  # bench/engines.py's (paper defaults)
}
KINDS = ("eager", "onnxruntime")
MOME_MICRO_BATCH = 4096  # the reference trainer's bs_micro
MIN_CONTENTION_WINDOW_S = 0.5
CONTENDED_PERCENT = 10  # rows whose timed passes shared the CPUs more than this are flagged


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=choice_list(list(CONFIGS), "models"), default=list(ZOO),
                   help=f"comma-separated subset of {','.join(ZOO + REFERENCE_ROWS)} (default: {','.join(ZOO)})")
    p.add_argument("--sizes", type=int_list, help="bag sizes N, comma-separated (default: 4096,16384)")
    p.add_argument("--repeat", type=int, help="timed runs per measurement, after one warm-up (default: 3)")
    p.add_argument("--budget", type=float, default=120, help="seconds of timed runs per measurement, at least one run")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each child process")
    p.add_argument("--seed", type=int, default=0, help="seed of MoME's patch shuffling in the eager baseline")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 256,1024 and 1 timed run (unless given)")
    p.add_argument("--json", type=Path, help="also write the header facts and all rows here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [256, 1024] if args.quick else [4096, 16384]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


# --- the parent ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    started = time.perf_counter()
    facts = {"machine": host_facts(memory_available=True), "models": {}}
    rows = []
    print(f"models {','.join(args.models)}; sizes {','.join(map(str, args.sizes))}; {args.threads} threads; "
          f"1 warm-up + up to {args.repeat} timed passes within {args.budget:g} s per measurement", flush=True)
    with tempfile.TemporaryDirectory(prefix="histosurv-bench-models-") as tmp:
        repo = str(Path(tmp) / "model_repository")
        for name in args.models:
            print(f"{name}: exporting ...", flush=True)
            prep = run_child(["prepare", name, repo], args)
            facts["models"][name] = prep
            if prep["status"] == "ok":
                print(f"{name}: {prep['params'] / 1e6:.2f} M parameters, exported in {prep['export_s']:.0f} s",
                      flush=True)
            else:
                print(f"{name}: export failed: {prep['detail']}", flush=True)
            for n in args.sizes:
                for kind in KINDS:
                    rows.append(measure_one(name, kind, n, repo, prep, args))
    add_ratios(rows)
    wall = time.perf_counter() - started
    print()
    print_header(facts, args)
    print_table(rows)
    busy = [r for r in rows if (r.get("others_cpu_percent") or 0) > CONTENDED_PERCENT]
    if busy:
        print(f"\nwarning: other processes took over {CONTENDED_PERCENT}% of the CPUs during {len(busy)} "
              f"measurement(s) (column 'others'): their times, and the speed-ups they enter, are unreliable")
    print(f"\nwall time {wall / 60:.1f} min")
    zoo = next((m["zoo"] for m in facts["models"].values() if "zoo" in m), None)
    missing = sorted(set(zoo or ()) - set(CONFIGS))
    if missing:
        print(f"note: zoo models without a configuration here, not measured: {', '.join(missing)}")
    if args.json:
        write_json(args.json, {"facts": facts, "args": args_json(args, internal=("child",)), "rows": rows, "wall_s": wall})
        print(f"rows written to {args.json}")
    return 0


def run_child(child_args: list[str], args: argparse.Namespace) -> dict:
    """Runs this script in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(SCRIPT), "--child", *child_args, "--repeat", str(args.repeat),
           "--threads", str(args.threads), "--budget", str(args.budget), "--seed", str(args.seed)]
    return run_measurement(cmd, args.threads, args.timeout)


def measure_one(name: str, kind: str, n: int, repo: str, prep: dict, args: argparse.Namespace) -> dict:
    if kind == "onnxruntime" and prep["status"] != "ok":
        row = {"status": "skipped", "detail": "no engine: the export failed"}
    elif kind == "eager" and name == "ammasurv" and (skip := naive_skip_reason(n, prep)):
        row = {"status": "skipped", "detail": skip}
    else:
        row = run_child([kind, name, str(n), repo], args)
    row.update(model=name, engine=kind, n=n)
    print(progress_line(row), flush=True)
    return row


def naive_skip_reason(n: int, prep: dict) -> str | None:
    """AMMASurv only: why its naive attention must not run at this N (bench/engines.py's rule)."""
    if prep["status"] != "ok":
        return None  # the child finds out
    need = naive_attention_bytes(n, prep)  # prep has the heads and gene_tokens engines.py reads from its facts
    available = psutil.virtual_memory().available
    if need <= NAIVE_MEMORY_FRACTION * available:
        return None
    return f"naive scores need ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available"


def progress_line(row: dict) -> str:
    head = f"{row['model']} {row['engine']} N={row['n']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}, {row['detail']}"
    line = (f"{head}: {row['median_ms']:.1f} ms ({len(row['times_ms'])} timed), "
            f"peak {mb(row['peak_rss_bytes'])} MB, extra {mb(row['extra_rss_bytes'])} MB, risk {row['risk']:.6f}, "
            f"others {cell(row['others_cpu_percent'], '.0f', '%')} CPU")
    if not row["peak_reset"]:
        line += " (peak not reset after loading: extra includes load-time transients)"
    return line


def add_ratios(rows: list[dict]) -> None:
    """Speed-up and memory ratio of each engine row against the eager row of the same model and N."""
    eager = {(r["model"], r["n"]): r for r in rows if r["engine"] == "eager" and r["status"] == "ok"}
    for row in rows:
        base = eager.get((row["model"], row["n"]))
        if row["engine"] == "eager" or row["status"] != "ok" or base is None:
            continue
        row["speedup"] = base["median_ms"] / row["median_ms"]
        row["memory_ratio"] = row["extra_rss_bytes"] / base["extra_rss_bytes"] if base["extra_rss_bytes"] >= 1e6 else None


def print_header(facts: dict, args: argparse.Namespace) -> None:
    m = facts["machine"]
    versions = next((p for p in facts["models"].values() if p["status"] == "ok"), {})
    print("Model zoo: exported ONNX Runtime engine vs eager torch as the references run it (CPU)")
    print(f"machine : {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cpus']} physical), "
          f"{m['memory_total_bytes'] / 1e9:.0f} GB RAM, {m['memory_available_bytes'] / 1e9:.0f} GB available at start; "
          f"{m['platform']}")
    print(f"software: python {m['python']}, torch {versions.get('torch', '?')}, "
          f"onnxruntime {versions.get('onnxruntime', '?')}")
    print(f"threads : {args.threads} (torch.set_num_threads; ONNX Runtime intra-op {args.threads})")
    print(f"runs    : 1 warm-up + up to {args.repeat} timed passes within {args.budget:g} s per measurement, "
          f"median reported; MoME shuffle seed {args.seed}")
    print("models  :")
    for name, p in facts["models"].items():
        if p["status"] != "ok":
            print(f"  {name:12s} export failed: {p['detail']}")
            continue
        cfg = {k: v for k, v in p["config"].items() if k in CONFIGS[name] or k == "n_genes"}
        print(f"  {name:12s} {p['params'] / 1e6:6.2f} M params, inputs {'+'.join(p['inputs'])}, "
              f"{p['onnx_nodes']} ONNX nodes ({p['fused_attention']} fused attention), export {p['export_s']:.0f} s; "
              f"{_short(cfg)}")


def _short(cfg: dict) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, (list, tuple)) else v}" for k, v in cfg.items())


def print_table(rows: list[dict]) -> None:
    header = ["model", "N", "engine", "median ms", "peak MB", "extra MB", "speed-up", "memory", "risk", "others", "note"]
    print()
    print_aligned(header, [table_cells(row) for row in rows], left=(0, 2, 10))


def table_cells(row: dict) -> list[str]:
    if row["status"] != "ok":
        note = row["detail"] if len(row["detail"]) <= 90 else row["detail"][:87] + "..."  # in full above and in --json
        return [row["model"], str(row["n"]), row["engine"], row["status"], *["-"] * 6, note]
    if row["engine"] == "eager":
        speedup, memory = "1.00x", "1.000"
    else:
        s, r = row.get("speedup"), row.get("memory_ratio")
        speedup = f"{s:.2f}x" if s is not None else "n/a"
        memory = f"{r:.3f}" if r is not None else "n/a"
    return [
        row["model"],
        str(row["n"]),
        row["engine"],
        f"{row['median_ms']:.1f}",
        mb(row["peak_rss_bytes"]),
        mb(row["extra_rss_bytes"]),
        speedup,
        memory,
        f"{row['risk']:.5f}",
        cell(row["others_cpu_percent"], ".0f", "%"),
        row.get("note", ""),
    ]


# --- the children: everything that imports torch ---------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    action, name, *rest = args.child
    if action == "prepare":
        result = prepare(name, rest[0])
    else:
        n, repo = int(rest[0]), rest[1]
        result = worker(action, name, n, repo, args)
    print(json.dumps(result))
    return 0


def build(name: str, attention_impl: str):
    import torch

    from histosurv.export.models import build_model

    torch.manual_seed(0)  # every process, and the exported graph, must hold the same weights
    return build_model(name, dict(CONFIGS[name]), attention_impl=attention_impl).eval()


def prepare(name: str, repo: str) -> dict:
    """Builds the model, exports it into ``repo`` as model ``name``; facts for the header."""
    import importlib.metadata

    import torch

    from histosurv.export.models import MODELS
    from histosurv.export.repository_writer import export_model

    model = build(name, "sdpa")
    n_genes = model.cfg.n_genes if "genes" in model.input_names else 0
    run_config = {"architecture": name, "model": model.cfg.to_dict(), "genes": [f"g{i}" for i in range(n_genes)]}
    started = time.perf_counter()
    mv = export_model(model, run_config, repo, name, artifacts=())
    ops = mv.info.engines["onnxruntime"].details["ops"]
    facts = {
        "zoo": sorted(MODELS),
        "torch": torch.__version__,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "config": model.cfg.to_dict(),
        "params": sum(p.numel() for p in model.parameters()),
        "inputs": list(model.input_names),
        "export_s": time.perf_counter() - started,
        "onnx_nodes": sum(ops.values()),
        "fused_attention": ops.get("com.microsoft::MultiHeadAttention", 0),
    }
    if name == "ammasurv":
        facts.update(heads=model.cfg.heads, gene_tokens=model.cfg.gene_groups)
    return facts


def worker(kind: str, name: str, n: int, repo: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if kind == "eager":
        run, extra = eager_runner(name, n, args.seed)
    else:
        run, extra = engine_runner(name, n, repo, args.threads)
    return {"model": name, "engine": kind, "n": n, "threads": args.threads, **extra,
            **measure(run, args.repeat, args.budget)}


def eager_runner(name: str, n: int, seed: int):
    """The reference repositories' way: eval, no_grad, FP32, a batch of one bag, naive attention;
    MoME through its trainer's shuffled chunks."""
    import torch

    from histosurv.export.models import risk_from_logits
    from histosurv.export.onnx_export import example_inputs

    model = build(name, "naive")
    head = model.cfg.survival_head
    inputs = example_inputs(model, n=n, seed=0)
    if name == "mome":
        chunks = n // MOME_MICRO_BATCH + 1
        return mome_chunked_runner(model, inputs, seed), {
            "intra_op_threads": torch.get_num_threads(),
            "note": f"{chunks} shuffled chunk{'s' * (chunks > 1)}, risks averaged",
        }
    batched = {k: v[None] for k, v in inputs.items()}
    with_attention = "features" in model.input_names  # the references return their attention maps too

    def run() -> float:
        with torch.no_grad():
            out = model(**batched, return_attention=with_attention)
            logits = out[0] if with_attention else out
            return float(risk_from_logits(logits, head)[0])

    return run, {"intra_op_threads": torch.get_num_threads(), "note": "naive attention" if name != "snn" else ""}


def mome_chunked_runner(model, inputs: dict, seed: int):
    """BearCleverProud/MoME trainer/mb_trainer.py, validate_survival_coattn_mb + split_chunk_list:
    shuffle the patch indices, np.array_split them into N // bs_micro + 1 chunks, run the model per
    chunk with the same genes, average -sum(S) over the chunks."""
    import random

    import numpy as np
    import torch

    from histosurv.export.models import risk_from_logits

    rng = random.Random(seed)  # the reference calls random.shuffle; seeded here so runs repeat
    features, genes = inputs["features"], inputs["genes"][None]
    n, head = features.shape[0], model.cfg.survival_head

    def run() -> float:
        index = list(range(n))
        rng.shuffle(index)
        chunks = np.array_split(np.array(index), n // MOME_MICRO_BATCH + 1)
        total = 0.0
        with torch.no_grad():
            for chunk in chunks:
                micro = torch.index_select(features, 0, torch.LongTensor(chunk.tolist()))
                total += float(risk_from_logits(model(features=micro[None], genes=genes), head)[0])
        return total / len(chunks)

    return run


def engine_runner(name: str, n: int, repo: str, threads: int):
    import gc

    from histosurv.export.onnx_export import example_inputs
    from histosurv.runtime.engines import load_engine
    from histosurv.runtime.repository import ModelRepository

    # Inputs come from the torch model (same generator, same gene scaler); drop it before loading the
    # engine so its weights are not resident beside the engine's copy.
    model = build(name, "sdpa")
    feeds = {k: v.numpy() for k, v in example_inputs(model, n=n, seed=0).items()}
    del model
    gc.collect()
    engine = load_engine(ModelRepository(repo).version(name), "onnxruntime", threads=threads)
    described = {k: v for k, v in engine.describe().items() if k != "engine"}
    return (lambda: float(engine.run(feeds)["risk"][0])), {**described, "note": "one pass"}


def measure(run, repeat: int, budget_s: float) -> dict:
    """Median wall time of up to ``repeat`` runs after one warm-up (fewer once ``budget_s`` is spent,
    at least one), and the process's peak RSS around them (bench/_measure.py's procedure)."""
    import gc
    import statistics

    gc.collect()
    peak_reset = reset_peak_rss()
    baseline = rss_bytes()
    risk = run()  # warm-up: first-call allocations, kernel selection, ORT's lazy initialisation
    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    started = time.perf_counter()
    times = time_calls(run, repeat, budget_s)
    wall = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {
        "others_cpu_percent": others_cpu_percent(machine, own, wall),
        "median_ms": statistics.median(times),
        "times_ms": times,
        "risk": risk,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "extra_rss_bytes": peak - baseline,
        "peak_reset": peak_reset,
    }


def others_cpu_percent(machine_before, own_before, wall_s: float) -> float | None:
    """Share of the machine's CPU time that other processes (and, in a VM, the hypervisor's steal)
    took during the timed passes: the contention that makes a row's time unreliable."""
    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    # steal: time the hypervisor gave to other machines; guest time is already inside user
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    busy = lambda t: sum(getattr(t, f, 0.0) for f in fields)  # noqa: E731
    mine = (own.user + own.system) - (own_before.user + own_before.system)
    others = busy(machine) - busy(machine_before) - mine
    if wall_s < MIN_CONTENTION_WINDOW_S:  # /proc/stat counts in 10 ms ticks: too coarse to tell
        return None
    return min(100.0, max(0.0, 100 * others / (wall_s * (psutil.cpu_count() or 1))))


if __name__ == "__main__":
    sys.exit(main())
