"""histosurv export: a training run, or a patch encoder, -> a new version in a model repository."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a training run or a patch encoder to a model repository (ONNX + manifest)",
        description="Writes REPO/NAME/config.pbtxt, REPO/NAME/histosurv.json and REPO/NAME/<version>/.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="run directory written by 'histosurv train'")
    what.add_argument("--encoder", help="patch encoder: resnet18 (512-d) or resnet50_trunc (1024-d)")
    p.add_argument("--repo", required=True, help="model repository root (created if missing)")
    p.add_argument("--name", help="model name in the repository (default: ammasurv, or <encoder>_encoder)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest)")
    p.add_argument("--weights", help="encoder: torchvision state_dict (.pth or .safetensors; default: seeded init)")
    # default None, not 256: a --patch-size given with --run is refused rather than silently ignored
    p.add_argument("--patch-size", type=int, help="encoder: patch side in pixels (default: 256)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.encoder:
        return _export_encoder(args)
    if args.weights:
        raise InputError("--weights goes with --encoder (a run's weights are in its run directory)")
    if args.patch_size is not None:
        raise InputError("--patch-size goes with --encoder (a fusion model takes features, not patches)")
    from ..export.repository_writer import export_run

    mv = export_run(args.run, args.repo, args.name or "ammasurv", args.version, log=print)
    onnx = mv.info.engines["onnxruntime"]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx (opset {onnx['opset']}, "
        f"{onnx['ops'].get('com.microsoft::MultiHeadAttention', 0)} fused attention ops), {len(mv.info.files)} files"
    )
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
