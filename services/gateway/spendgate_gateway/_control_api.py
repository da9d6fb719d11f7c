"""The control plane's routes under ``/v1``: keys, budgets, runs (admin token) and direct
reservations (vault key), with their OpenAPI declarations.

Every route takes the ``Request`` alone and hands it to :class:`ControlPlane` or
:class:`DirectReservations`, which check the credential before anything else and read
parameters and bodies themselves (so a bad one gets our error shape, not FastAPI's);
the parameters, bodies and answers are declared here from the same msgspec types.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, FastAPI
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.limits import (
    LABEL_CHARS_MAX,
    QUERY_CURSOR_CHARS_MAX,
    QUERY_PAGE_ITEMS_DEFAULT,
    QUERY_PAGE_ITEMS_MAX,
)
from spendgate_gateway import _control, _openapi, _reservations
from spendgate_gateway import _views as views
from spendgate_gateway._control import (
    ControlPlane,
    CreateBudgetRequest,
    IssueKeyRequest,
    RevokeKeyRequest,
    UpdateBudgetRequest,
)
from spendgate_gateway._openapi import TENANT, VAULT_KEY_SCHEME, Schemas, path, query
from spendgate_gateway._reservations import (
    CommitRequest,
    DirectReservations,
    ReleaseRequest,
    ReserveRequest,
)


class _LabelConvertor(PathConvertor):
    """A label in a path: any text, '/' and line breaks included, as labels are free text
    (``path`` stops at a line break, so such a run could not be asked for)."""

    regex = "(?s:.*)"


register_url_convertor("label", _LabelConvertor())

SCHEMAS = Schemas((*_control.REQUEST_BODIES, *_reservations.REQUEST_BODIES, *views.RESPONSE_BODIES))
_operation = SCHEMAS.operation

_LIMIT = query(
    "limit",
    {
        "type": "integer",
        "minimum": 1,
        "maximum": QUERY_PAGE_ITEMS_MAX,
        "default": QUERY_PAGE_ITEMS_DEFAULT,
    },
    "Most items in the page (a page may hold fewer while more follow).",
)
_CURSOR = query(
    "cursor",
    {"type": "string", "maxLength": QUERY_CURSOR_CHARS_MAX},
    "The previous page's next_cursor; absent: the first page.",
)
_LABEL_TEXT = {"type": "string", "minLength": 1, "maxLength": LABEL_CHARS_MAX}
_KEY_ID = path("key_id", "The key id (the part of the vault key after the tenant).")
_BUDGET_ID = path("budget_id", "The budget id, unique in its tenant.")
_RESERVATION_ID = path("reservation_id", "The reservation id POST /v1/reservations answered.")
_NOT_FOUND_KEY = {404: "No such key in this tenant (`key_not_found`)."}
_NOT_FOUND_BUDGET = {404: "No such budget in this tenant (`budget_not_found`)."}
_SETTLE_ERRORS = {
    404: "No such open reservation of this key (`reservation_not_found`).",
    409: "Settled before (`already_settled`).",
}


def control_router(holder: Mapping[str, object]) -> APIRouter:
    """The routes; ``holder`` has ``control`` and ``reservations`` once the app started."""
    router = APIRouter(prefix="/v1")

    def control() -> ControlPlane:
        plane = holder.get("control")
        assert isinstance(plane, ControlPlane), "lifespan has not started"
        return plane

    def reservations() -> DirectReservations:
        direct = holder.get("reservations")
        assert isinstance(direct, DirectReservations), "lifespan has not started"
        return direct

    # ---------------------------------------------------------------------------- keys

    @router.post(
        "/keys",
        tags=["keys"],
        status_code=201,
        openapi_extra=_operation(
            body=IssueKeyRequest,
            example={"label": "fleet-a/run-42", "cap_usd": "5.00", "allowed_vendors": ["openai"]},
            answers={201: (views.IssuedKey, "The key; its plaintext is shown only here.")},
        ),
    )
    async def issue_key(request: Request) -> Response:
        """Issue a vault key with a cap. The plaintext key is returned only here."""
        return await control().issue_key(request)

    @router.get(
        "/keys",
        tags=["keys"],
        openapi_extra=_operation(
            parameters=[
                TENANT,
                query("label", _LABEL_TEXT, "Only keys with exactly this label."),
                query(
                    "label_prefix",
                    _LABEL_TEXT,
                    "Only keys whose label starts with this (not with `label`).",
                    example="fleet-a/",
                ),
                _LIMIT,
                _CURSOR,
            ],
            answers={200: (views.KeyList, "A page of keys in (label, key id) order.")},
        ),
    )
    async def list_keys(request: Request) -> Response:
        """The tenant's keys, revoked and expired ones too, page by page."""
        return await control().list_keys(request)

    @router.get(
        "/keys/{key_id}",
        tags=["keys"],
        openapi_extra=_operation(
            parameters=[_KEY_ID, TENANT],
            answers={200: (views.KeyView, "The key and its use.")},
            errors=_NOT_FOUND_KEY,
        ),
    )
    async def get_key(request: Request) -> Response:
        """A key's cap, committed, reserved, overrun and remaining in its current window."""
        return await control().get_key(request)

    @router.post(
        "/keys/{key_id}/revoke",
        tags=["keys"],
        openapi_extra=_operation(
            body=RevokeKeyRequest,
            example={"reason": "leaked"},
            parameters=[_KEY_ID, TENANT],
            answers={200: (views.KeyView, "The revoked key.")},
            errors={**_NOT_FOUND_KEY, 409: "Revoked before (`already_revoked`)."},
        ),
    )
    async def revoke_key(request: Request) -> Response:
        """Revoke a key: refused from now on; its open reservations can still settle."""
        return await control().revoke_key(request)

    # ------------------------------------------------------------------------- budgets

    @router.post(
        "/budgets",
        tags=["budgets"],
        status_code=201,
        openapi_extra=_operation(
            body=CreateBudgetRequest,
            example={
                "budget_id": "fleet-a-daily",
                "scope": "fleet",
                "match": "fleet-a/",
                "cap_usd": "50.00",
                "window": "daily",
                "timezone": "Europe/Berlin",
            },
            answers={201: (views.BudgetView, "The new budget.")},
            errors={409: "The id is taken, or the tenant has too many open budgets."},
        ),
    )
    async def create_budget(request: Request) -> Response:
        """Create a fleet, vendor or tenant budget with its own cap and window."""
        return await control().create_budget(request)

    @router.get(
        "/budgets",
        tags=["budgets"],
        openapi_extra=_operation(
            parameters=[
                TENANT,
                query(
                    "scope",
                    {"type": "string", "enum": ["fleet", "vendor", "tenant"]},
                    "Only budgets of this scope.",
                ),
                query(
                    "include_closed",
                    {"type": "string", "enum": ["true", "false"], "default": "false"},
                    "Closed budgets too.",
                ),
                _LIMIT,
                _CURSOR,
            ],
            answers={200: (views.BudgetList, "A page of budgets in id order.")},
        ),
    )
    async def list_budgets(request: Request) -> Response:
        """The tenant's budgets with their use, page by page."""
        return await control().list_budgets(request)

    budget_errors = {**_NOT_FOUND_BUDGET, 409: "The budget is closed (`budget_closed`)."}

    @router.get(
        "/budgets/{budget_id}",
        tags=["budgets"],
        openapi_extra=_operation(
            parameters=[_BUDGET_ID, TENANT],
            answers={200: (views.BudgetView, "The budget and its use.")},
            errors=_NOT_FOUND_BUDGET,
        ),
    )
    async def get_budget(request: Request) -> Response:
        """A budget's cap, committed, reserved, overrun and remaining in its current window."""
        return await control().get_budget(request)

    @router.patch(
        "/budgets/{budget_id}",
        tags=["budgets"],
        openapi_extra=_operation(
            body=UpdateBudgetRequest,
            example={"cap_usd": "60.00"},
            parameters=[_BUDGET_ID, TENANT],
            answers={200: (views.BudgetView, "The budget with its new cap.")},
            errors=budget_errors,
        ),
    )
    async def update_budget(request: Request) -> Response:
        """Change a budget's cap (a lower cap denies further reserves; holds stay)."""
        return await control().update_budget(request)

    @router.delete(
        "/budgets/{budget_id}",
        tags=["budgets"],
        openapi_extra=_operation(
            parameters=[_BUDGET_ID, TENANT],
            answers={200: (views.BudgetView, "The closed budget.")},
            errors=budget_errors,
        ),
    )
    async def close_budget(request: Request) -> Response:
        """Close a budget: it stops applying; its open holds still settle into it."""
        return await control().close_budget(request)

    # ---------------------------------------------------------------------------- runs

    @router.get(
        "/runs/{label:label}/spend",
        tags=["runs"],
        openapi_extra=_operation(
            parameters=[
                path("label", "The run's label, percent-encoded ('/' as %2F)."),
                TENANT,
                _LIMIT,
                _CURSOR,
            ],
            answers={200: (views.RunSpend, "The run's totals and a page of its keys.")},
            errors={
                404: "No key of this tenant has this label (`run_not_found`).",
                422: "More keys have this label than a run may have (`run_too_large`).",
            },
        ),
    )
    async def run_spend(request: Request) -> Response:
        """What a run (the keys with exactly this label) committed, holds and has left."""
        return await control().run_spend(request)

    # -------------------------------------------------------------------- reservations

    @router.post(
        "/reservations",
        tags=["reservations"],
        status_code=201,
        openapi_extra=_operation(
            security=VAULT_KEY_SCHEME,
            body=ReserveRequest,
            example={
                "amount_usd": "0.40",
                "vendor": "openai",
                "operation": "chat gpt-4o",
                "hold_seconds": 120,
            },
            parameters=[
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "The same key and request get the original decision.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            ],
            answers={
                201: (views.Reservation, "Granted: the hold is placed."),
                200: (views.Reservation, "A replay of an earlier grant (Idempotent-Replayed)."),
            },
            errors={
                403: (
                    "The key may not be used for this vendor (`vendor_not_allowed`), or a "
                    "contract refused (`contract_stop`, `approval_rejected`, `approval_expired`)."
                ),
                409: (
                    "The idempotency key was used with another request (`idempotency_conflict`), "
                    "a contract waits for an approval (`approval_required`, `approval_id`), or "
                    "asks for a cheaper call (`degrade_required`, `model`, `remaining_micros`)."
                ),
                429: "Refused: the amount does not fit a cap (`cap_exhausted`).",
            },
        ),
    )
    async def reserve(request: Request) -> Response:
        """Reserve an amount before a call the caller makes itself (an SDK)."""
        return await reservations().reserve(request)

    @router.post(
        "/reservations/{reservation_id}/commit",
        tags=["reservations"],
        openapi_extra=_operation(
            security=VAULT_KEY_SCHEME,
            body=CommitRequest,
            example={"actual_micros": 251_234},
            parameters=[_RESERVATION_ID],
            answers={200: (views.Settlement, "Committed at the actual cost.")},
            errors=_SETTLE_ERRORS,
        ),
    )
    async def commit(request: Request) -> Response:
        """Settle a reservation as spent at its actual cost."""
        return await reservations().commit(request)

    @router.post(
        "/reservations/{reservation_id}/release",
        tags=["reservations"],
        openapi_extra=_operation(
            security=VAULT_KEY_SCHEME,
            body=ReleaseRequest,
            example={"reason": "the call failed before it was sent"},
            parameters=[_RESERVATION_ID],
            answers={200: (views.Settlement, "Released: the hold is returned.")},
            errors=_SETTLE_ERRORS,
        ),
    )
    async def release(request: Request) -> Response:
        """Settle a reservation as certainly free (the call cost nothing)."""
        return await reservations().release(request)

    return router


def install(app: FastAPI, holder: Mapping[str, object]) -> None:
    """Add the control plane's routes, and its schemas to the OpenAPI document."""
    app.include_router(control_router(holder))
    _openapi.install(app, SCHEMAS)
