"""The upstream transport's HTTP/1.1 and its pool (``_upstream_transport``), on real sockets.

Framing (Content-Length, chunked, to the end of the connection, no body), keep-alive
and ``Connection: close``, the pool's bounds (``httpx.Limits``), streamed responses and
what closing one early does, and the errors a broken vendor causes. Every server is a
few lines over asyncio streams on 127.0.0.1, written to misbehave as each test needs.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from spendgate_gateway._upstream_transport import UpstreamTransport
from tests.upstream_server import (
    CLIENT_TIMEOUT_S,
    Upstream,
    answer_requests,
    client,
    keeps_alive,
    read_request,
    response,
    serve,
)

pytestmark = pytest.mark.timeout(10)

# A pool timeout the tests that exhaust the pool wait out.
SHORT_POOL_TIMEOUT_S = 0.2
# Keep-alive expiry of the test that lets a connection expire, and how long it idles.
KEEPALIVE_EXPIRY_S = 0.05
IDLE_PAST_EXPIRY_S = 0.15


async def _eof_seen(reader: asyncio.StreamReader, seen: asyncio.Event) -> None:
    """Read until the client closes the connection, then say so."""
    await reader.read()
    seen.set()


# ----------------------------------------------------------------------------- framing


async def test_a_chunked_body_arrives_whole_and_the_connection_is_reused() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n")
            await writer.drain()

    async with serve(chunked) as upstream, client(upstream.url) as http:
        for _ in range(2):
            answer = await http.get("/")
            assert answer.content == b"hello world"
        assert upstream.connections_accepted == 1


async def test_a_body_without_length_runs_to_the_end_of_the_connection() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        await writer.drain()
        writer.close()

    async with serve(until_close) as upstream, client(upstream.url) as http:
        assert (await http.get("/")).content == b"all of it"
        assert (await http.get("/")).content == b"all of it"
        assert upstream.connections_accepted == 2


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\ncontent-length: 1234\r\n\r\n"),
    ],
)
async def test_answers_without_a_body_end_at_their_head(method: str, answer: bytes) -> None:
    async def bodiless_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()
        await answer_requests(reader, writer, requests_max=1)

    async with serve(bodiless_then_ok) as upstream, client(upstream.url) as http:
        first = await http.request(method, "/")
        assert first.content == b""
        # The connection went back to the pool and serves the next request whole.
        second = await http.get("/")
        assert second.content == b"ok"
        assert upstream.connections_accepted == 1


async def test_an_informational_answer_is_skipped() -> None:
    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"done"))
        await writer.drain()

    async with serve(continues) as upstream, client(upstream.url) as http:
        answer = await http.post("/", content=b"body")
        assert answer.status_code == 200
        assert answer.content == b"done"


async def test_status_headers_and_request_arrive_as_sent() -> None:
    received: list[tuple[bytes, bytes]] = []

    async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))
        writer.write(
            b"HTTP/1.1 402 Payment Required\r\nContent-Length: 4\r\n"
            b"Set-Thing: one\r\nset-thing: two\r\n\r\nnope"
        )
        await writer.drain()

    async with serve(echoes) as upstream, client(upstream.url) as http:
        body = bytes(range(256)) * 10
        answer = await http.post("/v1/x?a=1&b=%20", content=body, headers={"x-one": "1"})
    assert answer.status_code == 402
    assert answer.reason_phrase == "Payment Required"
    assert answer.http_version == "HTTP/1.1"
    assert answer.headers.get_list("set-thing") == ["one", "two"]
    assert answer.content == b"nope"
    head, received_body = received[0]
    assert head.startswith(b"POST /v1/x?a=1&b=%20 HTTP/1.1\r\n")
    assert b"\r\nx-one: 1\r\n" in head
    assert b"\r\nContent-Length: 2560\r\n" in head
    assert received_body == body


async def test_a_streamed_request_body_is_sent_in_chunks() -> None:
    received: list[bytes] = []

    async def reads_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        received.append(body)
        writer.write(response(b"ok"))
        await writer.drain()

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"first ", b"", b"second"):
            yield part

    async with serve(reads_chunked) as upstream, client(upstream.url) as http:
        assert (await http.post("/", content=parts())).content == b"ok"
    assert received == [b"first second"]


# ----------------------------------------------------------------- broken answers, errors


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", "complete message body"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "complete message body",
        ),
        (b"", "without sending a response"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed"),
    ],
    ids=["cut-short", "chunked-cut-short", "no-answer", "not-http"],
)
async def test_a_broken_answer_then_close_is_a_remote_protocol_error(
    answer: bytes, message: str
) -> None:
    async def answers_then_closes(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with serve(answers_then_closes) as upstream, client(upstream.url) as http:
        with pytest.raises(httpx.RemoteProtocolError, match=message):
            await http.get("/")


async def test_a_connection_reset_mid_body_is_a_read_error() -> None:
    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(0.05)
        # Closing with a zero linger time sends RST, not FIN.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with (
        serve(resets) as upstream,
        client(upstream.url) as http,
        http.stream("GET", "/") as streamed,
    ):
        with pytest.raises(httpx.ReadError):
            await streamed.aread()


async def test_bytes_after_a_complete_answer_retire_the_connection() -> None:
    async def says_too_much(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"ok") + b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nextra")
        await writer.drain()
        await answer_requests(reader, writer, requests_max=1)

    async with serve(says_too_much) as upstream, client(upstream.url) as http:
        assert (await http.get("/")).content == b"ok"
        # Reusing the connection would read "extra" as the next answer.
        assert (await http.get("/")).content == b"ok"
        assert upstream.connections_accepted == 2


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with serve(keeps_alive) as upstream, client(upstream.url) as http:
        request = http.build_request("GET", "/", headers={"x-ok": "fine"})
        request.headers["x-smuggled"] = "a\r\nx-injected: b"
        with pytest.raises(httpx.LocalProtocolError, match="CR or LF"):
            await http.send(request)
        assert upstream.connections_accepted == 0


async def test_a_request_for_another_origin_is_refused() -> None:
    async with serve(keeps_alive) as upstream, client(upstream.url) as http:
        with pytest.raises(httpx.UnsupportedProtocol, match="only serves"):
            await http.get("http://127.0.0.1:1/")
        port = upstream.url.rsplit(":", 1)[1]
        with pytest.raises(httpx.UnsupportedProtocol):
            await http.get(f"https://127.0.0.1:{port}/")
        assert upstream.connections_accepted == 0


def test_a_transport_needs_an_http_origin() -> None:
    with pytest.raises(ValueError, match="http"):
        UpstreamTransport("ftp://example.com", limits=httpx.Limits())


# ---------------------------------------------------------------- keep-alive and closing


async def test_the_server_saying_connection_close_retires_the_connection() -> None:
    async def closes_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"ok", close=True))
        await writer.drain()
        await reader.read()  # stays open until the client closes

    async with serve(closes_each) as upstream, client(upstream.url) as http:
        for attempt in range(1, 3):
            assert (await http.get("/")).content == b"ok"
            assert upstream.connections_accepted == attempt


async def test_a_request_saying_connection_close_closes_the_connection() -> None:
    closed = asyncio.Event()

    async def answers_then_waits(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await answer_requests(reader, writer, requests_max=1)
        await _eof_seen(reader, closed)

    async with serve(answers_then_waits) as upstream, client(upstream.url) as http:
        answer = await http.get("/", headers={"connection": "close"})
        assert answer.content == b"ok"
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed.wait()


async def test_an_idle_connection_past_its_expiry_is_not_used() -> None:
    async with serve(keeps_alive) as upstream:
        limits = httpx.Limits(max_connections=2, keepalive_expiry=KEEPALIVE_EXPIRY_S)
        async with client(upstream.url, limits=limits) as http:
            assert (await http.get("/")).content == b"ok"
            assert (await http.get("/")).content == b"ok"
            assert upstream.connections_accepted == 1
            await asyncio.sleep(IDLE_PAST_EXPIRY_S)
            assert (await http.get("/")).content == b"ok"
            assert upstream.connections_accepted == 2


async def test_idle_connections_beyond_the_keepalive_bound_are_closed() -> None:
    closed = 0
    all_in = asyncio.Event()
    inside = 0

    async def holds_until_all_in(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal closed, inside
        await read_request(reader)
        inside += 1
        if inside == 4:
            all_in.set()
        await all_in.wait()
        writer.write(response(b"ok"))
        await writer.drain()
        await reader.read()
        closed += 1

    async with serve(holds_until_all_in) as upstream:
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=1)
        async with client(upstream.url, limits=limits) as http:
            answers = await asyncio.gather(*(http.get("/") for _ in range(4)))
            assert [answer.content for answer in answers] == [b"ok"] * 4
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                while closed < 3:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert closed == 3  # one stays in the pool
            assert upstream.connections_accepted == 4


async def test_closing_the_transport_closes_idle_and_busy_connections() -> None:
    closed = asyncio.Event()

    async def answers_then_waits(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await answer_requests(reader, writer, requests_max=1)
        await _eof_seen(reader, closed)

    async with serve(answers_then_waits) as upstream:
        http = client(upstream.url)
        assert (await http.get("/")).content == b"ok"
        await http.aclose()
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed.wait()


# ------------------------------------------------------------------------------ streaming


async def test_a_streamed_answer_arrives_chunk_by_chunk() -> None:
    next_event = asyncio.Event()

    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        writer.write(b"transfer-encoding: chunked\r\n\r\n")
        for event in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await next_event.wait()  # the next one only once the client has this one
            next_event.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await answer_requests(reader, writer, requests_max=1)

    async with serve(streams) as upstream, client(upstream.url) as http:
        async with http.stream("GET", "/") as streamed:
            received = []
            async for chunk in streamed.aiter_bytes():
                received.append(chunk)
                next_event.set()
        assert received == [b"data: one\n\n", b"data: two\n\n"]
        # Read to its end, the connection serves the next request.
        assert (await http.get("/")).content == b"ok"
        assert upstream.connections_accepted == 1


async def test_a_stream_closed_early_closes_its_connection() -> None:
    closed = asyncio.Event()

    async def streams_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ntoken \r\n")
        await writer.drain()
        await _eof_seen(reader, closed)

    async with serve(streams_forever) as upstream, client(upstream.url) as http:
        async with http.stream("GET", "/") as streamed:
            async for chunk in streamed.aiter_raw():
                assert chunk == b"token "
                break
        # The vendor sees the connection closed (it stops generating), at once.
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed.wait()


# ------------------------------------------------------------------------- the pool's bound


def _bounded(base_url: str, *, limit: int, pool_timeout_s: float) -> httpx.AsyncClient:
    return client(
        base_url,
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        timeout=httpx.Timeout(CLIENT_TIMEOUT_S, pool=pool_timeout_s),
    )


async def test_at_most_max_connections_requests_are_in_flight_and_the_rest_queue() -> None:
    inside = 0
    most_inside = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal inside, most_inside
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            inside += 1
            most_inside = max(most_inside, inside)
            await asyncio.sleep(0.02)
            inside -= 1
            writer.write(response(b"ok"))
            await writer.drain()

    async with (
        serve(slow) as upstream,
        _bounded(upstream.url, limit=2, pool_timeout_s=CLIENT_TIMEOUT_S) as http,
    ):
        answers = await asyncio.gather(*(http.get("/") for _ in range(8)))
    assert [answer.text for answer in answers] == ["ok"] * 8
    assert most_inside == 2
    assert upstream.connections_accepted == 2


@asynccontextmanager
async def _only_slot_taken(
    pool_timeout_s: float,
) -> AsyncIterator[tuple[Upstream, httpx.AsyncClient, httpx.Response]]:
    """A client with one slot, taken by a response not yet read or closed."""
    async with (
        serve(keeps_alive) as upstream,
        _bounded(upstream.url, limit=1, pool_timeout_s=pool_timeout_s) as http,
    ):
        yield upstream, http, await http.send(http.build_request("GET", "/"), stream=True)


async def test_a_slot_is_held_until_the_response_is_closed() -> None:
    async with _only_slot_taken(SHORT_POOL_TIMEOUT_S) as (upstream, http, streamed):
        # The only slot is taken by a response not yet closed: the next call times out in
        # the queue, as an httpx pool timeout (nothing was sent).
        with pytest.raises(httpx.PoolTimeout):
            await http.get("/")
        # The timed-out waiter left the queue (it does not wait there for a slot).
        transport = http._transport
        assert isinstance(transport, UpstreamTransport)
        assert not transport._slots._waiters
        await streamed.aread()
        await streamed.aclose()
        assert (await http.get("/")).text == "ok"
        assert upstream.connections_accepted == 1


async def test_a_closed_response_hands_its_slot_to_the_first_waiter() -> None:
    async with _only_slot_taken(CLIENT_TIMEOUT_S) as (_, http, streamed):
        waiting = [asyncio.create_task(http.get("/")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        waiting[1].cancel()  # a cancelled waiter must not swallow a slot
        await streamed.aclose()
        answers = await asyncio.gather(waiting[0], waiting[2])
        assert [answer.text for answer in answers] == ["ok", "ok"]
        assert waiting[1].cancelled()


async def test_a_failed_request_gives_its_slot_back() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with (
        serve(hangs_up) as upstream,
        _bounded(upstream.url, limit=1, pool_timeout_s=SHORT_POOL_TIMEOUT_S) as http,
    ):
        for _ in range(3):  # a leaked slot would turn the second into a PoolTimeout
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/")


async def test_a_cancelled_request_gives_its_slot_back_and_closes_its_connection() -> None:
    closed = asyncio.Event()
    requested = asyncio.Event()

    async def never_answers_first(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if requested.is_set():
            await answer_requests(reader, writer, requests_max=1)
            return
        await read_request(reader)
        requested.set()
        await _eof_seen(reader, closed)

    async with (
        serve(never_answers_first) as upstream,
        _bounded(upstream.url, limit=1, pool_timeout_s=SHORT_POOL_TIMEOUT_S) as http,
    ):
        call = asyncio.create_task(http.get("/"))
        await requested.wait()
        call.cancel()
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await closed.wait()
        assert (await http.get("/")).text == "ok"
        assert upstream.connections_accepted == 2
