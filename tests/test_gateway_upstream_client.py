"""The gateway's upstream client: one per vendor, shared by every tenant, so it must not
carry one caller's vendor cookies to another caller; and ``forward``, the proxy's way
through it, sends the agent's call under the vendor's base URL with the client's
defaults. Real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spendgate_common.settings import Env
from spendgate_common.telemetry import Telemetry
from spendgate_gateway._app import _upstream_client
from spendgate_gateway._settings import GatewaySettings
from spendgate_gateway._telemetry import GatewayTelemetry
from spendgate_gateway._upstream_client import UpstreamClient
from tests.upstream_server import read_request, response, serve

pytestmark = pytest.mark.timeout(10)


class _SetsCookies(BaseHTTPRequestHandler):
    """Sets a cookie on every answer and echoes the Cookie header it received."""

    def do_GET(self) -> None:
        received = (self.headers.get("cookie") or "").encode()
        self.send_response(200)
        self.send_header("set-cookie", "__cf_bm=tenant-a-session; Path=/")
        self.send_header("content-length", str(len(received)))
        self.end_headers()
        self.wfile.write(received)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SetsCookies)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _gateway_client(base_url: str) -> UpstreamClient:
    """The upstream client as the gateway builds it, with its default settings."""
    settings = GatewaySettings.from_env(Env({"SPENDGATE_ADMIN_TOKEN": "a" * 24}))
    return _upstream_client(settings, "stripe", base_url, GatewayTelemetry(Telemetry.disabled()))


async def test_vendor_cookies_are_never_sent_on_later_calls(upstream_url: str) -> None:
    async with _gateway_client(upstream_url) as client:
        first = await client.get("/")
        assert first.headers["set-cookie"].startswith("__cf_bm=")
        second = await client.get("/")
        assert second.content == b""
        assert not client.cookies
        forwarded = await client.forward("GET", "again", b"", [], b"")
        assert await forwarded.aread() == b""


class _Recorded:
    """The requests a recording server received: head (as lines) and body."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[bytes], bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            self.requests.append((head.split(b"\r\n")[:-2], body))
            writer.write(response(b"recorded"))
            await writer.drain()


async def test_forward_sends_the_call_under_the_base_url_with_the_clients_defaults() -> None:
    recorded = _Recorded()
    async with (
        serve(recorded.handle) as upstream,
        _gateway_client(upstream.url + "/base") as client,
    ):
        defaults = client.headers
        answer = await client.forward(
            "POST",
            "v1/charges",
            b"expand=customer&note=a%20b",
            [(b"accept", b"application/json"), (b"authorization", b"Bearer sk_test_1")],
            b"amount=100",
        )
        assert answer.status_code == 200
        assert await answer.aread() == b"recorded"
    (lines, body) = recorded.requests[0]
    assert lines[0] == b"POST /base/v1/charges?expand=customer&note=a%20b HTTP/1.1"
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    host = upstream.url.removeprefix("http://").encode()
    assert (b"host", host) in headers
    # The given accept replaces the client's default; the other defaults stay.
    assert [value for name, value in headers if name == b"accept"] == [b"application/json"]
    assert (b"accept-encoding", defaults["accept-encoding"].encode()) in headers
    assert (b"user-agent", defaults["user-agent"].encode()) in headers
    assert (b"connection", b"keep-alive") in headers
    assert (b"authorization", b"Bearer sk_test_1") in headers
    assert (b"content-length", b"10") in headers
    assert body == b"amount=100"


async def test_forward_escapes_query_bytes_outside_rfc_3986() -> None:
    recorded = _Recorded()
    async with serve(recorded.handle) as upstream, _gateway_client(upstream.url) as client:
        answer = await client.forward("GET", "v1/search", b'q=a b&tags[]=x"\xff&ok=%2F', [], b"")
        await answer.aclose()
    request_line = recorded.requests[0][0][0]
    assert request_line == b"GET /v1/search?q=a%20b&tags%5B%5D=x%22%FF&ok=%2F HTTP/1.1"


async def test_forward_sends_a_content_length_only_where_a_body_belongs() -> None:
    recorded = _Recorded()
    async with serve(recorded.handle) as upstream, _gateway_client(upstream.url) as client:
        for method in ("GET", "DELETE", "POST"):
            answer = await client.forward(method, "v1/x", b"", [], b"")
            await answer.aclose()
    lengths = [
        [line for line in lines if line.lower().startswith(b"content-length")]
        for lines, _ in recorded.requests
    ]
    assert lengths == [[], [], [b"content-length: 0"]]
