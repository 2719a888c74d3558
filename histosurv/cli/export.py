"""histosurv export: a training run -> a new version in a model repository."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a training run to a model repository (ONNX with fused attention + manifest)",
        description="Writes REPO/NAME/config.pbtxt, REPO/NAME/histosurv.json and REPO/NAME/<version>/.",
    )
    p.add_argument("--run", required=True, help="run directory written by 'histosurv train'")
    p.add_argument("--repo", required=True, help="model repository root (created if missing)")
    p.add_argument("--name", default="ammasurv", help="model name in the repository (default: ammasurv)")
    p.add_argument("--version", type=int, help="version number (default: one above the highest)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..export.repository_writer import export_run

    mv = export_run(args.run, args.repo, args.name, args.version, log=print)
    onnx = mv.info.engines["onnxruntime"]
    print(
        f"exported {mv.name} version {mv.version} to {mv.path}: model.onnx (opset {onnx['opset']}, "
        f"{onnx['ops'].get('com.microsoft::MultiHeadAttention', 0)} fused attention ops), {len(mv.info.files)} files"
    )
    return 0
