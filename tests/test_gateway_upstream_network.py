"""The gateway's upstream network backend (asyncio protocols under httpx), on real sockets.

Every test talks HTTP/1.1 to a small asyncio server on 127.0.0.1 written here, through an
``httpx.AsyncClient`` whose transport went through :func:`use_upstream_network`, so a
failure is the backend's (or a sign that an httpx or httpcore upgrade moved the pool's
backend and the swap no longer takes effect).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sniffio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spendgate_gateway._upstream_network import (
    READ_BUFFER_HIGH,
    BoundedTransport,
    UpstreamNetwork,
    UpstreamStream,
    sniffio_knows_asyncio,
    use_upstream_network,
)

# A hung backend (a read never woken, reading never resumed) fails here, not at pytest's
# global timeout.
pytestmark = pytest.mark.timeout(10)

# Bounds of the test clients; each test expects its answers well within them.
CLIENT_TIMEOUT_S = 2.0
CLIENT_CONNECTIONS_MAX = 4
# The read timeout of the test whose server never answers.
SHORT_READ_TIMEOUT_S = 0.2
# How long the loop gets to deliver a server's FIN to the idle pooled connection.
FIN_DELIVERY_S = 0.05
# How long the streaming test's reader dawdles between its first chunks.
SLOW_READER_PAUSE_S = 0.05
# Larger than READ_BUFFER_HIGH several times over, so reading from the socket must pause.
LARGE_BODY_BYTES = 2 * 1024 * 1024
# Bound of the wait for a test server's connection handlers to finish at teardown.
SERVER_CLOSE_TIMEOUT_S = 2.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class _Upstream:
    """A test server: its URL and how many TCP connections it accepted."""

    url: str
    connections_accepted: int = 0
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)


@asynccontextmanager
async def _serve(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[_Upstream]:
    """Serve ``handler`` on 127.0.0.1 (a free port) for the body of the ``async with``."""
    scheme = "https" if ssl_context is not None else "http"
    upstream = _Upstream(url="")

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.connections_accepted += 1
        task = asyncio.current_task()
        assert task is not None
        upstream._handlers[task] = writer
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; a test that cares checks its own outcome
        finally:
            writer.close()
            del upstream._handlers[task]

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"{scheme}://127.0.0.1:{port}"
    try:
        yield upstream
    finally:
        server.close()
        # Abort rather than cancel the handlers: each then ends on its own, at end of
        # stream, and Python 3.11's asyncio logs a cancelled connection handler as an error.
        handlers = list(upstream._handlers.items())
        for _, writer in handlers:
            writer.transport.abort()
        async with asyncio.timeout(SERVER_CLOSE_TIMEOUT_S):
            await asyncio.gather(*(task for task, _ in handlers), return_exceptions=True)
            await server.wait_closed()


def _client(
    base_url: str, *, verify: ssl.SSLContext | bool = True, timeout_s: float = CLIENT_TIMEOUT_S
) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=CLIENT_CONNECTIONS_MAX, max_keepalive_connections=CLIENT_CONNECTIONS_MAX
    )
    transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits, trust_env=False)
    return httpx.AsyncClient(
        base_url=base_url,
        transport=use_upstream_network(transport),
        timeout=httpx.Timeout(timeout_s),
        trust_env=False,
    )


def _response(body: bytes, *, close: bool = False) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n"
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def _answer_requests(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests_max: int
) -> None:
    """Answer up to ``requests_max`` bodiless requests on one connection with "ok"."""
    for _ in range(requests_max):
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return  # the client closed the connection
        writer.write(_response(b"ok"))
        await writer.drain()


async def _keeps_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _answer_requests(reader, writer, requests_max=1_000)


async def _answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # No "connection: close": the client pools the connection, then finds it closed.
    await _answer_requests(reader, writer, requests_max=1)


# -------------------------------------------------------------------------------- the swap


async def test_use_upstream_network_puts_the_pool_on_the_upstream_network() -> None:
    async with _serve(_keeps_alive) as upstream, _client(upstream.url) as client:
        transport = client._transport
        assert isinstance(transport, httpx.AsyncHTTPTransport)
        assert isinstance(transport._pool._network_backend, UpstreamNetwork)
        response = await client.get("/")
        assert response.status_code == 200
        assert response.content == b"ok"
        # The connection the request went out on was opened by the swapped-in backend.
        assert isinstance(response.extensions["network_stream"], UpstreamStream)


def test_use_upstream_network_refuses_a_transport_without_an_httpcore_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    monkeypatch.setattr(transport, "_pool", object())
    with pytest.raises(RuntimeError, match="httpcore pool"):
        use_upstream_network(transport)


# ------------------------------------------------------------------------------ keep-alive


async def test_sequential_requests_reuse_one_connection() -> None:
    async with _serve(_keeps_alive) as upstream, _client(upstream.url) as client:
        for _ in range(5):
            response = await client.get("/")
            assert response.content == b"ok"
        assert upstream.connections_accepted == 1


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    async with _serve(_answers_once) as upstream, _client(upstream.url) as client:
        for attempt in range(1, 4):
            response = await client.get("/")
            assert response.content == b"ok"
            assert upstream.connections_accepted == attempt
            # Let the server's FIN reach the pooled connection before the next request,
            # which must then see it closed (is_readable) instead of writing into it.
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


async def test_tls_request_to_a_trusted_server(certificate: _Certificate) -> None:
    trusting = ssl.create_default_context(cadata=certificate.cert_pem.decode())
    async with (
        _serve(_keeps_alive, ssl_context=_server_ssl_context(certificate)) as upstream,
        _client(upstream.url, verify=trusting) as client,
    ):
        response = await client.get("/")
        assert response.content == b"ok"
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        assert ssl_object.getpeercert(binary_form=True) == x509.load_pem_x509_certificate(
            certificate.cert_pem
        ).public_bytes(serialization.Encoding.DER)
        # The TLS connection goes back to the pool and is reused like a plain one.
        assert (await client.get("/")).content == b"ok"
        assert upstream.connections_accepted == 1


async def test_a_tls_connection_the_server_closed_while_idle_is_replaced(
    certificate: _Certificate,
) -> None:
    # Through TLS, the server's close (close_notify, then FIN) reaches the connection
    # through the event loop's SSL protocol, not straight from the socket.
    trusting = ssl.create_default_context(cadata=certificate.cert_pem.decode())
    async with (
        _serve(_answers_once, ssl_context=_server_ssl_context(certificate)) as upstream,
        _client(upstream.url, verify=trusting) as client,
    ):
        for attempt in range(1, 3):
            response = await client.get("/")
            assert response.content == b"ok"
            assert upstream.connections_accepted == attempt
            await asyncio.sleep(FIN_DELIVERY_S)


async def test_tls_server_with_an_untrusted_certificate_is_a_connect_error(
    certificate: _Certificate,
) -> None:
    async with (
        _serve(_keeps_alive, ssl_context=_server_ssl_context(certificate)) as upstream,
        _client(upstream.url, verify=ssl.create_default_context()) as client,
    ):
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get("/")


async def test_a_tls_handshake_that_never_completes_is_a_connect_timeout(
    certificate: _Certificate,
) -> None:
    async def never_handshakes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the ClientHello, never answers it

    async with _serve(never_handshakes) as upstream:
        https_url = upstream.url.replace("http://", "https://", 1)
        trusting = ssl.create_default_context(cadata=certificate.cert_pem.decode())
        async with _client(https_url, verify=trusting, timeout_s=SHORT_READ_TIMEOUT_S) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get("/")


# ------------------------------------------------------------------------- failures, bounds


async def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    closed_by_client = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes the connection
        closed_by_client.set()

    async with (
        _serve(never_answers) as upstream,
        _client(upstream.url, timeout_s=SHORT_READ_TIMEOUT_S) as client,
    ):
        started_at = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/")
        waited_s = time.monotonic() - started_at
        assert SHORT_READ_TIMEOUT_S * 0.9 <= waited_s < SHORT_READ_TIMEOUT_S + 0.5
        assert upstream.connections_accepted == 1
        # The timed-out connection is closed, not left open or returned to the pool.
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed_by_client.wait()


async def test_a_port_with_nothing_listening_is_a_connect_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with _client(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


# --------------------------------------------------------------------------- flow control


async def test_a_large_body_read_slowly_arrives_whole() -> None:
    body = random.Random(7).randbytes(LARGE_BODY_BYTES)
    assert len(body) > 4 * READ_BUFFER_HIGH

    async def sends_large_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(_response(body, close=True))
        await writer.drain()

    received = bytearray()
    async with (
        _serve(sends_large_body) as upstream,
        _client(upstream.url) as client,
        client.stream("GET", "/") as response,
    ):
        stream = response.extensions["network_stream"]
        assert isinstance(stream, UpstreamStream)
        chunks_read = 0
        async for chunk in response.aiter_bytes():
            received += chunk
            chunks_read += 1
            if chunks_read <= 3:
                await asyncio.sleep(SLOW_READER_PAUSE_S)
                # The server sent far more than the buffer holds while we slept: the
                # connection stopped reading from the socket rather than buffer it all.
                assert stream._connection._reading_paused
                assert len(stream._connection._buffer) < 2 * READ_BUFFER_HIGH
    assert len(received) == len(body)
    assert received == body


# -------------------------------------------------------------------------------- sniffio


def _sniffio_name() -> str | None:
    """The async library sniffio was told runs in this thread (read afresh on every call)."""
    name: str | None = sniffio.thread_local.name
    return name


@pytest.mark.parametrize("previous", [None, "trio"])
def test_sniffio_knows_asyncio_inside_and_restores_the_previous_name(
    previous: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sniffio.thread_local, "name", previous)
    with sniffio_knows_asyncio():
        assert _sniffio_name() == "asyncio"
        assert sniffio.current_async_library() == "asyncio"
    assert _sniffio_name() == previous
    with pytest.raises(ValueError, match="inside"), sniffio_knows_asyncio():
        raise ValueError("inside")
    assert _sniffio_name() == previous
    if previous is None:
        # No loop runs in this (synchronous) test: sniffio must not claim one any more.
        with pytest.raises(sniffio.AsyncLibraryNotFoundError):
            sniffio.current_async_library()


# ------------------------------------------------------------------------- bounded transport


def _bounded_client(base_url: str, *, limit: int, pool_timeout_s: float) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    return httpx.AsyncClient(
        base_url=base_url,
        transport=BoundedTransport(use_upstream_network(transport), limit),
        timeout=httpx.Timeout(CLIENT_TIMEOUT_S, pool=pool_timeout_s),
        trust_env=False,
    )


async def test_the_bounded_transport_lets_limit_requests_in_and_queues_the_rest() -> None:
    inside = 0
    most_inside = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal inside, most_inside
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            inside += 1
            most_inside = max(most_inside, inside)
            await asyncio.sleep(0.02)
            inside -= 1
            writer.write(_response(b"ok"))
            await writer.drain()

    async with (
        _serve(slow) as upstream,
        _bounded_client(upstream.url, limit=2, pool_timeout_s=CLIENT_TIMEOUT_S) as client,
    ):
        responses = await asyncio.gather(*(client.get("/") for _ in range(8)))
    assert [response.text for response in responses] == ["ok"] * 8
    assert most_inside == 2
    assert upstream.connections_accepted == 2


async def test_a_slot_is_held_until_the_response_is_closed() -> None:
    async with (
        _serve(_keeps_alive) as upstream,
        _bounded_client(upstream.url, limit=1, pool_timeout_s=SHORT_READ_TIMEOUT_S) as client,
    ):
        request = client.build_request("GET", "/")
        streamed = await client.send(request, stream=True)
        # The only slot is taken by a response not yet closed: the next call times out in
        # the bounded transport's queue, as an httpx pool timeout (nothing was sent).
        with pytest.raises(httpx.PoolTimeout):
            await client.get("/")
        await streamed.aread()
        await streamed.aclose()
        assert (await client.get("/")).text == "ok"
        assert upstream.connections_accepted == 1


async def test_a_failed_request_gives_its_slot_back() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    async with _bounded_client(
        f"http://127.0.0.1:{port}", limit=1, pool_timeout_s=SHORT_READ_TIMEOUT_S
    ) as client:
        for _ in range(3):  # a leaked slot would turn the second into a PoolTimeout
            with pytest.raises(httpx.ConnectError):
                await client.get("/")
