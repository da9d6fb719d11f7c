"""The gateway's ASGI application: wiring of settings, NATS, upstream clients and routes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common import nats_adapter
from spendgate_common.errors import SpendgateError
from spendgate_gateway._audit_api import audit_router
from spendgate_gateway._control import (
    ControlPlane,
    CreateBudgetRequest,
    IssueKeyRequest,
    RevokeKeyRequest,
    UpdateBudgetRequest,
)
from spendgate_gateway._failures import exception_status_code_message
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._proxy import Proxy
from spendgate_gateway._responses import error_response, json_response
from spendgate_gateway._settings import GatewaySettings

_log = logging.getLogger(__name__)

NATS_CONNECT_DEADLINE = timedelta(seconds=30)
PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def _upstream_client(settings: GatewaySettings, base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(
            connect=settings.upstream_connect_timeout.total_seconds(),
            read=settings.upstream_read_timeout.total_seconds(),
            write=settings.upstream_read_timeout.total_seconds(),
            pool=settings.upstream_connect_timeout.total_seconds(),
        ),
        limits=httpx.Limits(
            max_connections=settings.upstream_connections_max,
            max_keepalive_connections=settings.upstream_connections_max,
        ),
        # Redirects from a payment API are not ours to follow with the real key.
        follow_redirects=False,
        trust_env=False,
    )


REQUEST_BODIES = (IssueKeyRequest, RevokeKeyRequest, CreateBudgetRequest, UpdateBudgetRequest)
_REF_TEMPLATE = "#/components/schemas/{name}"
_BODY_SCHEMAS, _BODY_COMPONENTS = msgspec.json.schema_components(
    REQUEST_BODIES, ref_template=_REF_TEMPLATE
)


def body(body_type: type[msgspec.Struct]) -> dict[str, object]:
    """OpenAPI ``requestBody`` of a msgspec request type (the schema lives in components)."""
    schema = _BODY_SCHEMAS[REQUEST_BODIES.index(body_type)]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_body_components(app: FastAPI) -> None:
    """Merge the msgspec request schemas into the generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(_BODY_COMPONENTS)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app. NATS and upstream clients are opened in its lifespan."""
    holder: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
        )
        clients = {
            name: _upstream_client(settings, vendor.base_url)
            for name, vendor in settings.vendors.items()
        }
        proxy = Proxy(settings, ledger, clients)
        holder.update(nats=nats, proxy=proxy, control=ControlPlane(settings, ledger))
        _log.info("gateway serving on %s:%d", settings.host, settings.port)
        try:
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
    )

    @app.exception_handler(SpendgateError)
    async def on_spendgate_error(_: Request, error: SpendgateError) -> Response:
        status, code, message = exception_status_code_message(error)
        return error_response(status, code, message)

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

    def control() -> ControlPlane:
        plane = holder.get("control")
        assert isinstance(plane, ControlPlane), "lifespan has not started"
        return plane

    @app.post("/v1/keys", tags=["keys"], status_code=201, openapi_extra=body(IssueKeyRequest))
    async def issue_key(request: Request) -> Response:
        """Issue a vault key with a cap. The plaintext key is returned only here."""
        return await control().issue_key(request)

    @app.get("/v1/keys/{key_id}", tags=["keys"])
    async def get_key(request: Request, key_id: str, tenant: str = "default") -> Response:
        """A key's cap, committed, reserved, overrun and remaining in its current window."""
        return await control().get_key(request)

    @app.post("/v1/keys/{key_id}/revoke", tags=["keys"], openapi_extra=body(RevokeKeyRequest))
    async def revoke_key(request: Request, key_id: str, tenant: str = "default") -> Response:
        """Revoke a key: refused from now on; its open reservations can still settle."""
        return await control().revoke_key(request)

    @app.post(
        "/v1/budgets", tags=["budgets"], status_code=201, openapi_extra=body(CreateBudgetRequest)
    )
    async def create_budget(request: Request) -> Response:
        """Create a fleet, vendor or tenant budget with its own cap and window."""
        return await control().create_budget(request)

    @app.get("/v1/budgets/{budget_id}", tags=["budgets"])
    async def get_budget(request: Request, budget_id: str, tenant: str = "default") -> Response:
        """A budget's cap, committed, reserved, overrun and remaining in its current window."""
        return await control().get_budget(request)

    @app.patch("/v1/budgets/{budget_id}", tags=["budgets"], openapi_extra=body(UpdateBudgetRequest))
    async def update_budget(request: Request, budget_id: str, tenant: str = "default") -> Response:
        """Change a budget's cap (a lower cap denies further reserves; holds stay)."""
        return await control().update_budget(request)

    @app.delete("/v1/budgets/{budget_id}", tags=["budgets"])
    async def close_budget(request: Request, budget_id: str, tenant: str = "default") -> Response:
        """Close a budget: it stops applying; its open holds still settle into it."""
        return await control().close_budget(request)

    app.include_router(audit_router(settings, holder))

    @app.api_route("/{vendor}/{path:path}", methods=PROXY_METHODS, tags=["proxy"])
    async def proxy_call(request: Request, vendor: str, path: str) -> Response:
        """Proxy a vendor call: estimate, reserve, forward only after a grant, settle."""
        proxy = holder["proxy"]
        assert isinstance(proxy, Proxy)
        return await proxy.handle(request)

    _with_body_components(app)
    return app
