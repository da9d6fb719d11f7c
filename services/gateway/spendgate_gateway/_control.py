"""Control-plane API under ``/v1`` (admin token): vault keys and budgets.

Request bodies are msgspec Structs decoded from JSON with exact decimals; amounts go out
as integer ``*_micros`` plus decimal-string ``*_usd``. The plaintext vault key appears
only in the response to ``POST /v1/keys``. Every route turns into one ledger command; a
ledger refusal becomes an error response through :func:`failed_status`.
"""

from __future__ import annotations

import hmac
import time
from datetime import UTC, datetime
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
    BudgetState,
    CloseBudget,
    CreateBudget,
    Done,
    Failed,
    IssueKey,
    KeyCreated,
    KeyState,
    QueryBudget,
    QueryKey,
    RevokeKey,
    UpdateBudget,
)
from spendgate_common.money import format_usd, parse_usd
from spendgate_common.vault_keys import is_valid_tenant, new_vault_key
from spendgate_gateway._failures import failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body
from spendgate_gateway._settings import GatewaySettings

# Control-plane bodies are small; a tighter bound than the proxy's.
CONTROL_BODY_BYTES_MAX = 16_384
TTL_SECONDS_MAX = 3_650 * 86_400

_Body = TypeVar("_Body", bound=msgspec.Struct)
_Result = TypeVar("_Result", bound=AnyResult)


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


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _usage(cap: int, committed: int, reserved: int, overrun: int) -> dict[str, object]:
    remaining = max(0, cap - committed - reserved)
    return {
        "cap_micros": cap,
        "committed_micros": committed,
        "reserved_micros": reserved,
        "remaining_micros": remaining,
        "overrun_micros": overrun,
        "cap_usd": format_usd(cap),
        "committed_usd": format_usd(committed),
        "reserved_usd": format_usd(reserved),
        "remaining_usd": format_usd(remaining),
        "overrun_usd": format_usd(overrun),
    }


def budget_body(state: BudgetState) -> dict[str, object]:
    return {
        "budget_id": state.budget_id,
        "tenant": state.tenant,
        "scope": state.scope,
        "match": state.match,
        "window": state.window,
        "timezone": state.timezone,
        "window_start_at": _iso(state.window_start_at_ms),
        "closed": state.closed,
        **_usage(
            state.cap_micros, state.committed_micros, state.reserved_micros, state.overrun_micros
        ),
    }


def key_body(state: KeyState) -> dict[str, object]:
    return {
        "key_id": state.key_id,
        "label": state.label,
        "tenant": state.tenant,
        "window": state.window,
        "timezone": state.timezone,
        "window_start_at": _iso(state.window_start_at_ms),
        "expires_at": _iso(state.expires_at_ms),
        "revoked": state.revoked,
        "allowed_vendors": state.allowed_vendors,
        "fleet_labels": state.fleet_labels,
        "budget_ids": state.budget_ids,
        **_usage(
            state.cap_micros, state.committed_micros, state.reserved_micros, state.overrun_micros
        ),
    }


class ControlPlane:
    def __init__(self, settings: GatewaySettings, ledger: LedgerClient) -> None:
        self._settings = settings
        self._ledger = ledger

    def check_admin(self, request: Request) -> None:
        """Refuse the request unless it carries ``Authorization: Bearer <admin token>``."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expected = self._settings.admin_token.encode("utf-8")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8"), expected
        ):
            raise InvalidRequestError(
                "invalid_admin_token",
                "this endpoint needs 'Authorization: Bearer <admin token>'",
                status=401,
            )

    async def _body(self, request: Request, body_type: type[_Body]) -> _Body:
        body = await read_body(request, CONTROL_BODY_BYTES_MAX)
        try:
            return msgspec.json.decode(body, type=body_type)
        except msgspec.ValidationError as error:
            # Before DecodeError: ValidationError is its subclass (well-formed, wrong shape).
            raise InvalidRequestError("invalid_field", str(error)) from None
        except msgspec.DecodeError as error:
            message = f"the JSON body is malformed: {error}"
            raise InvalidRequestError("malformed_json", message) from None

    async def _execute(self, command: AnyCommand, expected: type[_Result]) -> _Result | Response:
        """Run one ledger command: its result, or the error response for a refusal."""
        result = await self._ledger.execute(command)
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        assert isinstance(result, expected), result
        return result

    # ---------------------------------------------------------------------------- keys

    async def issue_key(self, request: Request) -> Response:
        self.check_admin(request)
        spec = await self._body(request, IssueKeyRequest)
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
        return json_response(
            201,
            {
                "key": str(vault_key),
                "key_id": vault_key.key_id,
                "label": spec.label,
                "tenant": tenant,
                "window": window,
                "timezone": spec.timezone,
                "cap_micros": cap_micros,
                "cap_usd": format_usd(cap_micros),
                "allowed_vendors": spec.allowed_vendors,
                "fleet_labels": spec.fleet_labels,
                "expires_at": _iso(created.expires_at_ms),
            },
        )

    async def get_key(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant(request.query_params.get("tenant", "default"))
        state = await self._execute(QueryKey(tenant, request.path_params["key_id"]), KeyState)
        return state if isinstance(state, Response) else json_response(200, key_body(state))

    async def revoke_key(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant(request.query_params.get("tenant", "default"))
        spec = await self._body(request, RevokeKeyRequest)
        key_id = request.path_params["key_id"]
        done = await self._execute(RevokeKey(tenant, key_id, spec.reason), Done)
        if isinstance(done, Response):
            return done
        state = await self._execute(QueryKey(tenant, key_id), KeyState)
        return state if isinstance(state, Response) else json_response(200, key_body(state))

    # ------------------------------------------------------------------------- budgets

    async def create_budget(self, request: Request) -> Response:
        self.check_admin(request)
        spec = await self._body(request, CreateBudgetRequest)
        command = CreateBudget(
            tenant=_tenant(spec.tenant),
            budget_id=spec.budget_id,
            scope=spec.scope,
            match=spec.match,
            cap_micros=parse_usd(spec.cap_usd, field="cap_usd"),
            window=spec.window,
            timezone=spec.timezone,
        )
        state = await self._execute(command, BudgetState)
        return state if isinstance(state, Response) else json_response(201, budget_body(state))

    async def get_budget(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant(request.query_params.get("tenant", "default"))
        command = QueryBudget(tenant, request.path_params["budget_id"])
        state = await self._execute(command, BudgetState)
        return state if isinstance(state, Response) else json_response(200, budget_body(state))

    async def update_budget(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant(request.query_params.get("tenant", "default"))
        spec = await self._body(request, UpdateBudgetRequest)
        cap_micros = parse_usd(spec.cap_usd, field="cap_usd")
        command = UpdateBudget(tenant, request.path_params["budget_id"], cap_micros)
        state = await self._execute(command, BudgetState)
        return state if isinstance(state, Response) else json_response(200, budget_body(state))

    async def close_budget(self, request: Request) -> Response:
        self.check_admin(request)
        tenant = _tenant(request.query_params.get("tenant", "default"))
        command = CloseBudget(tenant, request.path_params["budget_id"])
        state = await self._execute(command, BudgetState)
        return state if isinstance(state, Response) else json_response(200, budget_body(state))


def _tenant(tenant: str) -> str:
    if not is_valid_tenant(tenant):
        raise InvalidRequestError(
            "invalid_tenant",
            "tenant must be 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit",
        )
    return tenant


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
