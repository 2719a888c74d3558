"""histosurv serve: the gRPC server (KServe v2 + histosurv.v1) and its metrics on a model repository."""

from __future__ import annotations

import argparse
import math
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
        "the same KServe v2 protocol over HTTP/REST (--http-port), "
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
    p.add_argument("--http-port", type=int, default=o.http_port,
                   help=f"KServe v2 HTTP/REST port (default: {o.http_port}, as Triton; 0 picks a free port)")
    p.add_argument("--no-http", action="store_true", help="serve no HTTP/REST endpoint (gRPC only)")
    p.add_argument("--metrics-port", type=int, default=o.metrics_port,
                   help=f"Prometheus /metrics port (default: {o.metrics_port}, as Triton; 0 picks a free port)")
    p.add_argument("--metrics-host", help="address of the metrics endpoint (default: --host)")
    p.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    p.add_argument("--access-log", metavar="PATH|-",
                   help="write one JSON line per call (time, request id, peer, model, version, rpc, patches, "
                   "status, queue/compute/total ms) to PATH (appended; reopened after logrotate) or - "
                   "(standard output); default: off")
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
    sec.add_argument("--auth-token-file", help="accepted bearer tokens, one per line; calls without one get UNAUTHENTICATED "
                     "(health endpoints excepted, see --auth-health)")
    sec.add_argument("--auth-health", action="store_true",
                     help="require a token on the health endpoints too (grpc.health, ServerLive, ServerReady, ModelReady); "
                     "default: open, so orchestrator probes need no credentials (Triton's --grpc-restricted-protocol=health)")
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
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason}); TOML files are UTF-8") from None
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
        value = _setting(path, key, action, value)
        if action.choices and value not in action.choices:
            raise InputError(f"{path}: '{key}' must be one of {', '.join(action.choices)}, got {value!r}")
        setattr(args, dest, value)
    return args


def _setting(path: Path, key: str, action: argparse.Action, value):
    """A TOML value as its flag would have parsed it: text for a text flag, a whole finite number for an int
    one (TOML's 1.5, inf and true are not ports), true/false for a switch; InputError otherwise."""
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
            raise InputError(f"{path}: '{key}' must be text or a list of text, got {value!r}")
        return [str(v) for v in values]
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise InputError(f"{path}: '{key}' must be true or false, got {value!r}")
        return value
    kind = action.type or str
    scalar = isinstance(value, str) if kind is str else isinstance(value, (int, float, str)) and not isinstance(value, bool)
    if kind is int and isinstance(value, float) and not value.is_integer():
        scalar = False
    try:
        parsed = kind(value) if scalar else None
    except (TypeError, ValueError, OverflowError):
        parsed = None
    if parsed is None or (isinstance(parsed, float) and not math.isfinite(parsed)):
        what = {str: "text", int: "a whole number", float: "a finite number"}.get(kind, kind.__name__)
        raise InputError(f"{path}: '{key}' must be {what}, got {value!r}")
    return parsed


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
    if args.auth_health and not args.auth_token_file:
        raise InputError("--auth-health needs --auth-token-file (the tokens the health endpoints would require)")
    for flag in ("poll_seconds", "max_delay_ms", "grace"):  # argparse's float() takes "nan" and "inf"
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise InputError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
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
        http_port=None if args.no_http else args.http_port,
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
        auth_health=args.auth_health,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        grace_seconds=args.grace,
        access_log=args.access_log or None,
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
