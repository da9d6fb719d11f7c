"""The gateway's ASGI application: wiring of settings, NATS, upstream clients and routes."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import httpx
import sniffio
from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common import nats_adapter
from spendgate_common.errors import SpendgateError
from spendgate_common.telemetry import Telemetry
from spendgate_gateway import _control_api
from spendgate_gateway._audit_api import audit_router
from spendgate_gateway._contracts_api import ContractsApi, contracts_router
from spendgate_gateway._control import ControlPlane
from spendgate_gateway._failures import exception_status_code_message
from spendgate_gateway._fast_path import PROXY_METHODS, PROXY_ROUTE, ProxyFastPath
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._proxy import Proxy
from spendgate_gateway._reservations import DirectReservations
from spendgate_gateway._responses import error_response, json_response
from spendgate_gateway._settings import GatewaySettings
from spendgate_gateway._telemetry import GatewayTelemetry, ServerSpans
from spendgate_gateway._upstream_client import UpstreamClient
from spendgate_gateway._upstream_transport import UpstreamTransport

_log = logging.getLogger(__name__)

NATS_CONNECT_DEADLINE = timedelta(seconds=30)


def _upstream_client(
    settings: GatewaySettings, vendor: str, base_url: str, telemetry: GatewayTelemetry
) -> UpstreamClient:
    limits = httpx.Limits(
        # Requests in flight (and so connections open); more wait in order for the pool
        # timeout.
        max_connections=settings.upstream_connections_max,
        max_keepalive_connections=min(
            settings.upstream_connections_max, settings.upstream_keepalive_max
        ),
    )
    return UpstreamClient(
        base_url,
        transport=UpstreamTransport(
            base_url,
            limits=limits,
            # Timed and traced per vendor when telemetry is on.
            observer=telemetry.upstream_observer(vendor),
        ),
        timeout=httpx.Timeout(
            connect=settings.upstream_connect_timeout.total_seconds(),
            read=settings.upstream_read_timeout.total_seconds(),
            write=settings.upstream_read_timeout.total_seconds(),
            pool=settings.upstream_connect_timeout.total_seconds(),
        ),
    )


@contextlib.contextmanager
def sniffio_knows_asyncio() -> Iterator[None]:
    """Tell sniffio, for this thread, that asyncio runs here.

    anyio asks sniffio which async library runs each time it builds a cancel scope, an
    event or a task group: Starlette's streaming responses (every relayed event stream)
    and FastAPI's routing do. Unless told, sniffio finds out by calling
    ``asyncio.current_task()`` each time (with httpcore under the upstream clients, about
    a tenth of the gateway's CPU per proxied call). The gateway's thread runs nothing but
    its asyncio loop.
    """
    previous = sniffio.thread_local.name
    sniffio.thread_local.name = "asyncio"
    try:
        yield
    finally:
        sniffio.thread_local.name = previous


@contextlib.contextmanager
def _startup_objects_frozen() -> Iterator[None]:
    """Keep the objects alive after start-up out of the garbage collector's way.

    Modules, the app, its routes, the clients: about 90,000 objects that live as long as
    the process. Every full collection walks all of them, stopping the loop (and every
    call in flight) for 41 ms under load on the benchmark machine; frozen, a full
    collection walks only what came later (0.2 ms). What was garbage at start-up is
    collected first, so nothing frozen is garbage already.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def create_app(settings: GatewaySettings, telemetry: Telemetry | None = None) -> FastAPI:
    """The gateway app. NATS and upstream clients are opened in its lifespan."""
    holder: dict[str, object] = {}
    observed = GatewayTelemetry(telemetry or Telemetry.disabled())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with sniffio_knows_asyncio():
            async with _serving() as ready:
                yield ready

    @contextlib.asynccontextmanager
    async def _serving() -> AsyncIterator[None]:
        nats = await nats_adapter.connect(
            settings.common.nats_url,
            name="spendgate-gateway",
            connect_deadline=NATS_CONNECT_DEADLINE,
        )
        ledger = LedgerClient(
            nats,
            partition_count=settings.common.partition_count,
            timeout=settings.ledger_timeout,
            inflight_max=settings.ledger_inflight_per_partition_max,
            linger=settings.settle_linger,
            observer=observed.ledger_observer(),
        )
        clients = {
            name: _upstream_client(settings, name, vendor.base_url, observed)
            for name, vendor in settings.vendors.items()
        }
        proxy = Proxy(settings, ledger, clients)
        control = ControlPlane(settings, ledger)
        holder.update(
            nats=nats,
            proxy=proxy,
            control=control,
            contracts=ContractsApi(control, ledger),
            reservations=DirectReservations(ledger),
        )
        _log.info("gateway serving on %s:%d", settings.host, settings.port)
        try:
            with _startup_objects_frozen():
                yield
        finally:
            await proxy.wait_settled(settings.shutdown_deadline / 2)
            await ledger.close()
            for client in clients.values():
                await client.aclose()
            with contextlib.suppress(Exception):
                await nats.drain()

    app = FastAPI(
        title="Spendgate gateway",
        version="0.1.0",
        description="Budget enforcement proxy and control plane. See docs/api.md.",
        lifespan=lifespan,
        # The gateway's spans and metrics are its own (_telemetry.py: chosen attributes,
        # never request data). FastAPI's would record paths once a global OpenTelemetry
        # provider is set, and even off it asks three providers on every request (2-3 %
        # of the gateway's CPU per proxied call: bench/gateway, py-spy).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )

    @app.exception_handler(SpendgateError)
    async def on_spendgate_error(_: Request, error: SpendgateError) -> Response:
        status, code, message = exception_status_code_message(error)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, error: StarletteHTTPException) -> Response:
        """The router's own refusals (no such route, method) in our error shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), headers=error.headers)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        """Liveness: the process serves HTTP."""
        return json_response(200, {"status": "ok"})

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        """Readiness: connected to NATS (so the ledger can be asked)."""
        nats = holder.get("nats")
        connected = bool(nats is not None and getattr(nats, "is_connected", False))
        return json_response(200 if connected else 503, {"ready": connected})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus metrics of this gateway (docs/operations.md)."""
        return await observed.metrics_response()

    _control_api.install(app, holder)
    app.include_router(audit_router(settings, holder))
    app.include_router(contracts_router(holder))

    @app.api_route(PROXY_ROUTE, methods=list(PROXY_METHODS), tags=["proxy"])
    async def proxy_call(request: Request, vendor: str, path: str) -> Response:
        """Proxy a vendor call: estimate, reserve, forward only after a grant, settle."""
        proxy = holder["proxy"]
        assert isinstance(proxy, Proxy)
        return await proxy.handle(request)

    def running_proxy() -> Proxy | None:
        proxy = holder.get("proxy")
        return proxy if isinstance(proxy, Proxy) else None

    proxy_route = next(r for r in app.routes if getattr(r, "path", "") == PROXY_ROUTE)
    app.add_middleware(
        ProxyFastPath,
        proxy=running_proxy,
        route=proxy_route,
        inflight_max=settings.proxy_inflight_max,
    )
    if observed.tracer is not None:
        # Added last, so it is outside the fast path: proxy calls get their server span.
        app.add_middleware(ServerSpans, tracer=observed.tracer)
    return app
