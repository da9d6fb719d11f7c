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
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from spendgate_gateway._proxy import Proxy
from spendgate_gateway.vendors import VENDORS

PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PROXY_ROUTE = "/{vendor}/{path:path}"


class ProxyFastPath:
    def __init__(self, app: ASGIApp, proxy: Callable[[], Proxy | None], route: BaseRoute) -> None:
        self.app = app
        self._proxy = proxy
        # The declared proxy route, set in the scope as the router would (span names).
        self._route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in PROXY_METHODS:
            vendor, slash, path = scope["path"][1:].partition("/")
            proxy = self._proxy()
            if slash and vendor in VENDORS and proxy is not None:
                scope["path_params"] = {"vendor": vendor, "path": path}
                scope["route"] = self._route
                response = await proxy.handle(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
