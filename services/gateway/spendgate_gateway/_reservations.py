"""Direct reservations (``/v1/reservations``) for code that is not a proxied HTTP call:
an SDK reserves an amount it priced itself, makes its call, then commits or releases.

Authenticated with the vault key (``Authorization: Bearer sgk_...``), never the admin
token: the key's tenant routes the command and the ledger checks the secret's hash,
revocation, expiry and allow-list exactly as for a proxied call, and applies every cap
that applies (key, fleet, vendor, tenant). Each route is one ledger command: ``Reserve``,
``Commit`` or ``Release``. Order of checks: the key's shape, the body, then the ledger.

Contracts (docs/contracts.md) answer as on the proxy (_contract_decisions.py): 409
``approval_required`` with the approval id (retry with the same idempotency key once
approved), 403 for a contract's denial. A ``degrade`` rule cannot rewrite a call the
gateway does not see, so the direct API answers 409 ``degrade_required`` with the rule's
``model`` and ``remaining_micros``: the caller switches model itself and reserves again
with ``model`` and ``degraded_by`` set to the rule's ``contract`` (then not applied twice).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError
from spendgate_common.ledger_v1 import (
    ApprovalPending,
    Commit,
    Degrade,
    Denied,
    Failed,
    Granted,
    Release,
    Reserve,
    Settled,
)
from spendgate_common.limits import (
    AMOUNT_MICROS_MAX,
    HOLD_MS_MAX,
    IDEMPOTENCY_KEY_CHARS_MAX,
    OPERATION_CHARS_MAX,
    PRICING_VERSION_CHARS_MAX,
)
from spendgate_common.money import format_usd, parse_usd
from spendgate_common.vault_keys import VaultKey, parse_vault_key
from spendgate_gateway import _views as views
from spendgate_gateway._auth import bearer_token
from spendgate_gateway._contract_decisions import denial_status
from spendgate_gateway._control import decode_body
from spendgate_gateway._failures import failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response

IDEMPOTENCY_HEADER = "idempotency-key"
# Longest reservation id taken from a path (ledger ids are ``rsv_<partition>_<seq>``);
# a longer one names no reservation and is not sent to the ledger.
RESERVATION_ID_CHARS_MAX = 64


class ReserveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/reservations``: exactly one of ``amount_micros`` (an integer of
    micro-USD) and ``amount_usd`` (a decimal string or number, at most six decimals)."""

    vendor: str
    operation: str
    amount_micros: int | None = None
    amount_usd: Decimal | None = None
    # Also accepted as the Idempotency-Key header (both: they must be equal).
    idempotency_key: str | None = None
    # How long the hold lasts before it expires (settled as spent); default: the
    # ledger's SPENDGATE_HOLD_DEFAULT_SECONDS.
    hold_seconds: int | None = None
    # The version of the price data the amount was computed with, recorded with it.
    pricing_version: str = ""
    # The LLM model the call asks for, seen by contracts (``request.model``).
    model: str = ""
    # The degrade rule the caller already applied after a 409 ``degrade_required``.
    degraded_by: str = ""


class CommitRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/reservations/{id}/commit``: exactly one of ``actual_micros`` and
    ``actual_usd``, the real cost (zero allowed; above the hold is an overrun)."""

    actual_micros: int | None = None
    actual_usd: Decimal | None = None


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/reservations/{id}/release``: the call certainly cost nothing."""

    reason: str = ""


REQUEST_BODIES: tuple[type[msgspec.Struct], ...] = (ReserveRequest, CommitRequest, ReleaseRequest)


class DirectReservations:
    def __init__(self, ledger: LedgerClient) -> None:
        self._ledger = ledger

    async def reserve(self, request: Request) -> Response:
        key = _vault_key(request)
        spec = await decode_body(request, ReserveRequest)
        amount_micros = _amount(spec.amount_micros, spec.amount_usd, "amount", allow_zero=False)
        if not 0 < len(spec.operation) <= OPERATION_CHARS_MAX:
            message = f"operation must be 1 to {OPERATION_CHARS_MAX} characters"
            raise InvalidRequestError("invalid_operation", message)
        if len(spec.pricing_version) > PRICING_VERSION_CHARS_MAX:
            message = f"pricing_version must be at most {PRICING_VERSION_CHARS_MAX} characters"
            raise InvalidRequestError("invalid_pricing_version", message)
        if len(spec.model) > OPERATION_CHARS_MAX or len(spec.degraded_by) > OPERATION_CHARS_MAX:
            message = f"model and degraded_by must be at most {OPERATION_CHARS_MAX} characters"
            raise InvalidRequestError("invalid_field", message)
        result = await self._ledger.execute(
            Reserve(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                amount_micros=amount_micros,
                vendor=spec.vendor,
                operation=spec.operation,
                idempotency_key=_idempotency_key(request, spec.idempotency_key),
                hold_ms=_hold_ms(spec.hold_seconds),
                pricing_version=spec.pricing_version,
                model=spec.model,
                degraded_by=spec.degraded_by,
            )
        )
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        if isinstance(result, Denied):
            return json_response(denial_status(result.code), views.denial(result))
        if isinstance(result, ApprovalPending):
            return _approval_required(result)
        if isinstance(result, Degrade):
            return _degrade_required(result)
        assert isinstance(result, Granted), result
        body = views.reservation(result, key.key_id, spec.vendor, spec.operation)
        # A replay reserved nothing new: 200 and a header, as idempotent APIs answer.
        if result.replayed:
            return json_response(200, body, {"Idempotent-Replayed": "true"})
        return json_response(201, body)

    async def commit(self, request: Request) -> Response:
        key = _vault_key(request)
        spec = await decode_body(request, CommitRequest)
        actual_micros = _amount(spec.actual_micros, spec.actual_usd, "actual", allow_zero=True)
        command = Commit(
            tenant=key.tenant,
            key_id=key.key_id,
            secret_sha256=key.secret_sha256,
            reservation_id=_reservation_id(request),
            actual_micros=actual_micros,
        )
        return await self._settle(command)

    async def release(self, request: Request) -> Response:
        key = _vault_key(request)
        spec = await decode_body(request, ReleaseRequest)
        if len(spec.reason) > OPERATION_CHARS_MAX:
            message = f"reason must be at most {OPERATION_CHARS_MAX} characters"
            raise InvalidRequestError("invalid_reason", message)
        command = Release(
            tenant=key.tenant,
            key_id=key.key_id,
            secret_sha256=key.secret_sha256,
            reservation_id=_reservation_id(request),
            reason=spec.reason or "caller_released",
        )
        return await self._settle(command)

    async def _settle(self, command: Commit | Release) -> Response:
        result = await self._ledger.execute(command)
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        assert isinstance(result, Settled), result
        outcome: Literal["committed", "released"] = (
            "committed" if isinstance(command, Commit) else "released"
        )
        return json_response(200, views.settlement(result, outcome))


def _approval_required(pending: ApprovalPending) -> Response:
    message = (
        f"{pending.message} (approval {pending.approval_id} is pending; reserve again with "
        "the same idempotency key once it is approved)"
    )
    extra = {
        "approval_id": pending.approval_id,
        "expires_at_ms": pending.expires_at_ms,
        "expires_at": views.iso(pending.expires_at_ms),
        "contract": pending.contract,
        "replayed": pending.replayed,
    }
    return error_response(409, "approval_required", message, extra=extra)


def _degrade_required(decision: Degrade) -> Response:
    message = (
        f"{decision.message or 'a contract asks for a cheaper call'}: reserve again with "
        f"model={decision.model!r} (when given) and degraded_by={decision.contract!r}"
    )
    extra = {
        "contract": decision.contract,
        "model": decision.model,
        "clamp_max_tokens": decision.clamp_max_tokens,
        "remaining_micros": decision.remaining_micros,
        "remaining_usd": format_usd(decision.remaining_micros),
    }
    return error_response(409, "degrade_required", message, extra=extra)


def _vault_key(request: Request) -> VaultKey:
    token = bearer_token(request.headers)
    key = parse_vault_key(token) if token is not None else None
    if key is None:
        raise InvalidRequestError(
            "invalid_key", "this endpoint needs 'Authorization: Bearer <vault key>'", status=401
        )
    return key


def _amount(micros: int | None, usd: Decimal | None, name: str, *, allow_zero: bool) -> int:
    """Exactly one of ``<name>_micros`` and ``<name>_usd``, as micro-USD within bounds."""
    if (micros is None) == (usd is None):
        message = f"give exactly one of {name}_micros and {name}_usd"
        raise InvalidRequestError("invalid_amount", message)
    if usd is not None:
        return parse_usd(usd, field=f"{name}_usd", allow_zero=allow_zero)
    assert micros is not None
    lowest = 0 if allow_zero else 1
    if not lowest <= micros <= AMOUNT_MICROS_MAX:
        message = (
            f"{name}_micros must be {lowest} to {AMOUNT_MICROS_MAX} "
            f"(${format_usd(AMOUNT_MICROS_MAX)})"
        )
        raise InvalidRequestError("invalid_amount", message)
    return micros


def _idempotency_key(request: Request, in_body: str | None) -> str | None:
    in_header = request.headers.get(IDEMPOTENCY_HEADER)
    if in_header is not None and in_body is not None and in_header != in_body:
        message = "the Idempotency-Key header and idempotency_key in the body differ"
        raise InvalidRequestError("invalid_idempotency_key", message)
    key = in_body if in_body is not None else in_header
    if key is not None and not 0 < len(key) <= IDEMPOTENCY_KEY_CHARS_MAX:
        message = f"an idempotency key is 1 to {IDEMPOTENCY_KEY_CHARS_MAX} characters"
        raise InvalidRequestError("invalid_idempotency_key", message)
    return key


def _hold_ms(hold_seconds: int | None) -> int:
    """The hold in ms; 0 asks for the ledger's default."""
    if hold_seconds is None:
        return 0
    if not 0 < hold_seconds * 1000 <= HOLD_MS_MAX:
        message = f"hold_seconds must be 1 to {HOLD_MS_MAX // 1000}"
        raise InvalidRequestError("invalid_hold", message)
    return hold_seconds * 1000


def _reservation_id(request: Request) -> str:
    reservation_id: str = request.path_params["reservation_id"]
    if len(reservation_id) > RESERVATION_ID_CHARS_MAX:
        raise InvalidRequestError("reservation_not_found", "no such open reservation", status=404)
    return reservation_id
