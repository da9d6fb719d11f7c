"""One upstream HTTP/1.1 connection: a request out, a response in, parsed by httptools.

httptools is llhttp (Node.js's parser, in C) under a thin binding; uvicorn parses the
gateway's own requests with it already. The event loop hands received bytes straight to
the parser, whose callbacks collect the response's head and then its body chunks until
the reader takes them; the reader waits only when nothing is there yet.

A connection serves one exchange at a time and says whether it can serve another
(:attr:`HTTP11Connection.reusable`): not after anything unexpected (bytes nobody asked
for, a malformed response, a request written only in part), nor once either side said
``Connection: close``, nor once the vendor closed it. Failures are httpx's exceptions:
``RemoteProtocolError`` for no response, a cut body or bytes that are not HTTP/1.1,
``ReadError`` for a broken connection, ``ReadTimeout`` / ``WriteTimeout`` / ``WriteError``
from the socket layer (``_upstream_network``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httptools
import httpx

from spendgate_gateway._upstream_network import READ_BUFFER_HIGH, Connection

_HTTP_1_1 = b"HTTP/1.1"
_LAST_CHUNK = b"0\r\n\r\n"


class HTTP11Connection(Connection):
    """One keep-alive HTTP/1.1 connection: :meth:`begin`, :meth:`exchange` (the request
    out, the response's head in), :meth:`next_chunk` until None (the body)."""

    __slots__ = (
        "_body_bytes",
        "_chunked_body",
        "_chunks",
        "_complete",
        "_failure",
        "_fit",
        "_head_only",
        "_in_exchange",
        "_keep_alive",
        "_on_idle_lost",
        "_parser",
        "_request_closes",
        "head_received",
        "headers",
        "http_version",
        "idle_since",
        "reason_phrase",
        "status_code",
    )

    def __init__(self, on_idle_lost: Callable[[HTTP11Connection], None]) -> None:
        super().__init__()
        self._on_idle_lost = on_idle_lost
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._fit = True  # False once anything went wrong: never reused
        self._in_exchange = False
        self._head_only = False
        self._request_closes = False
        self._chunked_body = False
        self.status_code = 0
        self.http_version = _HTTP_1_1
        self.reason_phrase = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_received = False
        self._complete = False
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._body_bytes = 0
        self._failure: httpx.TransportError | None = None

    @property
    def reusable(self) -> bool:
        """Fit for another request: nothing went wrong, nothing arrived unasked, the
        vendor did not close it, and both sides meant to keep it alive."""
        return self._fit and not self.eof and not self._in_exchange

    # --------------------------------------------------------------- one exchange

    def begin(self, method: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Start an exchange for a request with ``method`` and ``headers``."""
        if self._parser is None or self._head_only:
            # A parser told about a HEAD response's Content-Length still expects that
            # body: the next exchange starts with a new one.
            self._parser = httptools.HttpResponseParser(self)
        self._in_exchange = True
        self._head_only = method == b"HEAD"  # its response has no body
        self._request_closes = False
        self._chunked_body = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"connection":
                self._request_closes = value.strip().lower() == b"close"
            elif lowered == b"transfer-encoding":
                self._chunked_body = value.strip().lower() == b"chunked"
        self.reason_phrase = b""
        self.headers = []
        self.head_received = False
        self._complete = False
        self._keep_alive = False

    async def exchange(
        self,
        head: bytes,
        body: bytes | httpx.AsyncByteStream,
        write_limit_s: float | None,
        read_limit_s: float | None,
    ) -> None:
        """Send the request :meth:`begin` announced (``head``: its request line and
        headers; a streamed ``body`` goes in chunks if its headers said so) and wait for
        the response's head: :attr:`status_code`, :attr:`headers`..."""
        try:
            if isinstance(body, bytes):
                await self.write((head, body) if body else (head,), write_limit_s)
            else:
                await self._write_streamed(head, body, write_limit_s)
        except httpx.TransportError:
            # A vendor may answer (413, 401...) and close before reading the whole body;
            # its answer is worth more than our write error.
            if not self.head_received:
                raise
            self._fit = False
        while not self.head_received:
            await self._wait_for_bytes(read_limit_s)

    async def _write_streamed(
        self, head: bytes, body: httpx.AsyncByteStream, limit_s: float | None
    ) -> None:
        chunked = self._chunked_body
        await self.write((head,), limit_s)
        async for chunk in body:
            if chunk:
                framed = (b"%x\r\n" % len(chunk), chunk, b"\r\n") if chunked else (chunk,)
                await self.write(framed, limit_s)
        if chunked:
            await self.write((_LAST_CHUNK,), limit_s)

    async def _wait_for_bytes(self, limit_s: float | None) -> None:
        self._raise_failure()
        await self.wait_readable(limit_s)
        if not self.head_received:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def next_chunk(self, limit_s: float | None) -> bytes | None:
        """The body bytes received since the last call, waiting at most ``limit_s``
        seconds between arrivals; None once the body is complete."""
        while True:
            if self._chunks:
                chunks = self._chunks
                self._chunks = []
                self._body_bytes = 0
                self.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._complete:
                self._in_exchange = False
                if not self._keep_alive or self._request_closes:
                    self._fit = False
                return None
            self._raise_failure()
            await self.wait_readable(limit_s)

    # --------------------------------------------------- the event loop's callbacks

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if not self._in_exchange or self._complete or parser is None:
            # Bytes nobody asked for (the response is over, or the connection is idle):
            # whatever they are, this connection is out of step with the vendor.
            self._unfit()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the vendor switched protocols"))
        except httptools.HttpParserError as error:
            self._parser_failed(error)
        if self._body_bytes >= READ_BUFFER_HIGH:
            self.pause_reading()
        self.wake_reader()

    def eof_received(self) -> bool:
        self._ended()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._ended()
        # Break the parser's reference cycle (its callbacks are this object's methods).
        self._parser = None
        if not self._in_exchange:
            self._on_idle_lost(self)

    def _ended(self) -> None:
        """End of stream or loss: the end of a response read to the end of the
        connection, else a failure of the exchange in progress (if any)."""
        if not self._in_exchange or self._complete or self._failure is not None:
            return
        if self.head_received and not self._length_framed():
            self._complete = True  # the body ran to the end of the connection
            self._keep_alive = False
        elif self.lost_with_error:
            self._failure = httpx.ReadError(f"connection lost: {self.lost_reason}")
        elif not self.head_received:
            self._failure = httpx.RemoteProtocolError(
                "Server disconnected without sending a response."
            )
        else:
            self._failure = httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        self.wake_reader()

    def _length_framed(self) -> bool:
        """The response said where its body ends: a Content-Length, or chunked coding
        (llhttp reads any other body to the end of the connection)."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")
            ):
                return True
        return False

    def _parser_failed(self, error: httptools.HttpParserError) -> None:
        if self._complete:  # bytes after a complete response: not ours to read
            self._unfit()
        else:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {error}"))

    def _fail(self, failure: httpx.TransportError) -> None:
        self._failure = failure
        self._unfit()

    def _unfit(self) -> None:
        self._fit = False
        self.close()

    # llhttp's callbacks (httptools calls them during feed_data).

    def on_message_begin(self) -> None:
        if self.head_received:  # a second response to one request
            raise _UnexpectedBytesError

    def on_status(self, status: bytes) -> None:
        self.reason_phrase += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status_code = parser.get_status_code()
        if status_code < 200:
            return  # an informational response (100 Continue): the real one follows
        self.status_code = status_code
        self.head_received = True
        version = parser.get_http_version()
        self.http_version = _HTTP_1_1 if version == "1.1" else b"HTTP/" + version.encode()
        if self._head_only:
            # A HEAD response has no body whatever its headers say; llhttp cannot be
            # told that, so this parser is replaced before the next exchange.
            self._complete = True
            self._keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            raise _UnexpectedBytesError
        self._chunks.append(body)
        self._body_bytes += len(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        if not self.head_received:  # the end of an informational response
            self.reason_phrase = b""
            self.headers = []
            return
        if not self._complete:
            self._complete = True
            self._keep_alive = parser.should_keep_alive()


class _UnexpectedBytesError(Exception):
    """Raised in a parser callback: bytes after the response's end."""


def request_head(method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, refused if a CR or LF would split them."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines.extend([name + b": " + value for name, value in headers])
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    # Exactly one CR and one LF per line end: a header value with its own would smuggle
    # a header (or a request) to the vendor.
    line_ends = len(lines)
    if head.count(b"\n") != line_ends or head.count(b"\r") != line_ends:
        raise httpx.LocalProtocolError("the request line or a header contains CR or LF")
    return head
