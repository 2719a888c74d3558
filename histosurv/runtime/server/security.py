"""Who may talk to the server, over what, and which slides a request may make it read.

The server ships patient data (features, slides) and risk scores, so on anything but loopback it needs
transport encryption (TLS, optionally mutual TLS so only clients holding a certificate from the lab's
CA get in) and caller authentication (bearer tokens in gRPC metadata). The health endpoints
(``grpc.health.v1`` and KServe's ServerLive, ServerReady and ModelReady, Triton's "health" protocol
group) stay open by default, because load balancers and orchestrators probe them without credentials;
``--auth-health`` puts them behind the tokens too, all alike. :func:`exposure_warnings` names what is
missing when the server listens beyond loopback.

Requests that name a slide by path are the other door: left alone, a client could make the server read
any file it can (``/etc/shadow``, another project's slides). :class:`SlideRoots` confines such paths to
directories the operator chose with ``--slide-root``, following symlinks before deciding, and raises
exceptions the server maps to INVALID_ARGUMENT (:class:`SlideURIError`), PERMISSION_DENIED
(:class:`SlideOutsideRoots`) and NOT_FOUND (:class:`SlideNotFound`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import grpc

from ...errors import HistosurvError, InputError, MissingInputError

__all__ = [
    "TLSConfig",
    "server_credentials",
    "load_tokens",
    "BearerAuthInterceptor",
    "SlideRoots",
    "SlideURIError",
    "SlideOutsideRoots",
    "SlideNotFound",
    "HEALTH_PREFIX",
    "HEALTH_METHODS",
    "exposure_warnings",
]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Triton's "health" protocol group: what an orchestrator's probe calls
HEALTH_METHODS = (
    HEALTH_PREFIX,
    *(f"/inference.GRPCInferenceService/{m}" for m in ("ServerLive", "ServerReady", "ModelReady")),
)
_PEM_MARKER = b"-----BEGIN"


# --- transport security -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for the server's TLS. ``client_ca`` set means mutual TLS: clients must present a
    certificate signed by that CA."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """Credentials for ``server.add_secure_port``, with every file checked up front so a typo fails at
    start-up with the flag to fix, not as an opaque handshake error on the first client."""
    cert = _read_pem(tls.cert, "--tls-cert")
    key = _read_pem(tls.key, "--tls-key")
    ca = _read_pem(tls.client_ca, "--tls-client-ca") if tls.client_ca is not None else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _read_pem(path: str | os.PathLike, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot read it ({e.strerror or e}); give the path to a PEM file") from e
    if _PEM_MARKER not in data:
        raise InputError(
            f"{flag} {path}: not a PEM file (no '-----BEGIN' line); convert it, e.g. "
            "'openssl x509 -inform der -in FILE -out FILE.pem' for a certificate"
        )
    return data


# --- bearer tokens ------------------------------------------------------------------------------------


def load_tokens(path: str | os.PathLike) -> frozenset[str]:
    """Accepted bearer tokens, one a line (blank lines and ``#`` comments ignored). They come from a
    file rather than a flag so they do not show in ``ps`` or shell history."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(
            f"token file {path}: cannot read it ({e.strerror or e}); give a file with one token a line"
        ) from e
    except UnicodeDecodeError as e:
        raise InputError(f"token file {path}: not UTF-8 text ({e.reason}); give a file with one token a line") from e
    tokens = frozenset(_token_lines(text))
    if not tokens:
        raise InputError(f"token file {path}: holds no tokens; add one token a line ('#' starts a comment)")
    return tokens


def _token_lines(text: str) -> Iterable[str]:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with metadata ``authorization: Bearer <token>`` naming an accepted
    token; methods under ``exempt_prefixes`` (the health endpoints, by default) need none."""

    def __init__(self, tokens: Iterable[str], exempt_prefixes: Sequence[str] = HEALTH_METHODS):
        # Bytes: hmac.compare_digest refuses str with non-ASCII characters.
        self._tokens = tuple(t.encode("utf-8") for t in tokens)
        if not self._tokens:
            raise InputError("BearerAuthInterceptor: no tokens given; every call would be refused")
        self._exempt = tuple(exempt_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        if self._exempt and handler_call_details.method.startswith(self._exempt):
            return await continuation(handler_call_details)
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._accepts(token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED as usual
            return None
        if token is None:
            message = "missing bearer token: send metadata 'authorization: Bearer <token>'"
        else:
            message = "bearer token not accepted"  # never echo it: it may be a real secret sent astray
        return refusing_handler(handler, message)

    def _accepts(self, token: str) -> bool:
        # Every token is compared, each in constant time, so timing tells nothing about which matched.
        offered = token.encode("utf-8")
        accepted = False
        for known in self._tokens:
            accepted |= hmac.compare_digest(offered, known)
        return accepted


def _bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return None


def refusing_handler(
    handler: grpc.RpcMethodHandler, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with ``code``; the kind must match or
    gRPC would misread the call's streams."""

    async def refuse(_request_or_iterator, context):
        await context.abort(code, message)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return kind(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# --- exposure -----------------------------------------------------------------------------------------


def exposure_warnings(host: str, tls: bool, tokens: bool) -> list[str]:
    """What a server listening on ``host`` lacks to be safe beyond this machine: TLS, bearer tokens,
    or both (tokens over plaintext can be read off the network). Empty on loopback."""
    if _is_loopback(host):
        return []
    where = f"gRPC on {host.strip('[]')} is reachable beyond this machine"
    warnings = []
    if not tls:
        warnings.append(f"{where} without TLS: features, slides and risks cross the network readable; "
                        "give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS)")
    if not tokens:
        warnings.append(f"{where} without bearer tokens: anyone who reaches the port may call it; "
                        "give --auth-token-file (or --host 127.0.0.1 for this machine only)")
    elif not tls:
        warnings.append(f"{where} and its bearer tokens are accepted over plaintext: they can be read off the "
                        "network and replayed; give --tls-cert and --tls-key")
    return warnings


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve to any interface


# --- slide confinement --------------------------------------------------------------------------------


class SlideURIError(InputError):
    """A slide reference that is not a usable path or file:// URI (answered INVALID_ARGUMENT)."""


class SlideOutsideRoots(HistosurvError, PermissionError):
    """A slide reference that leads outside the server's slide roots (answered PERMISSION_DENIED)."""


class SlideNotFound(MissingInputError):
    """A slide reference under the slide roots that names no regular file (answered NOT_FOUND)."""


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL_HOSTS = ("", "localhost")


class SlideRoots:
    """The directories a request may read slides from (``--slide-root``, repeatable)."""

    def __init__(self, roots: Sequence[str | os.PathLike]):
        if isinstance(roots, (str, os.PathLike)):  # one root passed bare: not a sequence of characters
            roots = [roots]
        self.roots: tuple[str, ...] = tuple(_checked_root(root) for root in roots)

    def __bool__(self) -> bool:
        return bool(self.roots)

    def __repr__(self) -> str:
        return f"SlideRoots({list(self.roots)!r})"

    def resolve(self, uri: str) -> Path:
        """The real path of the regular file ``uri`` names (a path, absolute or relative to the roots,
        or a file:// URI), provided it lies inside a root once symlinks are followed."""
        path = _uri_path(uri)
        if ".." in PurePosixPath(path).parts:
            # Refused before touching the filesystem, so probing cannot tell what exists out there.
            raise SlideOutsideRoots(f"slide {uri!r}: '..' is not allowed; give a path inside the slide roots")
        if not self.roots:
            raise SlideOutsideRoots("this server has no slide roots; start it with --slide-root DIR")
        candidate = path if os.path.isabs(path) else self._first_existing(uri, path)
        real = os.path.realpath(candidate)
        if not any(_inside(real, root) for root in self.roots):
            # Name the uri only: the target, or the roots, would tell a remote client about the filesystem.
            raise SlideOutsideRoots(f"slide {uri!r} resolves outside the slide roots; give a file under them")
        if not os.path.isfile(real):
            raise SlideNotFound(f"slide {uri!r}: no such file under the slide roots")
        return Path(real)

    def _first_existing(self, uri: str, relative: str) -> str:
        for root in self.roots:
            candidate = os.path.join(root, relative)
            if os.path.exists(candidate):
                return candidate
        raise SlideNotFound(f"slide {uri!r}: not found under any slide root")

    def redact(self, message: str, uri: str, path: str | os.PathLike | None = None) -> str:
        """``message`` for a remote client: the slide's real ``path``, and any other path under a root,
        named by the request's own ``uri``. (A reader's error names the file it opened; the server's log
        keeps that.)"""
        # One pass, the uri first: where it holds a root itself (file:///data/slides/x.svs) it stays as sent.
        names = [re.escape(uri)] if uri else []
        if path is not None:
            names.append(re.escape(os.fspath(path)))
        for root in sorted(self.roots, key=len, reverse=True):  # a nested root before its parent
            names.append(re.escape(root) + r"(?=[/\s'\"!;,()]|$)(?:/[^\s'\"!;,()]*)?")
        return re.sub("|".join(names), lambda _: uri or "the slide", message) if names else message


def _checked_root(root: str | os.PathLike) -> str:
    if not os.path.isdir(root):
        raise InputError(f"--slide-root {os.fspath(root)}: not an existing directory; create it or fix the path")
    return os.path.realpath(root)


def _uri_path(uri: str) -> str:
    """The filesystem path a slide reference names, before any confinement check."""
    if not isinstance(uri, str) or not uri:
        raise SlideURIError("slide uri is empty; give a path or a file:// URI under the slide roots")
    if "\x00" in uri:
        raise SlideURIError(f"slide {uri!r} contains a NUL byte; give a plain path or a file:// URI")
    match = _SCHEME.match(uri)
    if uri[:5].lower() == "file:":
        path = _file_uri_path(uri)
    elif match:
        raise SlideURIError(
            f"slide {uri!r}: scheme {match.group(1)!r} is not supported: "
            "give a path or a file:// URI under the slide roots"
        )
    else:
        path = uri
    if "\x00" in path:  # a %00 in a file URI
        raise SlideURIError(f"slide {uri!r} contains a NUL byte; give a plain path or a file:// URI")
    return path


def _file_uri_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise SlideURIError(
            f"slide {uri!r}: file URI host {parts.netloc!r} is not this machine; "
            "use file:///path (no host) or file://localhost/path"
        )
    if parts.query or parts.fragment:
        raise SlideURIError(f"slide {uri!r}: '?' and '#' must be percent-encoded (%3F, %23) in a file URI")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise SlideURIError(f"slide {uri!r}: a file URI needs an absolute path, as in file:///data/slides/x.svs")
    return path


def _inside(path: str, root: str) -> bool:
    # commonpath, not a string prefix: /data/slides2 is not inside /data/slides.
    return os.path.commonpath([path, root]) == root
