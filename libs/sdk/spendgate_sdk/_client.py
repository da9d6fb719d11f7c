"""``SpendgateClient`` and ``AsyncSpendgateClient``: reserve, commit and release over the
gateway's direct reservations API (``/v1/reservations``, docs/api.md), authenticated
with the vault key.

Every reserve carries an idempotency key (one is generated when the caller gives none),
so a retry after a timeout, or ``ApprovalRequired.resume()``, gets the original decision
instead of a second hold.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx
import msgspec

from spendgate_sdk._errors import (
    ApprovalRejected,
    ApprovalRequired,
    BudgetExceeded,
    ContractStopped,
    DegradeRequired,
    SpendgateError,
)
from spendgate_sdk._types import KeyState, Reservation, Settlement

GATEWAY_URL_DEFAULT = "http://127.0.0.1:8080"
# One reserve is one ledger round trip; a gateway that does not answer in this is down.
REQUEST_TIMEOUT_DEFAULT = timedelta(seconds=30)
CONNECTIONS_MAX_DEFAULT = 20
MICROS_PER_USD = 1_000_000

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _ReserveSpec:
    """One reserve, kept so that ``ApprovalRequired.resume()`` can send it again."""

    body: dict[str, Any]
    idempotency_key: str


def to_micros(amount_usd: Decimal | str | int) -> int:
    """``amount_usd`` (a decimal string, ``Decimal`` or int; never a float) in micro-USD;
    ``ValueError`` when it has more than six decimals or is not a number."""
    if isinstance(amount_usd, float):
        raise TypeError("give amounts as str or Decimal, never float (money is exact)")
    try:
        micros = Decimal(amount_usd) * MICROS_PER_USD
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {amount_usd!r}") from None
    if micros != micros.to_integral_value():
        raise ValueError(f"at most six decimals: {amount_usd!r}")
    return int(micros)


def _reserve_spec(
    *,
    amount_usd: Decimal | str | int | None,
    amount_micros: int | None,
    vendor: str,
    operation: str,
    idempotency_key: str | None,
    model: str | None,
    hold_seconds: int | None,
    degraded_by: str | None,
    pricing_version: str | None,
) -> _ReserveSpec:
    if (amount_usd is None) == (amount_micros is None):
        raise ValueError("give exactly one of amount_usd and amount_micros")
    micros = to_micros(amount_usd) if amount_usd is not None else amount_micros
    key = idempotency_key if idempotency_key is not None else f"sdk-{uuid.uuid4().hex}"
    body: dict[str, Any] = {
        "vendor": vendor,
        "operation": operation,
        "amount_micros": micros,
        "idempotency_key": key,
    }
    optional = {
        "model": model,
        "hold_seconds": hold_seconds,
        "degraded_by": degraded_by,
        "pricing_version": pricing_version,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return _ReserveSpec(body, key)


def _key_id(vault_key: str) -> str:
    """The key id inside ``sgk_<tenant>_<key id>_<secret>``."""
    parts = vault_key.split("_")
    if len(parts) < 4 or parts[0] != "sgk":
        raise ValueError("not a vault key (sgk_<tenant>_<key id>_<secret>)")
    return parts[-2]


def translate_error(response: httpx.Response, spec: _ReserveSpec | None) -> SpendgateError:
    """The exception for a refusal (any status >= 300): the one place answers are mapped."""
    try:
        decoded: object = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        decoded = None
    body: dict[str, Any] = decoded if isinstance(decoded, dict) else {}
    code = str(body.get("code", f"http_{response.status_code}"))
    message = str(body.get("message", response.text[:500]))
    status = response.status_code
    if code == "cap_exhausted":
        return BudgetExceeded(
            code,
            message,
            status=status,
            scope=str(body.get("scope", "")),
            scope_id=str(body.get("scope_id", "")),
            remaining_micros=_remaining_micros(body),
            cap_micros=int(body.get("cap_micros", 0)),
            requested_micros=int(body.get("requested_micros", 0)),
            decision_id=str(body.get("decision_id", "")),
        )
    if code == "contract_stop":
        return ContractStopped(code, message, status=status)
    if code in ("approval_rejected", "approval_expired"):
        return ApprovalRejected(code, message, status=status)
    if code == "approval_required" and spec is not None:
        return ApprovalRequired(
            code,
            message,
            status=status,
            approval_id=str(body.get("approval_id", "")),
            expires_at=str(body.get("expires_at", "")),
            contract=str(body.get("contract", "")),
            idempotency_key=spec.idempotency_key,
        )
    if code == "degrade_required":
        model = body.get("model")
        return DegradeRequired(
            code,
            message,
            status=status,
            contract=str(body.get("contract", "")),
            model=None if model is None else str(model),
            clamp_max_tokens=bool(body.get("clamp_max_tokens", False)),
            remaining_micros=int(body.get("remaining_micros", 0)),
        )
    return SpendgateError(code, message, status=status)


def _remaining_micros(body: dict[str, Any]) -> int:
    cap = int(body.get("cap_micros", 0))
    used = int(body.get("spent_micros", 0)) + int(body.get("reserved_micros", 0))
    return max(0, cap - used)


def _decode(response: httpx.Response, spec: _ReserveSpec | None, kind: type[_T]) -> _T:
    if response.status_code >= 300:
        raise translate_error(response, spec)
    return msgspec.json.decode(response.content, type=kind)


def _unreachable(error: httpx.HTTPError) -> SpendgateError:
    return SpendgateError("gateway_unreachable", f"{type(error).__name__}: {error}")


def _headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "content-type": "application/json"}


def _http_options(gateway_url: str, timeout: timedelta, connections_max: int) -> dict[str, Any]:
    """What both clients give their httpx client."""
    return {
        "base_url": gateway_url,
        "timeout": httpx.Timeout(timeout.total_seconds()),
        "limits": httpx.Limits(max_connections=connections_max),
    }


def _commit_body(
    actual_usd: Decimal | str | int | None, actual_micros: int | None
) -> dict[str, object]:
    if (actual_usd is None) == (actual_micros is None):
        raise ValueError("give exactly one of actual_usd and actual_micros")
    micros = to_micros(actual_usd) if actual_usd is not None else actual_micros
    return {"actual_micros": micros}


def _settle_path(reservation: Reservation | str, verb: str) -> str:
    rid = reservation if isinstance(reservation, str) else reservation.reservation_id
    return f"/v1/reservations/{rid}/{verb}"


def _key_state_request(
    vault_key: str, admin_token: str | None, key_id: str | None
) -> tuple[str, dict[str, str]]:
    if admin_token is None:
        raise SpendgateError("admin_token_required", "key_state() needs admin_token")
    return f"/v1/keys/{key_id or _key_id(vault_key)}", _headers(admin_token)


class SpendgateClient:
    """Synchronous client. ``vault_key`` authenticates reserve, commit and release;
    ``admin_token`` is only needed for ``key_state()`` (the gateway shows a key's state
    to the admin API only). Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        vault_key: str,
        *,
        gateway_url: str = GATEWAY_URL_DEFAULT,
        admin_token: str | None = None,
        timeout: timedelta = REQUEST_TIMEOUT_DEFAULT,
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
    ) -> None:
        self._vault_key = vault_key
        self._admin_token = admin_token
        self._http = httpx.Client(**_http_options(gateway_url, timeout, connections_max))

    def __enter__(self) -> SpendgateClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def reserve(
        self,
        amount_usd: Decimal | str | int | None = None,
        *,
        amount_micros: int | None = None,
        vendor: str,
        operation: str,
        idempotency_key: str | None = None,
        model: str | None = None,
        hold_seconds: int | None = None,
        degraded_by: str | None = None,
        pricing_version: str | None = None,
    ) -> Reservation:
        """Hold exactly one of ``amount_usd`` and ``amount_micros`` on every cap that
        applies. Raises ``BudgetExceeded``, ``ApprovalRequired``, ``ApprovalRejected``,
        ``ContractStopped``, ``DegradeRequired`` or ``SpendgateError``."""
        spec = _reserve_spec(
            amount_usd=amount_usd,
            amount_micros=amount_micros,
            vendor=vendor,
            operation=operation,
            idempotency_key=idempotency_key,
            model=model,
            hold_seconds=hold_seconds,
            degraded_by=degraded_by,
            pricing_version=pricing_version,
        )
        return self._reserve(spec)

    def _reserve(self, spec: _ReserveSpec) -> Reservation:
        try:
            response = self._http.post(
                "/v1/reservations",
                content=msgspec.json.encode(spec.body),
                headers=_headers(self._vault_key),
            )
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        try:
            return _decode(response, spec, Reservation)
        except ApprovalRequired as pending:
            pending._resume = lambda: self._reserve(spec)
            raise

    def commit(
        self,
        reservation: Reservation | str,
        actual_usd: Decimal | str | int | None = None,
        *,
        actual_micros: int | None = None,
    ) -> Settlement:
        """Settle as spent at the actual cost (zero allowed; above the hold is an overrun)."""
        return self._settle(reservation, "commit", _commit_body(actual_usd, actual_micros))

    def release(self, reservation: Reservation | str, reason: str = "") -> Settlement:
        """Return the hold: only for a call known to have cost nothing."""
        return self._settle(reservation, "release", {"reason": reason})

    def _settle(self, reservation: Reservation | str, verb: str, body: object) -> Settlement:
        try:
            response = self._http.post(
                _settle_path(reservation, verb),
                content=msgspec.json.encode(body),
                headers=_headers(self._vault_key),
            )
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        return _decode(response, None, Settlement)

    def key_state(self, key_id: str | None = None) -> KeyState:
        """The key's use in its window (this client's key by default); needs ``admin_token``."""
        path, headers = _key_state_request(self._vault_key, self._admin_token, key_id)
        try:
            response = self._http.get(path, headers=headers)
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        return _decode(response, None, KeyState)


class AsyncSpendgateClient:
    """The asyncio twin of :class:`SpendgateClient` (same arguments, same errors; use
    ``await error.resume_async()`` on ``ApprovalRequired``)."""

    def __init__(
        self,
        vault_key: str,
        *,
        gateway_url: str = GATEWAY_URL_DEFAULT,
        admin_token: str | None = None,
        timeout: timedelta = REQUEST_TIMEOUT_DEFAULT,
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
    ) -> None:
        self._vault_key = vault_key
        self._admin_token = admin_token
        self._http = httpx.AsyncClient(**_http_options(gateway_url, timeout, connections_max))

    async def __aenter__(self) -> AsyncSpendgateClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def reserve(
        self,
        amount_usd: Decimal | str | int | None = None,
        *,
        amount_micros: int | None = None,
        vendor: str,
        operation: str,
        idempotency_key: str | None = None,
        model: str | None = None,
        hold_seconds: int | None = None,
        degraded_by: str | None = None,
        pricing_version: str | None = None,
    ) -> Reservation:
        """As :meth:`SpendgateClient.reserve`."""
        spec = _reserve_spec(
            amount_usd=amount_usd,
            amount_micros=amount_micros,
            vendor=vendor,
            operation=operation,
            idempotency_key=idempotency_key,
            model=model,
            hold_seconds=hold_seconds,
            degraded_by=degraded_by,
            pricing_version=pricing_version,
        )
        return await self._reserve(spec)

    async def _reserve(self, spec: _ReserveSpec) -> Reservation:
        try:
            response = await self._http.post(
                "/v1/reservations",
                content=msgspec.json.encode(spec.body),
                headers=_headers(self._vault_key),
            )
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        try:
            return _decode(response, spec, Reservation)
        except ApprovalRequired as pending:
            pending._resume_async = lambda: self._reserve(spec)
            raise

    async def commit(
        self,
        reservation: Reservation | str,
        actual_usd: Decimal | str | int | None = None,
        *,
        actual_micros: int | None = None,
    ) -> Settlement:
        """As :meth:`SpendgateClient.commit`."""
        return await self._settle(reservation, "commit", _commit_body(actual_usd, actual_micros))

    async def release(self, reservation: Reservation | str, reason: str = "") -> Settlement:
        """As :meth:`SpendgateClient.release`."""
        return await self._settle(reservation, "release", {"reason": reason})

    async def _settle(self, reservation: Reservation | str, verb: str, body: object) -> Settlement:
        try:
            response = await self._http.post(
                _settle_path(reservation, verb),
                content=msgspec.json.encode(body),
                headers=_headers(self._vault_key),
            )
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        return _decode(response, None, Settlement)

    async def key_state(self, key_id: str | None = None) -> KeyState:
        """As :meth:`SpendgateClient.key_state`."""
        path, headers = _key_state_request(self._vault_key, self._admin_token, key_id)
        try:
            response = await self._http.get(path, headers=headers)
        except httpx.HTTPError as error:
            raise _unreachable(error) from error
        return _decode(response, None, KeyState)
