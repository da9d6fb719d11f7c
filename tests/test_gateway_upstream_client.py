"""The gateway's upstream client: one per vendor, shared by every tenant, so it must not
carry one caller's vendor cookies to another caller (a real HTTP server on loopback)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spendgate_common.settings import Env
from spendgate_common.telemetry import Telemetry
from spendgate_gateway._app import _upstream_client
from spendgate_gateway._settings import GatewaySettings
from spendgate_gateway._telemetry import GatewayTelemetry


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


async def test_vendor_cookies_are_never_sent_on_later_calls(upstream_url: str) -> None:
    settings = GatewaySettings.from_env(Env({"SPENDGATE_ADMIN_TOKEN": "a" * 24}))
    telemetry = GatewayTelemetry(Telemetry.disabled())
    async with _upstream_client(settings, "stripe", upstream_url, telemetry) as client:
        first = await client.get("/")
        assert first.headers["set-cookie"].startswith("__cf_bm=")
        second = await client.get("/")
        assert second.content == b""
        assert not client.cookies
