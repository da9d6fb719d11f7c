"""What every fake vendor shares: the record of received requests and forced failures.

* ``GET /_fake/requests`` lists what was received, ``DELETE /_fake/requests`` clears it;
* ``POST /_fake/fail-next`` with ``{"status": 500, "count": 1}`` makes the next ``count``
  vendor requests answer ``status`` without acting (for SDKs that cannot send the
  ``X-Fake-Status`` header, which does the same for one request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Most requests remembered for inspection; older ones are dropped.
RECORDED_REQUESTS_MAX = 10_000
# Most forced failures queued at once.
FORCED_FAILURES_MAX = 1_000


def json_response(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


@dataclass(slots=True)
class Recorder:
    requests: list[dict[str, object]] = field(default_factory=list)
    forced_statuses: list[int] = field(default_factory=list)

    def record(self, entry: dict[str, object]) -> None:
        self.requests.append(entry)
        del self.requests[:-RECORDED_REQUESTS_MAX]

    def forced_status(self, request: Request) -> int | None:
        """The status to fail this request with, if a test asked for one."""
        header = request.headers.get("x-fake-status", "")
        if header.isdigit():
            return int(header)
        return self.forced_statuses.pop(0) if self.forced_statuses else None

    def routes(self) -> list[Route]:
        async def list_requests(_: Request) -> Response:
            return json_response(200, {"requests": self.requests})

        async def clear_requests(_: Request) -> Response:
            self.requests.clear()
            return json_response(200, {"cleared": True})

        async def fail_next(request: Request) -> Response:
            spec = msgspec.json.decode(await request.body())
            status, count = int(spec["status"]), int(spec.get("count", 1))
            if not 100 <= status <= 599 or not 0 < count <= FORCED_FAILURES_MAX:
                return json_response(400, {"error": "status 100-599, count 1-1000"})
            self.forced_statuses.extend([status] * count)
            del self.forced_statuses[FORCED_FAILURES_MAX:]
            return json_response(200, {"queued": len(self.forced_statuses)})

        return [
            Route("/_fake/requests", list_requests, methods=["GET"]),
            Route("/_fake/requests", clear_requests, methods=["DELETE"]),
            Route("/_fake/fail-next", fail_next, methods=["POST"]),
        ]
