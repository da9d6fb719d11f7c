"""The transport under each vendor's httpx client: HTTP/1.1 over a pool of keep-alive
connections to one origin.

The gateway keeps one ``httpx.AsyncClient`` per vendor, with its ``Timeout`` and
``Limits``; this is what the client sends through instead of httpx's default transport
(httpcore), whose pool walks every pooled connection on each request and each response
close and drives h11's state machine in Python through anyio events (with the client's
own per-request work, 44 % of the gateway's CPU per proxied call: docs/decisions.md).
Here taking and returning a connection is O(1): an ordered dict of idle connections,
the most recently used taken first, the longest idle expired first; a connection the
vendor closed says so by flags the event loop set (``_upstream_network``), and responses
are parsed in C (``_upstream_http11``).

It honours the request's ``timeout`` extension (httpx's ``Timeout``: connect, read, write,
pool) and the client's ``Limits``: ``max_connections`` requests in flight (so connections
open), the others wait in order up to the pool timeout; ``max_keepalive_connections`` idle
connections kept; ``keepalive_expiry``. A response read to its end returns its connection
to the pool; one closed before its end closes its connection (the vendor stops sending).

It does not do (docs/decisions.md): HTTP/2, proxies (from the environment or given),
Unix sockets, retries, requests to any origin but the one it was made for (the vendor's
key must never go elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol

import httpx

from spendgate_gateway._upstream_http11 import HTTP11Connection, request_head
from spendgate_gateway._upstream_network import connect, wait_at_most

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ObservedExchange(Protocol):
    """One exchange being observed: told how it ended, once."""

    def answered(self, status_code: int) -> None: ...

    def failed(self, error: BaseException) -> None: ...


class ExchangeObserver(Protocol):
    """Telemetry around each exchange (``spendgate_gateway._telemetry.UpstreamObserver``),
    from sending the request to the response's head."""

    def start(self, method: bytes, host: str) -> ObservedExchange: ...


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to ``base_url``'s origin within ``limits``; TLS for https with ``verify``
    (httpx's meaning: True checks certificates against certifi's roots, or an
    ``ssl.SSLContext`` of your own); each exchange through ``observer`` if given."""

    def __init__(
        self,
        base_url: str,
        *,
        limits: httpx.Limits,
        verify: ssl.SSLContext | bool = True,
        observer: ExchangeObserver | None = None,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in _DEFAULT_PORTS or not url.host:
            raise ValueError(f"an upstream is http:// or https:// with a host, not {base_url!r}")
        self._scheme = url.scheme
        self._host = url.host
        # httpx leaves a URL's default port out (None); both forms are kept.
        self._url_port = url.port
        self._port = url.port or _DEFAULT_PORTS[url.scheme]
        self._ssl_context: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        self._slots = _Slots(limits.max_connections)
        self._keepalive_max = limits.max_keepalive_connections
        self._keepalive_expiry_s = limits.keepalive_expiry
        # Idle connections in the order they were returned: the last is the most recently
        # used (taken first), the first the longest idle (expired first).
        self._idle: OrderedDict[HTTP11Connection, None] = OrderedDict()
        # Every open connection, idle or not, so that aclose closes them all.
        self._connections: set[HTTP11Connection] = set()
        self._closed = False
        self._observer = observer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's entry: ``request`` as an ``AsyncClient`` built it (Host and body
        headers included, the client's ``Timeout`` in its ``timeout`` extension)."""
        url = request.url
        if url.host != self._host or url.port != self._url_port or url.scheme != self._scheme:
            raise httpx.UnsupportedProtocol(f"this transport only serves {self._origin}")
        stream = request.stream
        body: bytes | httpx.AsyncByteStream
        if isinstance(stream, httpx.ByteStream):
            body = await _body_of(request)
        else:
            assert isinstance(stream, httpx.AsyncByteStream), "an AsyncClient's request"
            body = stream
        timeouts = request.extensions.get("timeout", _NO_TIMEOUTS)
        method = request.method.encode("ascii")
        return await self.send(method, url.raw_path, request.headers.raw, body, timeouts)

    async def send(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | httpx.AsyncByteStream,
        timeouts: Mapping[str, float | None],
    ) -> httpx.Response:
        """Send one request to this transport's origin; its response once its head
        arrived (the body streams). ``target`` is the path and query, ``headers`` all of
        them (Host, and Content-Length or ``Transfer-Encoding: chunked`` for a body,
        included), ``timeouts`` httpx's ``Timeout.as_dict()``.

        What the proxy calls directly (``UpstreamClient.forward``): an ``AsyncClient``
        builds and merges a request object per call (URL parsing, header normalisation,
        cookies, auth and redirect plumbing) that a proxy with none of those needs.
        """
        if self._closed:
            raise httpx.ConnectError("the transport is closed")
        head = request_head(method, target, headers)
        observed = None if self._observer is None else self._observer.start(method, self._host)
        connection: HTTP11Connection | None = None
        slot_taken = False
        try:
            await self._slots.take(timeouts.get("pool"))
            slot_taken = True
            connection = self._idle_connection() or await self._connect(timeouts.get("connect"))
            connection.begin(method, headers)
            await connection.exchange(head, body, timeouts.get("write"), timeouts.get("read"))
        except BaseException as error:
            if connection is not None:
                self._discard(connection)
            if slot_taken:
                self._slots.give_back()
            if observed is not None:
                observed.failed(error)
            raise
        if observed is not None:
            observed.answered(connection.status_code)
        return httpx.Response(
            connection.status_code,
            headers=connection.headers,
            stream=_ResponseBody(self, connection, timeouts.get("read")),
            extensions={
                "http_version": connection.http_version,
                "reason_phrase": connection.reason_phrase,
                "network_stream": connection,
            },
        )

    async def aclose(self) -> None:
        """Close every connection, idle or busy (a busy one's reader gets an httpx error)."""
        self._closed = True
        for connection in list(self._connections):
            self._discard(connection)

    # ---------------------------------------------------------------------- the pool

    @property
    def _origin(self) -> str:
        return f"{self._scheme}://{self._host}:{self._port}"

    def _idle_connection(self) -> HTTP11Connection | None:
        """The most recently used idle connection still fit for a request, or None.

        Connections idle longer than the keep-alive expiry go first, from the oldest; then
        the newest is taken unless the vendor closed it meanwhile (end of stream or stray
        bytes seen by the event loop), each check O(1).
        """
        idle = self._idle
        if not idle:
            return None
        expiry_s = self._keepalive_expiry_s
        if expiry_s is not None:
            now = asyncio.get_running_loop().time()
            while idle:
                oldest = next(iter(idle))
                if now - oldest.idle_since <= expiry_s:
                    break
                self._discard(oldest)
        while idle:
            connection, _ = idle.popitem()
            if connection.reusable:
                return connection
            self._discard(connection)
        return None

    async def _connect(self, limit_s: float | None) -> HTTP11Connection:
        connection = await connect(
            lambda: HTTP11Connection(self._discard_idle),
            self._host,
            self._port,
            ssl_context=self._ssl_context,
            limit_s=limit_s,
        )
        self._connections.add(connection)
        return connection

    def release(self, connection: HTTP11Connection) -> None:
        """``connection``'s response is closed: keep the connection for the next request
        if it is fit (its response was read to the end, nothing went wrong) and there is
        room among the idle ones, else close it; free its request's slot."""
        self._slots.give_back()
        if not connection.reusable or self._closed:
            self._discard(connection)
            return
        if self._keepalive_max is not None and len(self._idle) >= self._keepalive_max:
            if not self._idle:  # max_keepalive_connections=0: keep none
                self._discard(connection)
                return
            self._discard(next(iter(self._idle)))
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle[connection] = None

    def _discard_idle(self, connection: HTTP11Connection) -> None:
        # The vendor closed an idle connection: forget it now, not when it is next taken.
        if connection in self._idle:
            self._discard(connection)

    def _discard(self, connection: HTTP11Connection) -> None:
        self._idle.pop(connection, None)
        self._connections.discard(connection)
        connection.close()


_NO_TIMEOUTS: dict[str, float | None] = {}


class _Slots:
    """Requests in flight: at most ``limit`` (None: no limit); the others wait in order.

    A request holds its slot from before it takes a connection until its response is
    closed, so ``limit`` is also the most connections open at once (idle ones are fewer
    than the slots that are free). Waiting is a future per waiter, in a deque: the same
    cost however many wait.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int | None) -> None:
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self, limit_s: float | None) -> None:
        """Take a slot, waiting at most ``limit_s`` seconds (then ``httpx.PoolTimeout``)."""
        if self._free is None:
            return
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await wait_at_most(waiter, limit_s, httpx.PoolTimeout, "no upstream connection free")
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a slot (give_back) but cancelled before running on: pass it on.
                self.give_back()
            else:
                # Timed out or cancelled while waiting: leave the queue now (a scan, on this
                # path only), so that waiters behind a stuck vendor cannot pile up in it.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give_back(self) -> None:
        """Free a slot: to the longest waiter still waiting, else to the pool."""
        if self._free is None:
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():  # the others timed out or were cancelled
                waiter.set_result(None)
                return
        self._free += 1


async def _body_of(request: httpx.Request) -> bytes:
    try:
        return request.content  # read when the request was built from bytes
    except httpx.RequestNotRead:
        return await request.aread()


class _ResponseBody(httpx.AsyncByteStream):
    """A response's body as it arrives; closing it returns its connection to the pool
    (read to the end) or closes it (not read to the end, or broken)."""

    def __init__(
        self,
        transport: UpstreamTransport,
        connection: HTTP11Connection,
        read_limit_s: float | None,
    ) -> None:
        self._transport: UpstreamTransport | None = transport
        self._connection = connection
        self._read_limit_s = read_limit_s

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._transport is None:
            raise StopAsyncIteration
        try:
            chunk = await self._connection.next_chunk(self._read_limit_s)
        except BaseException:
            self._give_back()
            raise
        if chunk is None:
            self._give_back()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._give_back()

    def _give_back(self) -> None:
        transport = self._transport
        if transport is not None:
            self._transport = None
            transport.release(self._connection)
