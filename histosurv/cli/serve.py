"""histosurv serve: the gRPC server (KServe v2 inference protocol) on a model repository."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (KServe v2 / Triton clients)",
        description="Loads the highest version of every model in the repository and serves "
        "inference.GRPCInferenceService, grpc.health.v1 and server reflection. SIGTERM stops taking "
        "requests and lets running ones finish within --grace seconds.",
    )
    p.add_argument("--repo", required=True, help="model repository root")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=8001, help="default: 8001, as Triton; 0 picks a free port")
    p.add_argument("--model-control", choices=["none", "explicit"], default="none",
                   help="explicit: clients may load and unload models (default: none)")
    p.add_argument("--engine", default="auto", help="engine for every model (default: auto)")
    p.add_argument("--max-message-mb", type=int, default=512, help="largest request or response (default: 512)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running requests get at shutdown (default: 30)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..runtime.repository import ModelRepository
    from ..runtime.server.app import ServeOptions, serve

    ModelRepository(args.repo)  # a missing repository is an error now, not an empty server
    options = ServeOptions(
        repository=args.repo,
        host=args.host,
        grpc_port=args.grpc_port,
        model_control=args.model_control,
        engine=args.engine,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        grace_seconds=args.grace,
    )
    asyncio.run(serve(options))
    return 0
