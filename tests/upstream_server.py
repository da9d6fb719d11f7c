"""Small HTTP/1.1 servers on 127.0.0.1 for the upstream transport's tests.

Each test writes its server as a handler over asyncio streams, so that it can misbehave
exactly as the test needs (close an idle connection, cut a body short, never answer);
:func:`serve` runs it on a free port and counts the connections it accepted.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from spendgate_gateway._upstream_transport import UpstreamTransport

# Bounds of the test clients; each test expects its answers well within them.
CLIENT_TIMEOUT_S = 2.0
CLIENT_CONNECTIONS_MAX = 4
# Bound of the wait for a test server's connection handlers to finish at teardown.
SERVER_CLOSE_TIMEOUT_S = 2.0

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Upstream:
    """A test server: its URL and how many TCP connections it accepted."""

    url: str
    connections_accepted: int = 0
    _handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)


@asynccontextmanager
async def serve(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[Upstream]:
    """Serve ``handler`` on ``host`` (a loopback address; a free port) for the body of the
    ``async with``."""
    scheme = "https" if ssl_context is not None else "http"
    upstream = Upstream(url="")

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

    server = await asyncio.start_server(accept, host, 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    upstream.url = f"{scheme}://{host}:{port}"
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


def client(
    base_url: str,
    *,
    verify: ssl.SSLContext | bool = True,
    timeout: httpx.Timeout | None = None,
    limits: httpx.Limits | None = None,
) -> httpx.AsyncClient:
    """An httpx client on :class:`UpstreamTransport`, as the gateway builds one."""
    limits = limits or httpx.Limits(
        max_connections=CLIENT_CONNECTIONS_MAX, max_keepalive_connections=CLIENT_CONNECTIONS_MAX
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=UpstreamTransport(base_url, limits=limits, verify=verify),
        timeout=timeout or httpx.Timeout(CLIENT_TIMEOUT_S),
        trust_env=False,
    )


def response(body: bytes, *, close: bool = False, status: bytes = b"200 OK") -> bytes:
    """A response with a Content-Length (and ``Connection: close`` when ``close``)."""
    head = b"HTTP/1.1 %s\r\ncontent-length: %d\r\n" % (status, len(body))
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and its Content-Length body (no chunked bodies)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


async def answer_requests(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests_max: int
) -> None:
    """Answer up to ``requests_max`` requests on one connection with "ok"."""
    for _ in range(requests_max):
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return  # the client closed the connection
        writer.write(response(b"ok"))
        await writer.drain()


async def keeps_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await answer_requests(reader, writer, requests_max=1_000)


async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # No "connection: close": the client pools the connection, then finds it closed.
    await answer_requests(reader, writer, requests_max=1)
