"""histosurv export: a training run, or a patch encoder, -> a new version in a model repository.

What can be built comes from the artifact registry (``export/artifacts.py``) and the encoder families
(``export/models/encoders.py``); this module only turns flags into calls.
"""

from __future__ import annotations

import argparse
import inspect


def add_parser(sub) -> None:
    from ..export.artifacts import ARTIFACTS, default_artifacts
    from ..export.gptq import WEIGHT_ROUNDINGS
    from ..export.models.encoders import ENCODERS
    from ..export.tensorrt_build import build_plan

    plan = inspect.signature(build_plan).parameters
    extra = default_artifacts("survival")
    p = sub.add_parser(
        "export",
        help="export a training run or a patch encoder to a model repository, or build an engine into a version",
        description="Writes REPO/NAME/config.pbtxt, REPO/NAME/histosurv.json and REPO/NAME/<version>/. "
        "With --add-engine, builds an artifact (a TensorRT plan, or an AOTInductor package for this machine's "
        "device) into an existing version, on the machine that will serve it.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run directory written by 'histosurv train' or 'histosurv import'")
    what.add_argument("--encoder", choices=sorted(ENCODERS),
                      help="patch encoder: " + "; ".join(f"{n}: {f.summary}" for n, f in sorted(ENCODERS.items())))
    what.add_argument("--add-engine", choices=sorted({a.name for a in ARTIFACTS}), metavar="ARTIFACT",
                      help="build this artifact into --name's version: " + "; ".join(
                          f"{a.name} ({a.summary})" for a in ARTIFACTS if a.role == "survival"))
    p.add_argument("--repo", required=True, help="model repository root (created if missing)")
    p.add_argument("--name", help="model name in the repository (default: the run's architecture, or <encoder>_encoder)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest)")
    enc = p.add_argument_group("with --encoder")
    enc.add_argument("--weights", help="the encoder's published weights (.pth or .safetensors; default: seeded "
                     "initialisation, recorded as such)")
    # defaults None: a flag given with --run is refused rather than silently ignored
    enc.add_argument("--patch-size", type=int, help="patch side in pixels (default: the encoder's, 256 for the ResNets)")
    enc.add_argument("--mpp", type=float, metavar="UM_PER_PX",
                     help="µm/px the encoder's patches are cut at (default: the encoder's, 0.5 for the ResNets)")
    q = p.add_argument_group("INT8 encoder (with --encoder --int8, or --add-engine onnxruntime_int8)")
    q.add_argument("--int8", action="store_true", help="also build the INT8 graph for CPUs (model.int8.onnx), calibrated "
                   "on --calibration's tissue patches and kept only where its accuracy gates pass")
    q.add_argument("--calibration", metavar="SLIDES", help="a slide, or a folder of slides, to cut calibration patches from")
    q.add_argument("--calibration-patches", type=int, metavar="N", help="calibration patches, a quarter of them held "
                   "back for the gates (default: 512)")
    q.add_argument("--force", action="store_true", help="keep an INT8 graph whose gates failed (recorded; auto never "
                   "serves it, --encoder-engine onnxruntime_int8 does)")
    q.add_argument("--fp32-fallback", type=float, metavar="SHARE", help="where the all-INT8 graph misses a gate, keep "
                   "its most sensitive ops FP32, as few as pass and at most this share of them (default 0.5; 0: none)")
    q.add_argument("--no-bias-correction", action="store_true", help="leave out the bias correction of the INT8 "
                   "weights (on by default: each layer's bias takes out the mean shift its rounded weights cause)")
    q.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, help="how the INT8 weights are rounded: gptq "
                   "(default: each layer's rounding errors compensated on its calibration inputs, GPTQ) or nearest")
    run = p.add_argument_group("with --run")
    run.add_argument("--fold", type=int, help="a cross-validated run: export fold K's model (folds/K) instead of the "
                     "model refitted on every patient")
    run.add_argument("--artifacts", type=_artifacts,
                     help=f"artifacts besides model.onnx, comma-separated (default: {','.join(extra)}; none for "
                     "model.onnx alone; torch compiles for about a minute; onnx_opset23 is what --add-engine tensorrt "
                     "builds from)")
    run.add_argument("--survival-times", type=_months, metavar="MONTHS",
                     help="months at which the version reports S(t), comma-separated (default: 12,24,36,60, those "
                     "within the training follow-up)")
    run.add_argument("--risk-groups", choices=["median", "tertiles"],
                     help="risk groups cut on the training patients' risks (default: median, two groups)")
    eng = p.add_argument_group("with --add-engine")
    eng.add_argument("--replace", action="store_true", help="rebuild an engine the version already has")
    eng.add_argument("--max-bag", type=int, help=f"tensorrt: largest bag the plan accepts (default: {plan['max_bag'].default})")
    eng.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help=f"tensorrt: fp16 or fp32 (default: "
                     f"{plan['precision'].default}); torch, for a patch encoder: fp16 on a GPU, bf16 on a GPU or a CPU "
                     "with AVX512-BF16/AMX (default: fp32)")
    eng.add_argument("--device", choices=["cpu", "cuda"], help="torch: the package's device (default: this machine's)")
    eng.add_argument(
        "--kernels",
        choices=["triton", "cuda"],
        help="torch, on a GPU: compile histosurv's fused kernels into the package for the few-query attentions and "
        "gated attention pooling over the bag (triton: built into the package; cuda: the CUDA C++ ops, needs "
        "libhistosurv_kernels.so where it runs). Default: SDPA and torch pooling",
    )
    p.set_defaults(handler=run_export)


def _months(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: months as numbers separated by commas, e.g. 12,24,36,60") from None
    if not values or any(not (0 < t < 1e4) for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: months must be positive (and below 10,000)")
    return values


def _artifacts(text: str) -> tuple[str, ...]:
    from ..export.artifacts import default_artifacts

    known = default_artifacts("survival")
    chosen = () if text == "none" else tuple(a for a in text.split(",") if a)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown artifacts {unknown}; choose from {', '.join(known)} or none")
    return chosen


def run_export(args: argparse.Namespace) -> int:
    from ..errors import InputError

    misplaced = {
        "--weights": args.weights is not None and not args.encoder,
        "--patch-size": args.patch_size is not None and not args.encoder,
        "--mpp": args.mpp is not None and not args.encoder,
        "--artifacts": args.artifacts is not None and not args.run,
        "--fold": args.fold is not None and not args.run,
        "--survival-times": args.survival_times is not None and not args.run,
        "--risk-groups": args.risk_groups is not None and not args.run,
        "--replace": args.replace and not args.add_engine,
        "--max-bag": args.max_bag is not None and not args.add_engine,
        "--precision": args.precision is not None and not args.add_engine,
        "--device": args.device is not None and not args.add_engine,
        "--kernels": args.kernels is not None and not args.add_engine,
        "--int8": args.int8 and not args.encoder,
        **{flag: given and not (args.int8 or args.add_engine) for flag, given in (
            ("--calibration", args.calibration is not None), ("--calibration-patches", args.calibration_patches is not None),
            ("--force", args.force), ("--fp32-fallback", args.fp32_fallback is not None),
            ("--no-bias-correction", args.no_bias_correction), ("--weight-rounding", args.weight_rounding is not None))},
    }
    for flag, wrong in misplaced.items():
        if wrong:
            raise InputError(f"{flag} goes with {_goes_with(flag)}")
    if args.encoder:
        return _export_encoder(args)
    if args.add_engine:
        return _add_engine(args)
    from ..export.repository_writer import export_run

    from ..export.run import run_to_export

    mv = export_run(run_to_export(args.run, args.fold), args.repo, args.name, args.version, log=print,
                    artifacts=args.artifacts, survival_times=args.survival_times, risk_groups=args.risk_groups or "median")
    onnx = mv.info.engines["onnxruntime"]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx (opset {onnx.details['opset']}, "
        f"{onnx.details['ops'].get('com.microsoft::MultiHeadAttention', 0)} fused attention ops), "
        f"engines {', '.join(sorted(mv.info.engines))}, {len(mv.info.files)} files"
    )
    if mv.trained_on is None and mv.takes("features"):
        print("note: the run records no training encoder; the runtime can check only the feature width of what it is given")
    return 0


def _goes_with(flag: str) -> str:
    """Where a flag belongs: --encoder, --run, or --add-engine with the artifacts that take it."""
    from ..export.artifacts import ARTIFACTS

    if flag in ("--weights", "--patch-size", "--mpp", "--int8"):
        return "--encoder"
    if flag in ("--calibration", "--calibration-patches", "--force", "--fp32-fallback", "--no-bias-correction",
                "--weight-rounding"):
        return "--encoder --int8, or --add-engine onnxruntime_int8"
    if flag in ("--artifacts", "--fold", "--survival-times", "--risk-groups"):
        return "--run"
    option = flag[2:].replace("-", "_")
    owners = sorted({a.name for a in ARTIFACTS if option in a.options})
    return f"--add-engine {' or '.join(owners)}" if owners else "--add-engine"


def _add_engine(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..export.repository_writer import add_engine

    if not args.name:
        raise InputError("--add-engine needs --name, the model to build it for")
    options = {"max_bag": args.max_bag, "precision": args.precision, "device": args.device, "kernels": args.kernels,
               **_int8_options(args)}
    mv, key = add_engine(args.repo, args.name, args.add_engine, args.version, args.replace, log=print, **options)
    entry = mv.info.engines[key]
    print(f"built {mv.path / entry.file} ({key}); check it with: histosurv verify --repo {args.repo} "
          f"--model {mv.name} --engine {key}")
    return 0


def _export_encoder(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..export.encoder_export import export_encoder

    if args.int8 and not args.calibration:
        raise InputError("--int8 needs --calibration SLIDES: the INT8 graph is calibrated on tissue patches of real slides")
    mv = export_encoder(args.repo, args.encoder, args.name, args.weights, args.patch_size, args.version, log=print,
                        mpp=args.mpp)
    record = mv.encoder_record
    spec = mv.inputs[0]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx ({spec.name} {spec.datatype} "
        f"{list(spec.shape)} -> features {list(mv.outputs[0].shape)}), {record.patch_size} px patches at "
        f"{record.mpp:g} µm/px, weights: {record.weights.describe()}"
    )
    if args.int8:
        from ..export.quantize import QuantizationGateError
        from ..export.repository_writer import add_engine

        try:
            mv, key = add_engine(args.repo, mv.name, "onnxruntime_int8", mv.version, log=print, **_int8_options(args))
        except QuantizationGateError as e:
            raise QuantizationGateError(f"{mv.name} version {mv.version} is published without its INT8 graph: {e}") from e
        print(f"built {mv.path / mv.info.engines[key].file} ({key})")
    return 0


def _int8_options(args: argparse.Namespace) -> dict:
    return {"calibration": args.calibration, "calibration_patches": args.calibration_patches, "force": args.force or None,
            "fp32_fallback": args.fp32_fallback, "bias_correction": False if args.no_bias_correction else None,
            "weight_rounding": args.weight_rounding}
