"""Control-plane API under ``/v1`` (admin token): vault keys, budgets and runs.

Request bodies are msgspec Structs decoded from JSON with exact decimals; answers are
the Structs of :mod:`spendgate_gateway._views` (integer ``*_micros`` plus decimal-string
``*_usd``). The plaintext vault key appears only in the answer to ``POST /v1/keys``.
Every route checks the admin token first, then its input, then turns into one ledger
command; a ledger refusal becomes an error response through :func:`failed_status`.
"""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal
from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError
from spendgate_common.events_v1 import BudgetScope, Window
from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    BudgetPage,
    BudgetState,
    CloseBudget,
    CreateBudget,
    Done,
    Failed,
    IssueKey,
    KeyCreated,
    KeyPage,
    KeyState,
    ListBudgets,
    ListKeys,
    QueryBudget,
    QueryKey,
    QueryRun,
    RevokeKey,
    RunSpend,
    UpdateBudget,
)
from spendgate_common.limits import (
    QUERY_CURSOR_CHARS_MAX,
    QUERY_PAGE_ITEMS_DEFAULT,
    QUERY_PAGE_ITEMS_MAX,
)
from spendgate_common.money import format_usd, parse_usd
from spendgate_common.vault_keys import is_valid_tenant, new_vault_key
from spendgate_gateway import _views as views
from spendgate_gateway._auth import check_admin_token
from spendgate_gateway._failures import failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body
from spendgate_gateway._settings import GatewaySettings

# Control-plane bodies are small; a tighter bound than the proxy's.
CONTROL_BODY_BYTES_MAX = 16_384
TTL_SECONDS_MAX = 3_650 * 86_400
# Listings in flight per gateway. The ledger client may coalesce concurrent commands for
# one partition into one request, whose reply carries all their results: with at most
# this many pages (each under QUERY_PAGE_BYTES_MAX) among them, the reply stays far below
# NATS's max_payload.
LISTINGS_INFLIGHT_MAX = 2

_Body = TypeVar("_Body", bound=msgspec.Struct)
_Result = TypeVar("_Result", bound=AnyResult)
_LIMIT_TEXT = re.compile(r"[0-9]{1,6}")


class IssueKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/keys``: exactly one of ``cap_usd`` (total window),
    ``daily_usd_cap`` or ``monthly_usd_cap``."""

    label: str
    cap_usd: Decimal | None = None
    daily_usd_cap: Decimal | None = None
    monthly_usd_cap: Decimal | None = None
    tenant: str = "default"
    timezone: str = "UTC"
    ttl_seconds: int | None = None
    # None: every vendor. Otherwise the only vendors the key may be used for.
    allowed_vendors: list[str] | None = None
    # Extra labels matched against fleet budgets' prefixes, besides ``label``.
    fleet_labels: list[str] = msgspec.field(default_factory=list)


class RevokeKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = ""


class CreateBudgetRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/budgets``. ``match``: a label prefix (fleet), a vendor name
    (vendor), or empty (tenant)."""

    budget_id: str
    scope: BudgetScope
    cap_usd: Decimal
    window: Window = "total"
    match: str = ""
    tenant: str = "default"
    timezone: str = "UTC"


class UpdateBudgetRequest(msgspec.Struct, forbid_unknown_fields=True):
    cap_usd: Decimal


REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (
    IssueKeyRequest,
    RevokeKeyRequest,
    CreateBudgetRequest,
    UpdateBudgetRequest,
)


async def decode_body(request: Request, body_type: type[_Body]) -> _Body:
    """The JSON body as ``body_type``: ``invalid_field`` for a wrong shape or an unknown
    field, ``malformed_json`` for text that is not JSON, ``body_too_large`` (413)."""
    body = await read_body(request, CONTROL_BODY_BYTES_MAX)
    try:
        return msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as error:
        # Before DecodeError: ValidationError is its subclass (well-formed, wrong shape).
        raise InvalidRequestError("invalid_field", str(error)) from None
    except msgspec.DecodeError as error:
        message = f"the JSON body is malformed: {error}"
        raise InvalidRequestError("malformed_json", message) from None


class ControlPlane:
    def __init__(self, settings: GatewaySettings, ledger: LedgerClient) -> None:
        self._settings = settings
        self._ledger = ledger
        self._listings = asyncio.Semaphore(LISTINGS_INFLIGHT_MAX)

    def check_admin(self, request: Request) -> None:
        """Refuse the request unless it carries ``Authorization: Bearer <admin token>``."""
        check_admin_token(request.headers, self._settings.admin_token)

    async def _execute(self, command: AnyCommand, expected: type[_Result]) -> _Result | Response:
        """Run one ledger command: its result, or the error response for a refusal."""
        result = await self._ledger.execute(command)
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        assert isinstance(result, expected), result
        return result

    async def _list(self, command: AnyCommand, expected: type[_Result]) -> _Result | Response:
        async with self._listings:
            return await self._execute(command, expected)

    # ---------------------------------------------------------------------------- keys

    async def issue_key(self, request: Request) -> Response:
        self.check_admin(request)
        spec = await decode_body(request, IssueKeyRequest)
        cap_micros, window = _key_cap_and_window(spec)
        tenant = _tenant(spec.tenant)
        ttl_seconds = (
            spec.ttl_seconds
            if spec.ttl_seconds is not None
            else int(self._settings.key_ttl_default.total_seconds())
        )
        if not 0 < ttl_seconds <= TTL_SECONDS_MAX:
            raise InvalidRequestError("invalid_ttl", f"ttl_seconds must be 1 to {TTL_SECONDS_MAX}")
        vault_key = new_vault_key(tenant)
        created = await self._execute(
            IssueKey(
                tenant=tenant,
                key_id=vault_key.key_id,
                label=spec.label,
                secret_sha256=vault_key.secret_sha256,
                cap_micros=cap_micros,
                window=window,
                timezone=spec.timezone,
                expires_at_ms=time.time_ns() // 1_000_000 + ttl_seconds * 1000,
                allowed_vendors=spec.allowed_vendors,
                fleet_labels=spec.fleet_labels,
            ),
            KeyCreated,
        )
        if isinstance(created, Response):
            return created
        issued = views.IssuedKey(
            key=str(vault_key),
            key_id=vault_key.key_id,
            label=spec.label,
            tenant=tenant,
            window=window,
            timezone=spec.timezone,
            cap_micros=cap_micros,
            cap_usd=format_usd(cap_micros),
            allowed_vendors=spec.allowed_vendors,
            fleet_labels=spec.fleet_labels,
            expires_at=views.iso(created.expires_at_ms),
        )
        return json_response(201, issued)

    async def list_keys(self, request: Request) -> Response:
        self.check_admin(request)
        label = request.query_params.get("label")
        label_prefix = request.query_params.get("label_prefix")
        if label is not None and label_prefix is not None:
            raise InvalidRequestError("invalid_label", "give at most one of label and label_prefix")
        command = ListKeys(
            tenant=_tenant_of(request),
            label=label,
            label_prefix=label_prefix,
            limit=_limit(request),
            cursor=_cursor(request),
        )
        page = await self._list(command, KeyPage)
        if isinstance(page, Response):
            return page
        keys = [views.key_view(key) for key in page.keys]
        return json_response(200, views.KeyList(keys=keys, next_cursor=page.next_cursor))

    async def get_key(self, request: Request) -> Response:
        self.check_admin(request)
        command = QueryKey(_tenant_of(request), request.path_params["key_id"])
        state = await self._execute(command, KeyState)
        return state if isinstance(state, Response) else json_response(200, views.key_view(state))

    async def revoke_key(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant_of(request)
        spec = await decode_body(request, RevokeKeyRequest)
        key_id = request.path_params["key_id"]
        done = await self._execute(RevokeKey(tenant, key_id, spec.reason), Done)
        if isinstance(done, Response):
            return done
        state = await self._execute(QueryKey(tenant, key_id), KeyState)
        return state if isinstance(state, Response) else json_response(200, views.key_view(state))

    # ------------------------------------------------------------------------- budgets

    async def create_budget(self, request: Request) -> Response:
        self.check_admin(request)
        spec = await decode_body(request, CreateBudgetRequest)
        command = CreateBudget(
            tenant=_tenant(spec.tenant),
            budget_id=spec.budget_id,
            scope=spec.scope,
            match=spec.match,
            cap_micros=parse_usd(spec.cap_usd, field="cap_usd"),
            window=spec.window,
            timezone=spec.timezone,
        )
        return _budget_response(201, await self._execute(command, BudgetState))

    async def list_budgets(self, request: Request) -> Response:
        self.check_admin(request)
        command = ListBudgets(
            tenant=_tenant_of(request),
            scope=request.query_params.get("scope", ""),
            include_closed=_flag(request, "include_closed"),
            limit=_limit(request),
            cursor=_cursor(request),
        )
        page = await self._list(command, BudgetPage)
        if isinstance(page, Response):
            return page
        budgets = [views.budget_view(budget) for budget in page.budgets]
        return json_response(200, views.BudgetList(budgets=budgets, next_cursor=page.next_cursor))

    async def get_budget(self, request: Request) -> Response:
        self.check_admin(request)
        command = QueryBudget(_tenant_of(request), request.path_params["budget_id"])
        return _budget_response(200, await self._execute(command, BudgetState))

    async def update_budget(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant_of(request)
        spec = await decode_body(request, UpdateBudgetRequest)
        cap_micros = parse_usd(spec.cap_usd, field="cap_usd")
        command = UpdateBudget(tenant, request.path_params["budget_id"], cap_micros)
        return _budget_response(200, await self._execute(command, BudgetState))

    async def close_budget(self, request: Request) -> Response:
        self.check_admin(request)
        command = CloseBudget(_tenant_of(request), request.path_params["budget_id"])
        return _budget_response(200, await self._execute(command, BudgetState))

    # ---------------------------------------------------------------------------- runs

    async def run_spend(self, request: Request) -> Response:
        self.check_admin(request)
        command = QueryRun(
            tenant=_tenant_of(request),
            label=request.path_params["label"],
            limit=_limit(request),
            cursor=_cursor(request),
        )
        spend = await self._list(command, RunSpend)
        if isinstance(spend, Response):
            return spend
        view = views.RunSpend(
            label=spend.label,
            tenant=spend.tenant,
            key_count=spend.key_count,
            keys=[views.key_view(key) for key in spend.keys],
            next_cursor=spend.next_cursor,
            **views.usage(
                spend.cap_micros,
                spend.committed_micros,
                spend.reserved_micros,
                spend.overrun_micros,
                # Summed per key: one key's overrun does not use up another key's room.
                remaining=spend.remaining_micros,
            ),
        )
        return json_response(200, view)


def _budget_response(status: int, state: BudgetState | Response) -> Response:
    return state if isinstance(state, Response) else json_response(status, views.budget_view(state))


def _tenant(tenant: str) -> str:
    if not is_valid_tenant(tenant):
        raise InvalidRequestError(
            "invalid_tenant",
            "tenant must be 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit",
        )
    return tenant


def _tenant_of(request: Request) -> str:
    return _tenant(request.query_params.get("tenant", "default"))


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return QUERY_PAGE_ITEMS_DEFAULT
    if not _LIMIT_TEXT.fullmatch(text) or not 0 < int(text) <= QUERY_PAGE_ITEMS_MAX:
        raise InvalidRequestError("invalid_limit", f"limit must be 1 to {QUERY_PAGE_ITEMS_MAX}")
    return int(text)


def _cursor(request: Request) -> str | None:
    """The ``cursor`` parameter; absent or empty: the first page."""
    cursor = request.query_params.get("cursor") or None
    if cursor is not None and len(cursor) > QUERY_CURSOR_CHARS_MAX:
        raise InvalidRequestError("invalid_cursor", "cursor is not a next_cursor of this listing")
    return cursor


def _flag(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false")
    if text not in ("true", "false"):
        raise InvalidRequestError("invalid_field", f"{name} must be true or false")
    return text == "true"


def _key_cap_and_window(spec: IssueKeyRequest) -> tuple[int, Window]:
    windows: tuple[tuple[Decimal | None, str, Window], ...] = (
        (spec.cap_usd, "cap_usd", "total"),
        (spec.daily_usd_cap, "daily_usd_cap", "daily"),
        (spec.monthly_usd_cap, "monthly_usd_cap", "monthly"),
    )
    given = [(value, field, window) for value, field, window in windows if value is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            "invalid_cap",
            "give exactly one of cap_usd (total), daily_usd_cap or monthly_usd_cap",
        )
    value, field, window = given[0]
    assert value is not None
    return parse_usd(value, field=field), window
