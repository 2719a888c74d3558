"""histosurv serve: the gRPC server (KServe v2 + histosurv.v1) and its metrics on a model repository."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from ..errors import InputError
from ._slide_options import add_slide_options, print_notes, slide_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC (KServe v2 / Triton clients, whole slides) with Prometheus metrics",
        description="Loads the highest version of every model in the repository and serves "
        "inference.GRPCInferenceService, histosurv.v1.SlideService, grpc.health.v1 and server reflection, "
        "with Prometheus metrics on their own HTTP port. SIGTERM stops taking requests and lets running ones "
        "finish within --grace seconds. Every flag can also be set in a TOML file given with --config "
        "(keys are the flag names, e.g. grpc-port = 9001, slide-root = ['/data/slides']); flags override it.",
    )
    o = _defaults()
    e, sl = o.execution, o.slides
    p.add_argument("--config", help="TOML file of flag values")
    p.add_argument("--repo", help="model repository root (required, here or in --config)")
    p.add_argument("--host", default=o.host, help=f"address to listen on (default: {o.host}, as Triton; 127.0.0.1 for this machine only)")
    p.add_argument("--grpc-port", type=int, default=o.grpc_port, help=f"default: {o.grpc_port}, as Triton; 0 picks a free port")
    p.add_argument("--metrics-port", type=int, default=o.metrics_port,
                   help=f"Prometheus /metrics port (default: {o.metrics_port}, as Triton; 0 picks a free port)")
    p.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    p.add_argument("--model-control", choices=["none", "poll", "explicit"], default=o.model_control,
                   help="poll: load new versions found in the repository; explicit: clients load and unload "
                   f"(RepositoryModelLoad/Unload) (default: {o.model_control})")
    p.add_argument("--poll-seconds", type=float, default=o.poll_seconds,
                   help=f"repository scan interval with poll (default: {o.poll_seconds:g})")
    p.add_argument("--engine", default=o.engine, help=f"engine for every model: a manifest key, or auto (default: {o.engine})")
    ex = p.add_argument_group("execution")
    ex.add_argument("--instances", type=int, default=e.instances, help=f"engine runs at once per model (default: {e.instances})")
    ex.add_argument("--max-queue", type=int, default=e.max_queue,
                    help=f"requests that may wait per model; more get RESOURCE_EXHAUSTED (default: {e.max_queue})")
    ex.add_argument("--no-batching", action="store_true", help="encode each slide's batches alone (no dynamic batcher)")
    ex.add_argument("--max-batch", type=int, default=e.max_batch,
                    help=f"patches per encoder run of the dynamic batcher (default: {e.max_batch})")
    ex.add_argument("--max-delay-ms", type=float, default=e.max_delay * 1000,
                    help=f"how long the batcher waits for a batch to fill (default: {e.max_delay * 1000:g})")
    ex.add_argument("--max-queue-patches", type=int, default=e.max_queue_patches,
                    help=f"patches that may wait for the encoder; more get RESOURCE_EXHAUSTED (default: {e.max_queue_patches})")
    group = p.add_argument_group("slide service")
    group.add_argument("--slide-root", action="append", default=[],
                       help="folder ScoreSlide may read slides from (repeatable); without one, ScoreSlide is refused")
    group.add_argument("--max-active-slides", type=int, default=sl.max_active,
                       help=f"slides scored at once (default: {sl.max_active})")
    group.add_argument("--max-queued-slides", type=int, default=sl.max_queued,
                       help=f"slides that may wait; more get RESOURCE_EXHAUSTED (default: {sl.max_queued})")
    add_slide_options(p, encoder_options=False)
    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", help="server certificate chain (PEM); with --tls-key turns TLS on")
    sec.add_argument("--tls-key", help="server private key (PEM)")
    sec.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: mutual TLS")
    sec.add_argument("--auth-token-file", help="accepted bearer tokens, one per line; calls without one get UNAUTHENTICATED")
    mb = o.max_message_bytes // (1024 * 1024)
    p.add_argument("--max-message-mb", type=int, default=mb, help=f"largest request or response (default: {mb})")
    p.add_argument("--grace", type=float, default=o.grace_seconds,
                   help=f"seconds running requests get at shutdown (default: {o.grace_seconds:g})")
    p.set_defaults(handler=run, parser=p)


def _defaults():
    """The server's defaults, from the dataclasses that hold them (flags, TOML and API agree)."""
    from ..runtime.server.app import ServeOptions

    return ServeOptions(repository="")


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv_flags: set[str]) -> argparse.Namespace:
    """Fills the flags not given on the command line from the TOML file ``args.config``."""
    path = Path(args.config)
    try:
        values = tomllib.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read the config file ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML: {e}") from None
    known = {a.dest: a for a in parser._actions if a.option_strings}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known or dest == "config":
            raise InputError(f"{path}: unknown setting '{key}' (settings are the flag names of 'histosurv serve --help')")
        if dest in argv_flags:
            continue  # the command line wins
        action = known[dest]
        if isinstance(action, argparse._AppendAction):
            value = value if isinstance(value, list) else [value]
            value = [str(v) for v in value]
        elif action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise InputError(f"{path}: '{key}' must be {action.type.__name__}, got {value!r}") from None
        if action.choices and value not in action.choices:
            raise InputError(f"{path}: '{key}' must be one of {', '.join(action.choices)}, got {value!r}")
        setattr(args, dest, value)
    return args


def flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags present in ``argv`` (parsed again with every default suppressed)."""
    saved = {a: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved.items():
            action.default = default
    return set(vars(given))


def options_from_args(args: argparse.Namespace):
    from ..runtime.server.app import ServeOptions
    from ..runtime.server.models import ExecutionConfig
    from ..runtime.server.security import SlideRoots, TLSConfig, load_tokens
    from ..runtime.server.slide_service import SlideServiceConfig

    if not args.repo:
        raise InputError("--repo is required (on the command line or as repo = '...' in --config)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise InputError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag in ("instances", "max_queue", "max_batch", "max_queue_patches", "max_active_slides", "max_queued_slides"):
        if getattr(args, flag) < (0 if flag in ("max_queue", "max_queued_slides") else 1):
            raise InputError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    tls = None
    if args.tls_cert:
        tls = TLSConfig(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None)
    return ServeOptions(
        repository=args.repo,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_host=args.metrics_host,
        model_control=args.model_control,
        poll_seconds=args.poll_seconds,
        engine=args.engine,
        execution=ExecutionConfig(
            instances=args.instances, max_queue=args.max_queue, batching=not args.no_batching,
            max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000, max_queue_patches=args.max_queue_patches,
        ),
        slides=SlideServiceConfig(
            roots=SlideRoots(args.slide_root), slide=slide_config(args),
            max_active=args.max_active_slides, max_queued=args.max_queued_slides, patch_mpp=args.mpp,
        ),
        tls=tls,
        tokens=load_tokens(args.auth_token_file) if args.auth_token_file else None,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        grace_seconds=args.grace,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..runtime.repository import ModelRepository
    from ..runtime.server.app import serve
    from ..runtime.server.security import server_credentials

    if args.config:
        args = apply_config(args.parser, args, flags_given(args.parser, args.argv[1:]))
    options = options_from_args(args)
    ModelRepository(options.repository)  # a missing repository is an error now, not an empty server
    if options.slides.patch_mpp is not None:
        print_notes("serve", [f"override: ScoreSlide cuts every slide at {options.slides.patch_mpp:g} µm/px, whatever "
                              "scale its model was trained at; each result records it"])
    if options.tls:
        server_credentials(options.tls)  # a bad certificate file is named now, before binding
    asyncio.run(serve(options))
    return 0
