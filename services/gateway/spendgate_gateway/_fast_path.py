"""Proxy calls skip FastAPI's router and request handling (the hot path's fixed cost).

FastAPI matches a request against every route and runs its endpoint machinery (exit-stack
middleware, exception middleware, dependency solving) before the proxy sees it; on the
proxy path that was about a fifth of the gateway's CPU per call (py-spy, bench/gateway).
This middleware sends ``/<known vendor>/<path>`` straight to :meth:`Proxy.handle` with
the same path parameters the declared route would give, and everything else on to
FastAPI. The route stays declared, so the OpenAPI document still describes it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from spendgate_gateway._proxy import Proxy
from spendgate_gateway._responses import error_response
from spendgate_gateway.vendors import VENDORS

PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PROXY_ROUTE = "/{vendor}/{path:path}"


class ProxyFastPath:
    """Also sheds load: beyond ``inflight_max`` proxy calls in progress, a call is
    answered 503 ``overloaded`` at once (nothing reserved, nothing forwarded) instead of
    joining a queue that only grows once the process is saturated."""

    def __init__(
        self,
        app: ASGIApp,
        proxy: Callable[[], Proxy | None],
        route: BaseRoute,
        inflight_max: int,
    ) -> None:
        self.app = app
        self._proxy = proxy
        # The declared proxy route, set in the scope as the router would (span names).
        self._route = route
        self._inflight_max = inflight_max
        self._inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in PROXY_METHODS:
            vendor, slash, path = scope["path"][1:].partition("/")
            proxy = self._proxy()
            if slash and vendor in VENDORS and proxy is not None:
                scope["path_params"] = {"vendor": vendor, "path": path}
                scope["route"] = self._route
                if self._inflight >= self._inflight_max:
                    await _overloaded(self._inflight_max)(scope, receive, send)
                    return
                self._inflight += 1
                try:
                    response = await proxy.handle(Request(scope, receive))
                    await response(scope, receive, send)
                finally:
                    self._inflight -= 1
                return
        await self.app(scope, receive, send)


def _overloaded(inflight_max: int) -> Response:
    message = (
        f"the gateway has {inflight_max} calls in progress; nothing was reserved or "
        "forwarded, retry shortly"
    )
    return error_response(503, "overloaded", message, headers={"retry-after": "1"})
