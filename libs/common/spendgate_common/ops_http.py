"""A small HTTP listener for operations: ``GET /metrics``, ``/healthz`` and ``/readyz``.

The ledger and the auditor serve nothing else over HTTP, so a web framework would be a
large dependency for three read-only routes. This is HTTP/1.1 with ``Connection: close``:
one request per connection, bounded in size, time and concurrency, enough for a
Prometheus scrape and the kubelet's probes. The metrics exposition runs in a worker
thread, so a scrape never pauses the service's event loop for the collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import msgspec

from spendgate_common.telemetry import Telemetry

_log = logging.getLogger(__name__)

# Bounds of one request: its head (request line and headers), the time to send it, and
# the connections served at once (a scrape and two probes need three).
REQUEST_HEAD_BYTES_MAX = 8_192
REQUEST_HEADERS_MAX = 64
REQUEST_READ_TIMEOUT = timedelta(seconds=5)
CONNECTIONS_MAX = 16
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Check:
    """A probe's answer: ``ok`` decides 200 or 503; ``detail`` is shown as JSON."""

    ok: bool
    detail: dict[str, object] = field(default_factory=dict)


class OpsServer:
    """Serves ``telemetry``'s metrics and the ``live`` and ``ready`` checks on host:port."""

    def __init__(
        self,
        host: str,
        port: int,
        telemetry: Telemetry,
        *,
        live: Callable[[], Check],
        ready: Callable[[], Check],
    ) -> None:
        self._host = host
        self._port = port
        self._telemetry = telemetry
        self._live = live
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._connections = 0

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None
        assert self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=REQUEST_HEAD_BYTES_MAX
        )
        _log.info(
            "operations endpoint on %s:%d (/metrics, /healthz, /readyz)", self._host, self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > CONNECTIONS_MAX:
                return
            target = await asyncio.wait_for(
                _read_head(reader), REQUEST_READ_TIMEOUT.total_seconds()
            )
            if target is not None:
                status, content_type, body = await self._answer(*target)
                head = (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + (b"" if target[0] == "HEAD" else body))
                await asyncio.wait_for(writer.drain(), REQUEST_READ_TIMEOUT.total_seconds())
        except (TimeoutError, OSError, ValueError, asyncio.LimitOverrunError):
            pass  # a slow, broken or oversized request: just close the connection
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            body, content_type = await asyncio.to_thread(self._telemetry.exposition)
            return 200, content_type, body
        if path in ("/healthz", "/readyz"):
            check = self._live() if path == "/healthz" else self._ready()
            answer = {"status": "ok" if check.ok else "failing", **check.detail}
            return 200 if check.ok else 503, "application/json", _encoder.encode(answer)
        return 404, "text/plain", b"not found\n"


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """(method, path) of the request; None when it is not an HTTP/1.x request."""
    parts = (await reader.readline()).decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    for _ in range(REQUEST_HEADERS_MAX):
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            return parts[0], parts[1].split("?", 1)[0]
    return None


def ops_server_if_enabled(
    host: str,
    port: int,
    telemetry: Telemetry,
    *,
    live: Callable[[], Check],
    ready: Callable[[], Check],
) -> OpsServer | None:
    """The listener of a service whose metrics port setting is not 0 (0: none)."""
    if not port:
        return None
    return OpsServer(host, port, telemetry, live=live, ready=ready)
