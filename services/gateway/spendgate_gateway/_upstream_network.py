"""The sockets under the upstream transport: asyncio protocols, with httpx's timeouts.

A connection is an :class:`asyncio.Protocol`: the event loop hands it bytes and end of
stream as they arrive, so "did the vendor close this idle connection?" is an attribute
read, and a read or a write with a timeout is a future and a timer (no anyio scopes, no
``select.poll`` per question, which is what httpcore's default backend did; see
docs/decisions.md). This module knows sockets, TLS and timeouts; what the bytes mean is
the HTTP/1.1 layer's (``_upstream_http11``), which subclasses :class:`Connection`.

Failures are httpx's exceptions, raised here where they are detected: ``ConnectError`` /
``ConnectTimeout`` while connecting (TLS handshake and certificate checks included),
``WriteError`` / ``WriteTimeout`` while sending, ``ReadTimeout`` while waiting for bytes.
TLS is the event loop's, with httpx's SSL context (certificate checks unchanged).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import httpx

# Stop reading from the socket while this many received bytes wait to be read (a slow
# reader of a streamed response); read again once they were taken.
READ_BUFFER_HIGH = 256 * 1024

ConnectionType = TypeVar("ConnectionType", bound="Connection")


class Connection(asyncio.Protocol):
    """One upstream TCP (or TLS) connection: its state, writes with back-pressure, and a
    wait for the next event on the receiving side (bytes, end of stream, loss).

    Subclasses take the bytes in :meth:`data_received` and call :meth:`wake_reader` when
    a waiting reader has something new to look at.
    """

    __slots__ = ("_lost", "_readable", "_reading_paused", "_writable", "closed", "eof", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # End of stream from the vendor (or the connection is gone): never reusable.
        self.eof = False
        self.closed = False
        self._lost: Exception | None = None
        self._reading_paused = False
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def eof_received(self) -> bool:
        self.eof = True
        self.wake_reader()
        return False  # close the transport: HTTP/1.1 never half-closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.closed = True
        self._lost = exc
        self.wake_reader()
        _wake(self._writable)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self._writable)
        self._writable = None

    # ----------------------------------------------------------------- receiving side

    def wake_reader(self) -> None:
        _wake(self._readable)

    async def wait_readable(self, limit_s: float | None) -> None:
        """Wait at most ``limit_s`` seconds (None: no limit) for :meth:`wake_reader`.

        Raises ``httpx.ReadTimeout`` when nothing arrived in time (httpx's read timeout:
        the longest wait for the next bytes, not for a whole response).
        """
        self._readable = asyncio.get_running_loop().create_future()
        try:
            await wait_at_most(self._readable, limit_s, httpx.ReadTimeout, "no bytes arrived")
        finally:
            self._readable = None

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    @property
    def lost_reason(self) -> str:
        """Why the connection went away, for an error message."""
        return str(self._lost) if self._lost is not None else "closed by the vendor"

    @property
    def lost_with_error(self) -> bool:
        """The connection broke (a reset, a TLS error) rather than ended with a FIN."""
        return self._lost is not None

    # ------------------------------------------------------------------- sending side

    async def write(self, data: Sequence[bytes], limit_s: float | None) -> None:
        """Send ``data``; wait at most ``limit_s`` seconds for the send buffer to drain
        below its high-water mark (``httpx.WriteTimeout``); ``httpx.WriteError`` if the
        connection is closed or goes away meanwhile."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise httpx.WriteError(f"connection closed: {self.lost_reason}")
        transport.writelines(data)
        if self._writable is not None:
            await wait_at_most(self._writable, limit_s, httpx.WriteTimeout, "nothing was sent")
            if self.closed:
                raise httpx.WriteError(f"connection lost: {self.lost_reason}")

    # ------------------------------------------------------------------------- other

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def get_extra_info(self, name: str) -> Any:
        """The transport's ``get_extra_info`` (``ssl_object``, ``peername``, ``socket``...)."""
        return self.transport.get_extra_info(name) if self.transport is not None else None


async def connect(
    factory: Callable[[], ConnectionType],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    limit_s: float | None,
) -> ConnectionType:
    """A new connection to ``host:port`` (TLS with ``ssl_context`` when given, checking the
    certificate against ``host``), within ``limit_s`` seconds for TCP and TLS together.

    Raises ``httpx.ConnectTimeout`` or ``httpx.ConnectError`` (refused, unresolvable,
    certificate not trusted...): nothing was sent.
    """
    loop = asyncio.get_running_loop()
    try:
        # The loop's own TLS handshake timeout would surface as ConnectionAbortedError:
        # the whole connect is timed here instead, so that it is a ConnectTimeout.
        async with asyncio.timeout(limit_s):
            _, connection = await loop.create_connection(
                factory,
                host,
                port,
                ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None,
            )
    except TimeoutError as error:
        raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from error
    except OSError as error:  # ssl.SSLError included
        raise httpx.ConnectError(f"connecting to {host}:{port}: {error}") from error
    return connection


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


async def wait_at_most(
    future: asyncio.Future[None],
    limit_s: float | None,
    timeout_error: type[httpx.TimeoutException],
    what: str,
) -> None:
    """Wait for ``future`` at most ``limit_s`` seconds (None: no limit), then raise
    ``timeout_error("<what> within <limit_s> s")``. A timer, not a task or a scope."""
    if limit_s is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(limit_s, _expire, future)
    try:
        await future
    except TimeoutError as error:
        raise timeout_error(f"{what} within {limit_s:g} s") from error
    finally:
        timer.cancel()


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
