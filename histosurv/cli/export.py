"""histosurv export: a training run, or a patch encoder, -> a new version in a model repository."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a training run or a patch encoder to a model repository, or build an engine into a version",
        description="Writes REPO/NAME/config.pbtxt, REPO/NAME/histosurv.json and REPO/NAME/<version>/. "
        "With --add-engine, builds a machine-specific engine (a TensorRT plan, or an AOTInductor package for "
        "this machine's device) into an existing version, on the machine that will serve it.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run directory written by 'histosurv train'")
    what.add_argument("--encoder", help="patch encoder: resnet18 (512-d) or resnet50_trunc (1024-d)")
    what.add_argument("--add-engine", choices=["tensorrt", "torch"], help="build this engine into --name's version")
    p.add_argument("--repo", required=True, help="model repository root (created if missing)")
    p.add_argument("--name", help="model name in the repository (default: ammasurv, or <encoder>_encoder)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest)")
    p.add_argument("--weights", help="encoder: torchvision state_dict (.pth or .safetensors; default: seeded init)")
    # default None, not 256: a --patch-size given with --run is refused rather than silently ignored
    p.add_argument("--patch-size", type=int, help="encoder: patch side in pixels (default: 256)")
    p.add_argument(
        "--artifacts",
        type=_artifacts,
        help="run: extra artifacts besides model.onnx and the opset-23 graph, comma-separated "
        "(default: onnxruntime_fp16,torch; 'none' for neither; torch compiles for about a minute)",
    )
    p.add_argument("--max-bag", type=int, default=65536, help="tensorrt: largest bag the plan accepts (default: 65536)")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="tensorrt: default fp16")
    p.add_argument("--replace", action="store_true", help="--add-engine: rebuild an engine the version already has")
    p.add_argument(
        "--kernels",
        choices=["triton", "cuda"],
        help="--add-engine torch on a GPU: compile histosurv's fused kernels into the package for the few-query "
        "attentions and gated attention pooling over the bag (triton: built into the package; cuda: the CUDA C++ "
        "ops, needs libhistosurv_kernels.so where it runs). Default: SDPA and torch pooling",
    )
    p.set_defaults(handler=run)


def _artifacts(text: str) -> tuple[str, ...]:
    from ..export.repository_writer import ARTIFACTS

    chosen = () if text == "none" else tuple(a for a in text.split(",") if a)
    unknown = [a for a in chosen if a not in ARTIFACTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown artifacts {unknown}; choose from {', '.join(ARTIFACTS)} or none")
    return chosen


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.kernels and not args.add_engine:
        raise InputError("--kernels goes with --add-engine torch, run on the GPU that will serve the package")
    if args.encoder:
        return _export_encoder(args)
    if args.add_engine:
        return _add_engine(args)
    if args.weights:
        raise InputError("--weights goes with --encoder (a run's weights are in its run directory)")
    if args.patch_size is not None:
        raise InputError("--patch-size goes with --encoder (a fusion model takes features, not patches)")
    from ..export.repository_writer import ARTIFACTS, export_run

    artifacts = ARTIFACTS if args.artifacts is None else args.artifacts
    mv = export_run(args.run, args.repo, args.name or "ammasurv", args.version, log=print, artifacts=artifacts)
    onnx = mv.info.engines["onnxruntime"]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx (opset {onnx['opset']}, "
        f"{onnx['ops'].get('com.microsoft::MultiHeadAttention', 0)} fused attention ops), "
        f"engines {', '.join(sorted(mv.info.engines))}, {len(mv.info.files)} files"
    )
    return 0


def _add_engine(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..export.repository_writer import add_engine

    if not args.name:
        raise InputError("--add-engine needs --name, the model to build it for")
    if args.kernels and args.add_engine != "torch":
        raise InputError(f"--kernels goes with --add-engine torch (TensorRT takes its kernels as plugins), not {args.add_engine}")
    options = {"max_bag": args.max_bag, "precision": args.precision} if args.add_engine == "tensorrt" else {}
    if args.kernels:
        options["kernels"] = args.kernels
    mv, key = add_engine(args.repo, args.name, args.add_engine, args.version, args.replace, log=print, **options)
    entry = mv.info.engines[key]
    print(f"built {mv.path / entry['file']} ({key}); check it with: histosurv verify --repo {args.repo} "
          f"--model {mv.name} --engine {key}")
    return 0


def _export_encoder(args: argparse.Namespace) -> int:
    from ..export.encoder_export import export_encoder

    patch_size = 256 if args.patch_size is None else args.patch_size
    mv = export_encoder(args.repo, args.encoder, args.name, args.weights, patch_size, args.version, log=print)
    spec = mv.inputs[0]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx ({spec.name} {spec.datatype} "
        f"{list(spec.shape)} -> features {list(mv.outputs[0].shape)}), weights: {mv.info.config['weights']['source']}"
    )
    return 0
