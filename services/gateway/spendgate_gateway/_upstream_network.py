"""The sockets under the upstream httpx clients: asyncio protocols instead of anyio streams.

httpx's pool (httpcore) asks, on every request and every response close, whether each idle
pooled connection was closed by the vendor. Through anyio that question is a new
``select.poll`` object and a syscall per idle connection, plus anyio cancel scopes around
every read and write; together they were a quarter of the gateway's CPU per proxied call
(bench/gateway, py-spy). Here a connection is an :class:`asyncio.Protocol`: the event loop
hands it bytes and end-of-file as they arrive, so "was it closed?" is two attribute reads,
and a read or write with a timeout is a future and a timer.

Behaviour is httpcore's contract (``httpcore.AsyncNetworkBackend``): ``read`` returns
``b""`` at end of stream, timeouts raise ``ReadTimeout`` / ``WriteTimeout`` /
``ConnectTimeout`` and failures ``ReadError`` / ``WriteError`` / ``ConnectError``, which
httpx maps to its own exceptions as for its default backend. TLS is the event loop's
``start_tls`` with httpx's SSL context (certificate checks unchanged).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import httpcore
import httpx
import sniffio

# Stop reading from the socket while this many received bytes wait to be read (a slow
# caller of a streamed response); read again once they were taken.
READ_BUFFER_HIGH = 256 * 1024

# httpcore's SOCKET_OPTION (setsockopt's argument tuples).
SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection: received bytes wait in a buffer for ``read``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._reading_paused = False
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= READ_BUFFER_HIGH and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        _wake(self._readable)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._readable)
        return False  # close the transport: HTTP/1.1 never half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._closed = True
        self._lost = exc
        _wake(self._readable)
        _wake(self._writable)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self._writable)
        self._writable = None

    # ------------------------------------------------------------------- the stream

    @property
    def is_readable(self) -> bool:
        """Bytes or end of stream waiting: on an idle connection, the vendor closed it."""
        return bool(self._buffer) or self._eof

    async def read(self, max_bytes: int, limit_s: float | None) -> bytes:
        if not self._buffer and not self._eof:
            self._readable = asyncio.get_running_loop().create_future()
            try:
                await _wait(self._readable, limit_s, httpcore.ReadTimeout)
            finally:
                self._readable = None
        if self._buffer:
            chunk = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            if self._reading_paused and len(self._buffer) < READ_BUFFER_HIGH:
                self._reading_paused = False
                if self.transport is not None and not self._closed:
                    self.transport.resume_reading()
            return chunk
        if self._lost is not None:
            raise httpcore.ReadError(f"connection lost: {self._lost}")
        return b""

    async def write(self, data: bytes, limit_s: float | None) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise httpcore.WriteError(f"connection closed: {self._lost or 'by us'}")
        self.transport.write(data)
        if self._writable is not None:
            await _wait(self._writable, limit_s, httpcore.WriteTimeout)
            if self._closed:
                raise httpcore.WriteError(f"connection lost: {self._lost}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamStream(httpcore.AsyncNetworkStream):
    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._connection.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if buffer:
            await self._connection.write(buffer, timeout)

    async def aclose(self) -> None:
        self._connection.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        connection = self._connection
        assert connection.transport is not None
        try:
            # The loop's own handshake timeout surfaces as ConnectionAbortedError: time the
            # handshake here instead, so that it is a ConnectTimeout as with httpx's backend.
            async with asyncio.timeout(timeout):
                transport = await asyncio.get_running_loop().start_tls(
                    connection.transport, connection, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as error:
            connection.close()
            raise httpcore.ConnectTimeout(f"TLS handshake timed out after {timeout} s") from error
        except (OSError, ssl.SSLError) as error:
            connection.close()
            raise httpcore.ConnectError(f"TLS handshake failed: {error}") from error
        if transport is None:  # the peer closed during the handshake
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        connection.transport = transport
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._connection.is_readable
        transport = self._connection.transport
        if transport is None:
            return None
        name = {
            "ssl_object": "ssl_object",
            "client_addr": "sockname",
            "server_addr": "peername",
            "socket": "socket",
        }.get(info)
        return transport.get_extra_info(name) if name is not None else None


class UpstreamNetwork(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on asyncio (uvloop in the gateway) protocols."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError as error:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from error
        except OSError as error:
            raise httpcore.ConnectError(f"connecting to {host}:{port}: {error}") from error
        _set_options(connection, socket_options)
        return UpstreamStream(connection)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_unix_connection(_Connection, path)
        except TimeoutError as error:
            raise httpcore.ConnectTimeout(f"connecting to {path} timed out") from error
        except OSError as error:
            raise httpcore.ConnectError(f"connecting to {path}: {error}") from error
        _set_options(connection, socket_options)
        return UpstreamStream(connection)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def use_upstream_network(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncHTTPTransport:
    """``transport`` with its connection pool on :class:`UpstreamNetwork`.

    httpx does not take a network backend as an argument; its pool (an httpcore
    ``AsyncConnectionPool``, as in the locked versions) keeps the one it opens every
    connection with in ``_network_backend``. tests/test_gateway_upstream_network.py checks
    that the swap takes effect, so an httpx or httpcore upgrade that moves it fails there.
    """
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpx's transport no longer has an httpcore pool to configure")
    pool._network_backend = UpstreamNetwork()
    return transport


class BoundedTransport(httpx.AsyncBaseTransport):
    """At most ``limit`` requests inside ``inner`` at once (a request holds its slot until
    its response is closed); the others wait here, in order, for the pool timeout.

    httpcore's pool walks every queued request times every connection, and every idle
    connection times every connection, each time a request arrives or a response closes.
    Under overload (a hundred connections busy, hundreds of calls queued) that is tens of
    thousands of method calls per event, and the gateway's CPU per call went from 1 ms
    to 5-21 ms (bench/gateway at 750 and 1,000 calls/s): throughput collapsed instead of
    levelling off. Set to the pool's ``max_connections``, this keeps httpcore's queue
    empty; waiting on an asyncio semaphore costs the same however many wait.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._slots = asyncio.Semaphore(limit)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        pool_timeout_s = timeouts.get("pool") if isinstance(timeouts, dict) else None
        try:
            async with asyncio.timeout(pool_timeout_s):
                await self._slots.acquire()
        except TimeoutError as error:
            raise httpx.PoolTimeout(
                f"no upstream connection free within {pool_timeout_s} s", request=request
            ) from error
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._slots.release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _SlotStream(response.stream, self._slots)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _SlotStream(httpx.AsyncByteStream):
    """A response body that gives its request's slot back when closed."""

    def __init__(self, inner: httpx.AsyncByteStream, slots: asyncio.Semaphore) -> None:
        self._inner = inner
        self._slots: asyncio.Semaphore | None = slots

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._slots is not None:
                self._slots.release()
                self._slots = None


@contextmanager
def sniffio_knows_asyncio() -> Iterator[None]:
    """Tell sniffio, for this thread, that asyncio runs here.

    httpcore builds its locks, events and cancellation shields by asking sniffio which
    async library is running, several times per request; unless told, sniffio finds out
    by calling ``asyncio.current_task()`` each time (about a tenth of the gateway's CPU
    per proxied call). The gateway's thread runs nothing but its asyncio loop.
    """
    previous = sniffio.thread_local.name
    sniffio.thread_local.name = "asyncio"
    try:
        yield
    finally:
        sniffio.thread_local.name = previous


def _set_options(connection: _Connection, options: Iterable[SocketOption] | None) -> None:
    if not options or connection.transport is None:
        return
    sock: socket.socket | None = connection.transport.get_extra_info("socket")
    if sock is not None:
        for option in options:
            sock.setsockopt(*option)


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


async def _wait(
    future: asyncio.Future[None],
    limit_s: float | None,
    timeout_error: type[httpcore.TimeoutException],
) -> None:
    """Wait for ``future`` at most ``limit_s`` seconds (None: no limit)."""
    if limit_s is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(limit_s, _expire, future)
    try:
        await future
    except TimeoutError as error:
        raise timeout_error(f"no progress within {limit_s:g} s") from error
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
