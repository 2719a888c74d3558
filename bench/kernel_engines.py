"""The compiled torch engine with histosurv's kernels against the same engine without them, on a GPU.

For each model the serving graph is compiled with AOTInductor as ``histosurv export --add-engine torch``
compiles it: once plain (SDPA and torch pooling, the baseline), once with ``--kernels triton``, and once
with ``--kernels cuda`` when the CUDA C++ library loads. Every package then scores the same bag of
N = 4k, 16k, 64k and 256k patch features (FP32, as served), and the script prints, per N:

* the median latency of each package over ``--repeat`` runs, timed with CUDA events with L2 flushed
  before each (the method of bench/kernels.py);
* speed-up: the plain package's time / the kernel package's, measured in the same run;
* the largest relative risk difference and absolute attention difference against the plain package
  (the engines' tolerance in ``histosurv verify`` is 1e-4 relative risk; a package over it makes the run
  exit 1 after every row is printed).

Models at the references' sizes: ABMIL (1024-d features, gated pooling over the bag), G-HANet (6 tokens
over the bag, twice, and its gate) and AMMASurv (16 gene queries per layer; its N x N image
self-attention stays on flash SDPA in both packages, so its speed-up is bounded by that share).
Without a GPU the script says so and exits 0.

    python bench/kernel_engines.py                                # about 5 minutes on an H100
    python bench/kernel_engines.py --models abmil --sizes 65536 --json /tmp/engines.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _cli import choice_list, int_list
from _report import print_aligned, problems_line, write_json
from kernels import median_seconds  # bench/kernels.py: CUDA events, L2 flushed before each run

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # the references' widths; AMMASurv at the paper's defaults
    "abmil": dict(feature_dim=1024),
    "ghanet": dict(feature_dim=1024),
    "ammasurv": dict(n_genes=200, feature_dim=512),
}
MAX_N = {"ammasurv": 65536}  # its N x N image self-attention: 256k would take minutes per run
RISK_TOLERANCE = 1e-4  # relative, as histosurv verify allows an FP32 engine (histosurv.export.verify.TOLERANCES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=choice_list(MODELS, "models"), default=list(MODELS), help="comma-separated")
    p.add_argument("--sizes", type=int_list, default=[4096, 16384, 65536, 262144], help="bag sizes N, comma-separated")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write every row here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: the kernel packages are CUDA-only (tests/test_kernel_routing.py checks the routing on the CPU)")
        return 0
    sys.path.insert(0, str(ROOT))
    from histosurv.kernels import cuda_ops, triton_available

    kinds = ["plain"] + ["triton"] * triton_available() + ["cuda"] * cuda_ops.available()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; packages: {', '.join(kinds)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            packages, model = compile_packages(name, kinds, Path(tmp))
            for n in args.sizes:
                if n > MAX_N.get(name, n):
                    print(f"skipping {name} at N = {n} (> {MAX_N[name]}): its N x N self-attention dominates")
                    continue
                rows.append(measure(name, model, packages, n, args))
                print_row(rows[-1], kinds)
    print_table(rows, kinds)
    problems = parity_problems(rows, kinds)
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name(), "tolerance": RISK_TOLERANCE, "rows": rows,
                               "problems": problems})
    print(problems_line(problems))
    return 1 if problems else 0


def parity_problems(rows: list[dict], kinds: list[str]) -> dict[str, int]:
    """Packages whose risks differ from the plain package's by more than ``histosurv verify`` allows."""
    problems: dict[str, int] = {}
    for row in rows:
        for kind in kinds[1:]:
            if not row[f"{kind}_risk_rel"] <= RISK_TOLERANCE:  # NaN counts as over
                problems[f"{kind} over {RISK_TOLERANCE:g}"] = problems.get(f"{kind} over {RISK_TOLERANCE:g}", 0) + 1
    return problems


def compile_packages(name: str, kinds: list[str], workdir: Path):
    import torch

    from histosurv.export.models import build_model
    from histosurv.export.torch_export import export_pt2

    torch.manual_seed(0)
    model = build_model(name, MODELS[name]).eval()
    packages = {}
    for kind in kinds:
        path = workdir / f"{name}.{kind}.pt2"
        entry = export_pt2(model, path, device="cuda", kernels=None if kind == "plain" else kind)
        details = entry.details
        print(f"compiled {name} ({kind}): kernel calls {details['kernel_calls'] or 'none'}, fused SDPA {details['attention_kernels']}")
        packages[kind] = torch._inductor.aoti_load_package(str(path), device_index=torch.cuda.current_device())
    return packages, model


def measure(name: str, model, packages: dict, n: int, args) -> dict:
    import torch

    from histosurv.export.onnx_export import example_inputs

    inputs = {k: v.cuda() for k, v in example_inputs(model, n=n, seed=n).items()}
    row = {"model": name, "n": n}
    with torch.inference_mode():
        outputs = {kind: package(**inputs) for kind, package in packages.items()}
        for kind, package in packages.items():
            row[f"{kind}_ms"] = 1e3 * median_seconds(lambda: package(**inputs), args.repeat, args.warmup, cuda=True)
    plain = outputs["plain"]
    for kind in packages:
        if kind == "plain":
            continue
        got = outputs[kind]
        row[f"{kind}_speedup"] = row["plain_ms"] / row[f"{kind}_ms"]
        row[f"{kind}_risk_rel"] = float(((got[0] - plain[0]).abs() / plain[0].abs().clamp(min=1e-6)).max())
        if len(plain) > 1:
            row[f"{kind}_attention_abs"] = float((got[1] - plain[1]).abs().max())
    return row


def print_row(row: dict, kinds: list[str]) -> None:
    parts = [f"{row['model']} N={row['n']}: plain {row['plain_ms']:.3f} ms"]
    parts += [f"{k} {row[f'{k}_ms']:.3f} ms ({row[f'{k}_speedup']:.2f}x, risk rel {row[f'{k}_risk_rel']:.1e})" for k in kinds[1:]]
    print(", ".join(parts), flush=True)


def print_table(rows: list[dict], kinds: list[str]) -> None:
    header = ["model", "N", "plain ms"]
    for k in kinds[1:]:
        header += [f"{k} ms", f"{k} speed-up", f"{k} risk rel", f"{k} attention abs"]
    body = []
    for r in rows:
        line = [r["model"], str(r["n"]), f"{r['plain_ms']:.3f}"]
        for k in kinds[1:]:
            attention = r.get(f"{k}_attention_abs")
            line += [f"{r[f'{k}_ms']:.3f}", f"{r[f'{k}_speedup']:.2f}x", f"{r[f'{k}_risk_rel']:.1e}",
                     "-" if attention is None else f"{attention:.1e}"]
        body.append(line)
    print()
    print_aligned(header, body, left=(0,))


if __name__ == "__main__":
    sys.exit(main())
