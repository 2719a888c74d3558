"""histosurv verify: every engine of a model version against the PyTorch model."""

from __future__ import annotations

import argparse


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bag sizes, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError("bag sizes must be >= 1")
    return sizes


def add_parser(sub) -> None:
    from ..export.verify import DEFAULT_SIZES

    p = sub.add_parser(
        "verify",
        help="compare every engine of a model version with the PyTorch model at several bag sizes",
        description="Prints the largest relative difference of the risk per engine and writes the figures "
        "into the manifest. Exit status 1 if an engine is outside the tolerance.",
    )
    p.add_argument("--repo", required=True, help="model repository root")
    p.add_argument("--model", help="model to check, a survival model or a patch encoder (default: the repository's only survival model)")
    p.add_argument("--version", type=int, help="default: the highest")
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES,
                   help=f"bag sizes, comma-separated (default: {','.join(map(str, DEFAULT_SIZES))}; "
                   "encoders: batch sizes 1,4,16)")
    p.add_argument(
        "--tolerance", type=float, help="relative (default: 1e-4 for FP32 engines, 1e-2 for FP16 engines)"
    )
    p.add_argument("--engine", action="append", help="manifest key of an engine to check, repeatable (default: every one the version has)")
    p.add_argument("--no-write", action="store_true", help="do not record the figures in the manifest")
    p.add_argument("--json", action="store_true",
                   help="print the reports as JSON (per engine: device, criteria, and per size the figures and pass/fail)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..export.verify import verify_version
    from ..runtime.repository import ModelRepository

    model = args.model or ModelRepository(args.repo).default_model()
    log = (lambda _: None) if args.json else print
    reports = verify_version(
        args.repo, model, args.version, args.sizes, args.tolerance, args.engine, not args.no_write, log=log
    )
    if args.json:
        print(json.dumps({"model": model, "reports": [r.to_dict() for r in reports],
                          "passed": bool(reports) and all(r.passed for r in reports)}, indent=2))
        return 0 if reports and all(r.passed for r in reports) else 1
    for r in reports:
        verdict = "PASS" if r.passed else "FAIL"
        if any("features_rel" in row for row in r.rows):  # a patch encoder
            criteria = f"tolerance {r.tolerance:g}" + (f", cosine >= {r.min_cosine:g} per patch" if r.min_cosine else "")
            print(f"{verdict} {r.engine} on {r.device} {r.providers}: largest relative difference of the features "
                  f"{r.max_features_rel:.2e}, smallest cosine {r.min_features_cosine:.7f} ({criteria})")
            continue  # the figures of each batch were printed as they were measured
        print(
            f"{verdict} {r.engine} on {r.device}{' ' + str(r.providers) if r.providers else ''}: largest relative difference of the risk "
            f"{r.max_risk_rel:.2e}, of the attention {r.max_attention_rel:.2e} (tolerance {r.tolerance:g})"
        )
    return 0 if reports and all(r.passed for r in reports) else 1
