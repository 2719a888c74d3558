"""Transport security, bearer tokens and slide confinement, on a real grpc.aio server on loopback.

Certificates come from a throwaway CA written into a temporary directory; the server carries a tiny
echo service (unary and streaming) behind the auth interceptor, plus the standard health service.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from histosurv.errors import InputError
from histosurv.runtime.server.security import (
    BearerAuthInterceptor,
    SlideNotFound,
    SlideOutsideRoots,
    SlideRoots,
    SlideURIError,
    TLSConfig,
    load_tokens,
    server_credentials,
)

TOKEN = "s3cret-token-for-tests"
CALL_TIMEOUT = 5


# --- certificates -------------------------------------------------------------------------------------


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, extensions=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_test_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all PEM."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("histosurv test CA", ca_key, None, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "localhost",
        server_key,
        ca.subject,
        ca_key,
        extensions=[
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
        ],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    client = _cert("test client", client_key, ca.subject, ca_key, extensions=[client_usage])

    def key_pem(key) -> bytes:
        pkcs8 = serialization.PrivateFormat.PKCS8
        return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())

    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "server_cert": server.public_bytes(serialization.Encoding.PEM),
        "server_key": key_pem(server_key),
        "client_cert": client.public_bytes(serialization.Encoding.PEM),
        "client_key": key_pem(client_key),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return write_test_pki(tmp_path_factory.mktemp("pki"))


# --- a real server ------------------------------------------------------------------------------------


async def _say(request: bytes, context) -> bytes:
    return request


async def _stream(request: bytes, context):
    for i in range(3):
        yield request + bytes([i])


async def start_server(tls: TLSConfig | None = None, tokens=None) -> tuple[grpc.aio.Server, int]:
    interceptors = [BearerAuthInterceptor(tokens)] if tokens else []
    server = grpc.aio.server(interceptors=interceptors)
    echo = grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Say": grpc.unary_unary_rpc_method_handler(_say), "Stream": grpc.unary_stream_rpc_method_handler(_stream)},
    )
    server.add_generic_rpc_handlers((echo,))
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    assert port
    await server.start()
    return server, port


async def say(channel: grpc.aio.Channel, payload: bytes = b"hi", metadata=None) -> bytes:
    return await channel.unary_unary("/test.Echo/Say")(payload, metadata=metadata, timeout=CALL_TIMEOUT)


async def stream(channel: grpc.aio.Channel, payload: bytes = b"s", metadata=None) -> list[bytes]:
    call = channel.unary_stream("/test.Echo/Stream")(payload, metadata=metadata, timeout=CALL_TIMEOUT)
    return [response async for response in call]


def tls_channel(port: int, pki, with_client_cert: bool = False) -> grpc.aio.Channel:
    client = {}
    if with_client_cert:
        client = dict(private_key=pki["client_key"].read_bytes(), certificate_chain=pki["client_cert"].read_bytes())
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(), **client)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


# --- TLS ----------------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_gets_through_and_plaintext_does_not(pki):
    async def run():
        server, port = await start_server(TLSConfig(pki["server_cert"], pki["server_key"]))
        try:
            async with tls_channel(port, pki) as channel:
                assert await say(channel, b"over tls") == b"over tls"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await say(channel)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    async def run():
        server, port = await start_server(TLSConfig(pki["server_cert"], pki["server_key"], client_ca=pki["ca"]))
        try:
            async with tls_channel(port, pki, with_client_cert=False) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await say(channel)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            async with tls_channel(port, pki, with_client_cert=True) as channel:
                assert await say(channel, b"mtls") == b"mtls"
        finally:
            await server.stop(None)

    asyncio.run(run())


def test_server_credentials_name_the_bad_file_and_its_flag(pki, tmp_path):
    missing = tmp_path / "nope.key"
    with pytest.raises(InputError) as caught:
        server_credentials(TLSConfig(pki["server_cert"], missing))
    assert str(missing) in str(caught.value) and "--tls-key" in str(caught.value)

    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a not pem at all")
    with pytest.raises(InputError) as caught:
        server_credentials(TLSConfig(pki["server_cert"], pki["server_key"], client_ca=der))
    assert str(der) in str(caught.value) and "--tls-client-ca" in str(caught.value)


# --- bearer tokens ------------------------------------------------------------------------------------


def _with_auth_server(body):
    """Runs ``body(channel)`` against a plaintext server that requires TOKEN."""

    async def run():
        server, port = await start_server(tokens={TOKEN, "another-token"})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await body(channel)
        finally:
            await server.stop(None)

    return asyncio.run(run())


@pytest.mark.parametrize("call", [say, stream], ids=["unary", "streaming"])
def test_bearer_token_is_required_and_checked(call):
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(channel)
        wrong_token = "guessed-Token-123"
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await call(channel, metadata=(("authorization", f"Bearer {wrong_token}"),))
        right = await call(channel, metadata=(("authorization", f"Bearer {TOKEN}"),))
        lowercase = await call(channel, metadata=(("authorization", f"bearer {TOKEN}"),))
        return missing.value, wrong.value, wrong_token, right, lowercase

    missing, wrong, wrong_token, right, lowercase = _with_auth_server(body)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in missing.details()
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not accepted" in wrong.details() and wrong_token not in wrong.details()
    expected = b"hi" if call is say else [b"s\x00", b"s\x01", b"s\x02"]
    assert right == expected and lowercase == expected


def test_other_schemes_and_unknown_methods_are_not_let_through():
    async def body(channel):
        with pytest.raises(grpc.aio.AioRpcError) as basic:
            await say(channel, metadata=(("authorization", f"Basic {TOKEN}"),))
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/test.Echo/Nope")(b"", timeout=CALL_TIMEOUT)
        return basic.value.code(), unknown.value.code()

    assert _with_auth_server(body) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)


def test_health_check_needs_no_token():
    async def body(channel):
        stub = health_pb2_grpc.HealthStub(channel)
        return await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)

    assert _with_auth_server(body).status == health_pb2.HealthCheckResponse.SERVING


def test_load_tokens_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# lab A\n  alpha  \n\n# retired: old\nbeta\n   \n")
    assert load_tokens(path) == frozenset({"alpha", "beta"})

    empty = tmp_path / "empty"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(InputError, match="no tokens") as caught:
        load_tokens(empty)
    assert str(empty) in str(caught.value)
    with pytest.raises(InputError, match="missing-file"):
        load_tokens(tmp_path / "missing-file")


# --- slide confinement --------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path) -> tuple[Path, Path, Path]:
    """Two slide roots (the second holding slides), a sibling 'root2' sharing the first's prefix, and an
    outside directory with a secret."""
    first, second, sibling, outside = (tmp_path / n for n in ("root", "second", "root2", "outside"))
    for d in (first, second, sibling, outside):
        d.mkdir()
    (second / "cases").mkdir()
    (second / "cases" / "a.svs").write_bytes(b"slide")
    (second / "with space.svs").write_bytes(b"slide")
    (sibling / "b.svs").write_bytes(b"slide")
    (outside / "secret.svs").write_bytes(b"secret")
    (first / "escape.svs").symlink_to(outside / "secret.svs")
    return first, second, outside


def test_slide_paths_resolve_inside_the_roots(roots):
    first, second, _ = roots
    slides = SlideRoots([first, second])
    target = Path(os.path.realpath(second / "cases" / "a.svs"))
    assert slides.resolve("cases/a.svs") == target  # relative: not under the first root, found under the second
    assert slides.resolve(str(second / "cases" / "a.svs")) == target
    assert slides.resolve(f"file://{second}/cases/a.svs") == target
    assert slides.resolve(f"file://localhost{second}/with%20space.svs") == Path(
        os.path.realpath(second / "with space.svs")
    )


def test_slide_paths_that_escape_are_refused(roots):
    first, second, outside = roots
    slides = SlideRoots([first, second])
    with pytest.raises(SlideOutsideRoots, match="'..'"):
        slides.resolve("../outside/secret.svs")  # exists, but refused before looking
    with pytest.raises(SlideOutsideRoots, match="'..'"):
        slides.resolve(f"{second}/../outside/secret.svs")
    with pytest.raises(SlideOutsideRoots, match="escape.svs") as caught:
        slides.resolve("escape.svs")  # a symlink inside a root pointing outside
    assert str(outside) not in str(caught.value) and os.path.realpath(outside) not in str(caught.value)
    with pytest.raises(SlideOutsideRoots):
        slides.resolve(str(outside / "secret.svs"))
    with pytest.raises(SlideOutsideRoots):
        slides.resolve(str(first.parent / "root2" / "b.svs"))  # shares the prefix 'root', not inside it


@pytest.mark.parametrize(
    "uri", ["s3://bucket/x.svs", "http://example.org/x.svs", "file://otherhost/x.svs", "", "a\x00.svs"]
)
def test_malformed_slide_uris_are_refused(roots, uri):
    first, second, _ = roots
    with pytest.raises(SlideURIError) as caught:
        SlideRoots([first, second]).resolve(uri)
    if uri.startswith("s3"):
        assert "scheme 's3' is not supported" in str(caught.value)


def test_slides_that_do_not_exist_or_are_not_files(roots):
    first, second, _ = roots
    slides = SlideRoots([first, second])
    with pytest.raises(SlideNotFound) as caught:
        slides.resolve("cases/missing.svs")
    # the uri only: a remote client must not learn where the roots are (issue 22)
    assert "cases/missing.svs" in str(caught.value)
    assert str(first) not in str(caught.value) and os.path.realpath(first) not in str(caught.value)
    with pytest.raises(SlideNotFound):
        slides.resolve(str(second / "cases" / "missing.svs"))
    with pytest.raises(SlideNotFound):
        slides.resolve("cases")  # a directory


def test_slide_roots_must_exist_and_be_configured(tmp_path):
    empty = SlideRoots([])
    assert not empty and SlideRoots([tmp_path])
    with pytest.raises(SlideOutsideRoots, match="--slide-root"):
        empty.resolve("x.svs")
    with pytest.raises(InputError, match="--slide-root") as caught:
        SlideRoots([tmp_path / "no-such-dir"])
    assert "no-such-dir" in str(caught.value)


# --- the histosurv server behind TLS and tokens, driven by tritonclient -------------------------------


def test_histosurv_server_with_mutual_tls_and_tokens_serves_tritonclient(tiny_repo, pki):
    tritonclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dev dependency")
    from tritonclient.utils import InferenceServerException

    from histosurv.runtime.server.models import ModelStore

    from .serving import RunningServer

    store = ModelStore(tiny_repo)
    store.load_all()
    tls = TLSConfig(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    running = RunningServer(store, tls=tls, tokens=frozenset({TOKEN}))
    client_tls = dict(
        ssl=True, root_certificates=str(pki["ca"]), private_key=str(pki["client_key"]), certificate_chain=str(pki["client_cert"])
    )
    try:
        with tritonclient.InferenceServerClient(f"localhost:{running.port}", **client_tls) as client:
            assert client.is_server_live(headers={"authorization": f"Bearer {TOKEN}"})
            assert client.is_server_live()  # health stays open for probes unless --auth-health
            with pytest.raises(InferenceServerException, match="missing bearer token") as caught:
                client.get_server_metadata()
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException, match="not accepted"):
                client.get_model_metadata("ammasurv", headers={"authorization": "Bearer wrong"})
            meta = client.get_model_metadata("ammasurv", headers={"authorization": f"Bearer {TOKEN}"}, as_json=True)
            assert meta["name"] == "ammasurv"
        # no client certificate: the handshake itself fails, whatever the token
        no_cert = dict(ssl=True, root_certificates=str(pki["ca"]))
        with tritonclient.InferenceServerClient(f"localhost:{running.port}", **no_cert) as client:
            with pytest.raises(InferenceServerException):
                client.is_server_live(headers={"authorization": f"Bearer {TOKEN}"}, client_timeout=5)
    finally:
        running.stop()
