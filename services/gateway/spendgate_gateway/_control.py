"""Control-plane API under ``/v1`` (admin token): issuing and reading vault keys.

Request bodies are msgspec Structs decoded from JSON with exact decimals; amounts go out
as integer ``*_micros`` plus decimal-string ``*_usd``. The plaintext vault key appears
only in the response to ``POST /v1/keys``.
"""

from __future__ import annotations

import hmac
import time
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError
from spendgate_common.events_v1 import Window
from spendgate_common.ledger_v1 import Failed, IssueKey, KeyCreated, KeyState, QueryKey
from spendgate_common.limits import LABEL_CHARS_MAX
from spendgate_common.money import format_usd, parse_usd
from spendgate_common.vault_keys import is_valid_tenant, new_vault_key
from spendgate_gateway._failures import failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body
from spendgate_gateway._settings import GatewaySettings

# Control-plane bodies are small; a tighter bound than the proxy's.
CONTROL_BODY_BYTES_MAX = 16_384
TTL_SECONDS_MAX = 3_650 * 86_400


class IssueKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/keys``: exactly one of ``cap_usd`` (total) or ``daily_usd_cap``."""

    label: str
    cap_usd: Decimal | None = None
    daily_usd_cap: Decimal | None = None
    tenant: str = "default"
    timezone: str = "UTC"
    ttl_seconds: int | None = None


_issue_key_decoder = msgspec.json.Decoder(IssueKeyRequest)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


class ControlPlane:
    def __init__(self, settings: GatewaySettings, ledger: LedgerClient) -> None:
        self._settings = settings
        self._ledger = ledger

    def _check_admin(self, request: Request) -> None:
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

    async def issue_key(self, request: Request) -> Response:
        self._check_admin(request)
        body = await read_body(request, CONTROL_BODY_BYTES_MAX)
        try:
            spec = _issue_key_decoder.decode(body)
        except msgspec.ValidationError as error:
            # Before DecodeError: ValidationError is its subclass (well-formed, wrong shape).
            raise InvalidRequestError("invalid_field", str(error)) from None
        except msgspec.DecodeError as error:
            message = f"the JSON body is malformed: {error}"
            raise InvalidRequestError("malformed_json", message) from None
        cap_micros, window = _cap_and_window(spec)
        if not 0 < len(spec.label) <= LABEL_CHARS_MAX:
            raise InvalidRequestError(
                "invalid_label", f"label must be 1 to {LABEL_CHARS_MAX} characters"
            )
        if not is_valid_tenant(spec.tenant):
            raise InvalidRequestError(
                "invalid_tenant",
                "tenant must be 1 to 32 of a-z, 0-9 and '-', starting alphanumeric",
            )
        ttl_seconds = (
            spec.ttl_seconds
            if spec.ttl_seconds is not None
            else int(self._settings.key_ttl_default.total_seconds())
        )
        if not 0 < ttl_seconds <= TTL_SECONDS_MAX:
            raise InvalidRequestError("invalid_ttl", f"ttl_seconds must be 1 to {TTL_SECONDS_MAX}")
        vault_key = new_vault_key(spec.tenant)
        expires_at_ms = time.time_ns() // 1_000_000 + ttl_seconds * 1000
        result = await self._ledger.execute(
            IssueKey(
                tenant=spec.tenant,
                key_id=vault_key.key_id,
                label=spec.label,
                secret_sha256=vault_key.secret_sha256,
                cap_micros=cap_micros,
                window=window,
                timezone=spec.timezone,
                expires_at_ms=expires_at_ms,
            )
        )
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        assert isinstance(result, KeyCreated), result
        return json_response(
            201,
            {
                "key": str(vault_key),
                "key_id": vault_key.key_id,
                "label": spec.label,
                "tenant": spec.tenant,
                "window": window,
                "timezone": spec.timezone,
                "cap_micros": cap_micros,
                "cap_usd": format_usd(cap_micros),
                "expires_at": _iso(result.expires_at_ms),
            },
        )

    async def get_key(self, request: Request) -> Response:
        self._check_admin(request)
        tenant = request.query_params.get("tenant", "default")
        if not is_valid_tenant(tenant):
            raise InvalidRequestError("invalid_tenant", "tenant is not a valid tenant name")
        key_id = request.path_params["key_id"]
        result = await self._ledger.execute(QueryKey(tenant=tenant, key_id=key_id))
        if isinstance(result, Failed):
            return error_response(failed_status(result), result.code, result.message)
        assert isinstance(result, KeyState), result
        remaining = max(0, result.cap_micros - result.committed_micros - result.reserved_micros)
        return json_response(
            200,
            {
                "key_id": result.key_id,
                "label": result.label,
                "tenant": result.tenant,
                "window": result.window,
                "timezone": result.timezone,
                "window_start_at": _iso(result.window_start_at_ms),
                "cap_micros": result.cap_micros,
                "committed_micros": result.committed_micros,
                "reserved_micros": result.reserved_micros,
                "remaining_micros": remaining,
                "cap_usd": format_usd(result.cap_micros),
                "committed_usd": format_usd(result.committed_micros),
                "reserved_usd": format_usd(result.reserved_micros),
                "remaining_usd": format_usd(remaining),
                "expires_at": _iso(result.expires_at_ms),
            },
        )


def _cap_and_window(spec: IssueKeyRequest) -> tuple[int, Window]:
    if (spec.cap_usd is None) == (spec.daily_usd_cap is None):
        raise InvalidRequestError(
            "invalid_cap", "give exactly one of cap_usd (total) or daily_usd_cap (daily window)"
        )
    if spec.cap_usd is not None:
        return parse_usd(spec.cap_usd, field="cap_usd"), "total"
    assert spec.daily_usd_cap is not None
    return parse_usd(spec.daily_usd_cap, field="daily_usd_cap"), "daily"
