"""The upstream transport's sockets (``_upstream_network``): TLS, connecting, timeouts,
a vendor closing idle connections, flow control; on real sockets.

Every test talks HTTP/1.1 to a small asyncio server on 127.0.0.1 written here, through an
``httpx.AsyncClient`` on :class:`UpstreamTransport`, as the gateway's upstream clients
are built, so a failure is what a proxied call would meet.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import random
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spendgate_gateway._upstream_network import READ_BUFFER_HIGH, Connection
from tests.upstream_server import (
    CLIENT_TIMEOUT_S,
    answers_once,
    client,
    keeps_alive,
    read_request,
    response,
    serve,
)

# A hung transport (a read never woken, reading never resumed) fails here, not at
# pytest's global timeout.
pytestmark = pytest.mark.timeout(10)

# The read, write and connect timeouts of the tests that run into them.
SHORT_TIMEOUT_S = 0.2
# How long the loop gets to deliver a server's FIN to the idle pooled connection.
FIN_DELIVERY_S = 0.05
# How long the streaming test's reader dawdles between its first chunks.
SLOW_READER_PAUSE_S = 0.05
# Larger than READ_BUFFER_HIGH several times over, so reading from the socket must pause.
LARGE_BODY_BYTES = 2 * 1024 * 1024
# Larger than what loopback's socket buffers hold, so a write must wait for the reader.
UNREADABLE_BODY_BYTES = 64 * 1024 * 1024


def _short(**limits_s: float) -> httpx.Timeout:
    return httpx.Timeout(CLIENT_TIMEOUT_S, **limits_s)


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# ------------------------------------------------------------------------------ keep-alive


async def test_sequential_requests_reuse_one_connection() -> None:
    async with serve(keeps_alive) as upstream, client(upstream.url) as http:
        for _ in range(5):
            answer = await http.get("/")
            assert answer.content == b"ok"
            assert isinstance(answer.extensions["network_stream"], Connection)
        assert upstream.connections_accepted == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async with serve(answers_once) as upstream, client(upstream.url) as http:
        for attempt in range(1, 4):
            answer = await http.get("/")
            assert answer.content == b"ok"
            assert upstream.connections_accepted == attempt
            # Let the server's FIN reach the pooled connection before the next request,
            # which must then see it closed instead of writing into it.
            await asyncio.sleep(FIN_DELIVERY_S)


# ------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class _Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, with its key, on disk."""

    cert_path: Path
    key_path: Path
    cert_pem: bytes


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> _Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spendgate test upstream")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return _Certificate(directory / "cert.pem", directory / "key.pem", cert_pem)


def _server_ssl_context(certificate: _Certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert_path, certificate.key_path)
    return context


def _trusting(certificate: _Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=certificate.cert_pem.decode())


async def test_tls_request_to_a_trusted_server(certificate: _Certificate) -> None:
    async with (
        serve(keeps_alive, ssl_context=_server_ssl_context(certificate)) as upstream,
        client(upstream.url, verify=_trusting(certificate)) as http,
    ):
        answer = await http.get("/")
        assert answer.content == b"ok"
        ssl_object = answer.extensions["network_stream"].get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        assert ssl_object.getpeercert(binary_form=True) == x509.load_pem_x509_certificate(
            certificate.cert_pem
        ).public_bytes(serialization.Encoding.DER)
        # ALPN offered HTTP/1.1 only (the server here does not take part in ALPN).
        assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
        # The TLS connection goes back to the pool and is reused like a plain one.
        assert (await http.get("/")).content == b"ok"
        assert upstream.connections_accepted == 1


async def test_a_tls_connection_the_server_closed_while_idle_is_replaced(
    certificate: _Certificate,
) -> None:
    # Through TLS, the server's close (close_notify, then FIN) reaches the connection
    # through the event loop's SSL protocol, not straight from the socket.
    async with (
        serve(answers_once, ssl_context=_server_ssl_context(certificate)) as upstream,
        client(upstream.url, verify=_trusting(certificate)) as http,
    ):
        for attempt in range(1, 3):
            answer = await http.get("/")
            assert answer.content == b"ok"
            assert upstream.connections_accepted == attempt
            await asyncio.sleep(FIN_DELIVERY_S)


async def test_tls_server_with_an_untrusted_certificate_is_a_connect_error(
    certificate: _Certificate,
) -> None:
    async with (
        serve(keeps_alive, ssl_context=_server_ssl_context(certificate)) as upstream,
        client(upstream.url, verify=ssl.create_default_context()) as http,
    ):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get("/")


async def test_tls_server_whose_certificate_names_another_host_is_a_connect_error(
    certificate: _Certificate,
) -> None:
    # The certificate is for 127.0.0.1 and localhost, not 127.0.0.2 (loopback too).
    context = _server_ssl_context(certificate)
    async with (
        serve(keeps_alive, ssl_context=context, host="127.0.0.2") as upstream,
        client(upstream.url, verify=_trusting(certificate)) as http,
    ):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get("/")


async def test_a_tls_handshake_that_never_completes_is_a_connect_timeout(
    certificate: _Certificate,
) -> None:
    async def never_handshakes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the ClientHello, never answers it

    async with serve(never_handshakes) as upstream:
        https_url = upstream.url.replace("http://", "https://", 1)
        timeout = _short(connect=SHORT_TIMEOUT_S)
        async with client(https_url, verify=_trusting(certificate), timeout=timeout) as http:
            started_at = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await http.get("/")
            # The short connect limit ended it, not the client's overall timeout.
            assert time.monotonic() - started_at < CLIENT_TIMEOUT_S


# ------------------------------------------------------------------------- failures, bounds


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-almost: th",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf ",
    ],
    ids=["nothing", "stops-in-the-headers", "stops-in-the-body"],
)
async def test_an_answer_that_does_not_come_is_a_read_timeout(answer: bytes) -> None:
    closed_by_client = asyncio.Event()

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()  # until the client gives up and closes the connection
        closed_by_client.set()

    async with (
        serve(stalls) as upstream,
        client(upstream.url, timeout=_short(read=SHORT_TIMEOUT_S)) as http,
    ):
        started_at = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await http.get("/")
        waited_s = time.monotonic() - started_at
        # The short read limit ended it, not the client's overall timeout.
        assert SHORT_TIMEOUT_S * 0.9 <= waited_s < CLIENT_TIMEOUT_S
        assert upstream.connections_accepted == 1
        # The timed-out connection is closed, not left open or returned to the pool.
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed_by_client.wait()


async def test_a_port_with_nothing_listening_is_a_connect_error() -> None:
    async with client(f"http://127.0.0.1:{_free_port()}") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_a_host_that_does_not_resolve_is_a_connect_error() -> None:
    # .invalid never resolves (RFC 6761).
    async with client("http://upstream.invalid") as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/")


async def test_a_write_the_server_never_reads_is_a_write_timeout() -> None:
    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(CLIENT_TIMEOUT_S)

    async with (
        serve(never_reads) as upstream,
        client(upstream.url, timeout=_short(write=SHORT_TIMEOUT_S)) as http,
    ):
        with pytest.raises(httpx.WriteTimeout):
            await http.post("/", content=bytes(UNREADABLE_BODY_BYTES))


async def test_an_answer_before_the_body_is_read_is_returned() -> None:
    # A vendor may refuse a request from its head alone (413, 401) and never read the
    # body: its answer is what the caller gets, not a write timeout.
    async def refuses_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response(b"too large", status=b"413 Content Too Large"))
        await writer.drain()
        await asyncio.sleep(CLIENT_TIMEOUT_S)

    async with (
        serve(refuses_early) as upstream,
        client(upstream.url, timeout=_short(write=SHORT_TIMEOUT_S)) as http,
    ):
        answer = await http.post("/", content=bytes(UNREADABLE_BODY_BYTES))
        assert answer.status_code == 413
        assert answer.content == b"too large"
        # Half a request went out on it: the next request gets a new connection.
        assert (await http.post("/", content=bytes(UNREADABLE_BODY_BYTES))).status_code == 413
        assert upstream.connections_accepted == 2


# --------------------------------------------------------------------------- flow control


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    body = random.Random(7).randbytes(LARGE_BODY_BYTES)
    assert len(body) > 4 * READ_BUFFER_HIGH

    async def sends_large_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(body, close=True))
        await writer.drain()

    received = bytearray()
    async with (
        serve(sends_large_body) as upstream,
        client(upstream.url) as http,
        http.stream("GET", "/") as streamed,
    ):
        connection = streamed.extensions["network_stream"]
        chunks_read = 0
        async for chunk in streamed.aiter_raw():
            received += chunk
            chunks_read += 1
            if chunks_read <= 3:
                await asyncio.sleep(SLOW_READER_PAUSE_S)
                # The server sent far more than the buffer holds while we slept: the
                # connection stopped reading from the socket rather than buffer it all.
                assert connection._reading_paused
                assert connection._body_bytes < 2 * READ_BUFFER_HIGH
    assert len(received) == len(body)
    assert received == body


# ------------------------------------------------------------------------------- uvloop


def test_the_transport_on_uvloop_as_the_gateway_runs_it(certificate: _Certificate) -> None:
    """The tests above run on asyncio's own loop; the gateway runs on uvloop (uvicorn picks
    it), whose transports and TLS are its own: the same behaviours, once, on uvloop."""
    body = random.Random(11).randbytes(LARGE_BODY_BYTES)

    async def large_or_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        writer.write(response(body if head.startswith(b"GET /large ") else b"ok"))
        await writer.drain()  # then closes: the pooled connection is closed while idle

    async def scenario() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        context = _server_ssl_context(certificate)
        async with (
            serve(large_or_once, ssl_context=context) as upstream,
            client(upstream.url, verify=_trusting(certificate)) as http,
        ):
            for attempt in range(1, 3):
                assert (await http.get("/")).content == b"ok"
                assert upstream.connections_accepted == attempt
                await asyncio.sleep(FIN_DELIVERY_S)
            async with http.stream("GET", "/large") as streamed:
                connection = streamed.extensions["network_stream"]
                received = bytearray()
                async for chunk in streamed.aiter_raw():
                    if not received:
                        await asyncio.sleep(SLOW_READER_PAUSE_S)
                        assert connection._reading_paused
                    received += chunk
            assert received == body
        async with (
            serve(keeps_alive, ssl_context=context) as upstream,
            client(upstream.url, verify=ssl.create_default_context()) as http,
        ):
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get("/")

    uvloop.run(scenario())
