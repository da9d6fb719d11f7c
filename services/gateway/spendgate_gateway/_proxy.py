"""The proxy route ``/{vendor}/{path}``: estimate, reserve, forward only after a grant, settle.

Order of checks, each refusing before anything leaves the gateway: known vendor, vendor
configured, safe path, vault key shape, bounded body, cost estimate, ledger grant. Only a
``Granted`` result is forwarded; the upstream's answer is returned unchanged and the
reservation is settled in the background by the vendor's rule (free -> release,
spent -> commit, unknown -> keep the hold until it expires).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import timedelta

import httpx
from starlette.requests import Request
from starlette.responses import Response

from spendgate_common.errors import InvalidRequestError, LedgerUnavailableError, SpendgateError
from spendgate_common.ledger_v1 import (
    Commit,
    Denied,
    Failed,
    Granted,
    MarkUnknown,
    Release,
    Reserve,
)
from spendgate_common.money import format_usd
from spendgate_common.vault_keys import VaultKey, parse_vault_key
from spendgate_gateway._failures import exception_status_code_message, failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body
from spendgate_gateway._settings import GatewaySettings
from spendgate_gateway.vendors import VENDORS, Call, Estimate, Outcome, Vendor
from spendgate_gateway.vendors._pricer import Pricer

_log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1: connection-specific headers are never forwarded.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: our credential, the routing we decide ourselves, lengths that
# httpx recomputes, and headers that could steer the upstream host or our view of it.
_REQUEST_HEADERS_DROPPED = HOP_BY_HOP_HEADERS | {
    "authorization",
    "host",
    "content-length",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-api-key",
}
_RESPONSE_HEADERS_DROPPED = HOP_BY_HOP_HEADERS | {"content-length", "server", "date"}
# A path segment: letters, digits and a few safe characters. No "..", no empty segment.
_SEGMENT = re.compile(r"^[A-Za-z0-9_.~:@!$'()*+,;=-]{1,200}$")
PATH_SEGMENTS_MAX = 16
# Bounded retries of a background settle when the ledger is briefly unreachable.
SETTLE_ATTEMPTS_MAX = 5
SETTLE_RETRY_PAUSE = timedelta(milliseconds=500)


@dataclass(frozen=True, slots=True)
class _Call:
    vendor: Vendor
    key: VaultKey
    estimate: Estimate


class Proxy:
    def __init__(
        self,
        settings: GatewaySettings,
        ledger: LedgerClient,
        clients: dict[str, httpx.AsyncClient],
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._clients = clients
        # Estimators configured by the settings, and fixed costs (vendors/_pricer.py).
        self._pricer = Pricer(settings)
        self._settling: set[asyncio.Task[None]] = set()

    async def handle(self, request: Request) -> Response:
        vendor_name = request.path_params["vendor"]
        vendor = VENDORS.get(vendor_name)
        if vendor is None:
            return error_response(
                404, "unknown_vendor", f"no vendor named {vendor_name!r} (known: {sorted(VENDORS)})"
            )
        try:
            return await self._handle(request, vendor)
        except SpendgateError as error:
            status, code, message = exception_status_code_message(error)
            return error_response(
                status,
                code,
                message,
                vendor_error=vendor.error_object(code, message, status),
                headers=vendor.refusal_headers(),
            )

    async def _handle(self, request: Request, vendor: Vendor) -> Response:
        vendor_settings = self._settings.vendors[vendor.name]
        if vendor_settings.api_key is None:
            raise InvalidRequestError(
                "vendor_not_configured",
                f"no upstream API key is configured for {vendor.name} "
                f"(set SPENDGATE_{vendor.name.upper()}_API_KEY)",
                status=503,
            )
        path = _checked_path(request.path_params["path"])
        presented = vendor.presented_key(request.headers)
        key = parse_vault_key(presented) if presented else None
        if key is None:
            raise InvalidRequestError(
                "invalid_key", "present a Spendgate vault key (sgk_...) as the API key", status=401
            )
        body = await read_body(request, self._settings.body_bytes_max)
        agent_call = Call(request.method, path, request.url.query, request.headers, body)
        estimate = self._pricer.estimate(vendor, agent_call)
        result = await self._ledger.execute(
            Reserve(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                amount_micros=estimate.amount_micros,
                vendor=vendor.name,
                operation=estimate.operation,
                idempotency_key=_idempotency_key(vendor, request),
                pricing_version=estimate.pricing_version,
                claim=True,
            )
        )
        call = _Call(vendor, key, estimate)
        if isinstance(result, Denied):
            return _denied_response(vendor, result)
        if isinstance(result, Failed):
            status = failed_status(result)
            # A retry racing its own first attempt may retry again shortly; the rest may not.
            in_progress = result.code == "request_in_progress"
            return error_response(
                status,
                result.code,
                result.message,
                vendor_error=vendor.error_object(result.code, result.message, status),
                headers={"retry-after": "1"} if in_progress else vendor.refusal_headers(),
            )
        assert isinstance(result, Granted), result
        if result.replayed and not result.resumed and not vendor.upstream_deduplicates:
            # A retry of a call that completed: forwarding it again would be a second,
            # unreserved call, as this vendor does not deduplicate retries itself.
            raise InvalidRequestError(
                "request_completed",
                "the call with this idempotency key has completed already; "
                "use a new idempotency key for a new call",
                status=409,
            )
        return await self._forward(request, call, result, path, body)

    async def _forward(
        self, request: Request, call: _Call, grant: Granted, path: str, body: bytes
    ) -> Response:
        vendor = call.vendor
        api_key = self._settings.vendors[vendor.name].api_key
        assert api_key is not None
        dropped = _REQUEST_HEADERS_DROPPED | _connection_listed(request)
        headers = {name: value for name, value in request.headers.items() if name not in dropped}
        headers.update(vendor.upstream_auth_headers(api_key))
        client = self._clients[vendor.name]
        estimate = call.estimate
        upstream_request = client.build_request(
            request.method,
            "/" + (estimate.upstream_path or path),
            params=request.url.query or None,
            headers=headers,
            content=body if estimate.upstream_body is None else estimate.upstream_body,
        )
        try:
            upstream = await client.send(upstream_request, stream=True)
            try:
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # The request never left: it certainly cost nothing.
            self._settle_later(call, grant, Outcome.FREE, 0)
            return self._upstream_failure(vendor, 502, "upstream_unreachable", error)
        except httpx.TimeoutException as error:
            # The vendor may have acted: keep the hold for a retry or until it expires.
            self._settle_later(call, grant, Outcome.UNKNOWN, 0, "upstream_timeout")
            return self._upstream_failure(vendor, 504, "upstream_timeout", error)
        except httpx.HTTPError as error:
            self._settle_later(call, grant, Outcome.UNKNOWN, 0, "upstream_error")
            return self._upstream_failure(vendor, 502, "upstream_error", error)
        settlement = vendor.settle(upstream.status_code, content, call.estimate)
        self._settle_later(
            call,
            grant,
            settlement.outcome,
            settlement.actual_micros,
            f"upstream_status_{upstream.status_code}",
        )
        response_headers = [
            (name, value)
            for name, value in upstream.headers.multi_items()
            if name.lower() not in _RESPONSE_HEADERS_DROPPED
        ]
        response = Response(content=content, status_code=upstream.status_code)
        response.raw_headers.extend(
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in response_headers
        )
        return response

    def _upstream_failure(
        self, vendor: Vendor, status: int, code: str, error: Exception
    ) -> Response:
        _log.warning("%s upstream failed: %s", vendor.name, type(error).__name__)
        message = {
            "upstream_unreachable": f"{vendor.name} could not be reached; nothing was charged",
            "upstream_timeout": f"{vendor.name} did not answer in time; the call may have "
            "happened, so its reservation is held until it expires",
            "upstream_error": f"{vendor.name} answered with a broken response",
        }[code]
        return error_response(
            status, code, message, vendor_error=vendor.error_object(code, message, status)
        )

    # ------------------------------------------------------------------------ settling

    def _settle_later(
        self, call: _Call, grant: Granted, outcome: Outcome, actual: int, reason: str = ""
    ) -> None:
        if grant.replayed and not grant.resumed:
            # The first attempt settles (or settled) the hold; the vendor deduplicated us.
            return
        key = call.key
        command: Commit | Release | MarkUnknown
        if outcome is Outcome.UNKNOWN:
            # The hold stays, unclaimed: a retry with the same idempotency key resumes it,
            # otherwise it expires and counts as spent.
            command = MarkUnknown(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                reservation_id=grant.reservation_id,
                reason=reason,
            )
        elif outcome is Outcome.SPENT:
            command = Commit(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                reservation_id=grant.reservation_id,
                actual_micros=actual,
            )
        else:
            command = Release(
                tenant=key.tenant,
                key_id=key.key_id,
                secret_sha256=key.secret_sha256,
                reservation_id=grant.reservation_id,
                reason="upstream_refused",
            )
        task = asyncio.create_task(self._settle(command))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, command: Commit | Release | MarkUnknown) -> None:
        for attempt in range(1, SETTLE_ATTEMPTS_MAX + 1):
            try:
                result = await self._ledger.execute(command)
            except LedgerUnavailableError as error:
                _log.warning(
                    "settle attempt %d of %s failed: %s", attempt, command.reservation_id, error
                )
                await asyncio.sleep(SETTLE_RETRY_PAUSE.total_seconds() * attempt)
                continue
            if isinstance(result, Failed):
                _log.warning("settle of %s refused: %s", command.reservation_id, result.code)
            return
        _log.error("settle of %s gave up; the hold stays until it expires", command.reservation_id)

    async def wait_settled(self, deadline: timedelta) -> None:
        """Wait (bounded) for background settles, used on shutdown."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=deadline.total_seconds())


def _checked_path(path: str) -> str:
    """The upstream path, refused unless it is a plain relative path of safe segments."""
    segments = path.split("/")
    if (
        not path
        or len(segments) > PATH_SEGMENTS_MAX
        or any(not _SEGMENT.match(s) or s in (".", "..") for s in segments)
    ):
        raise InvalidRequestError("invalid_path", "the upstream path is not a plain relative path")
    return path


def _idempotency_key(vendor: Vendor, request: Request) -> str | None:
    """The caller's idempotency key: the vendor's own header, else ``Idempotency-Key``."""
    for name in (*vendor.idempotency_headers, "idempotency-key"):
        value = request.headers.get(name)
        if value:
            return value
    return None


def _connection_listed(request: Request) -> frozenset[str]:
    """Header names listed in ``Connection`` are hop-by-hop too (RFC 9110 7.6.1)."""
    listed = request.headers.get("connection", "")
    return frozenset(name.strip().lower() for name in listed.split(",") if name.strip())


def _denied_response(vendor: Vendor, denied: Denied) -> Response:
    remaining = max(0, denied.cap_micros - denied.committed_micros - denied.reserved_micros)
    body: dict[str, object] = {
        "code": denied.code,
        "message": denied.message,
        "spent_usd": format_usd(denied.committed_micros),
        "reserved_usd": format_usd(denied.reserved_micros),
        "remaining_usd": format_usd(remaining),
        "cap_usd": format_usd(denied.cap_micros),
        "requested_usd": format_usd(denied.requested_micros),
        "spent_micros": denied.committed_micros,
        "reserved_micros": denied.reserved_micros,
        "cap_micros": denied.cap_micros,
        "requested_micros": denied.requested_micros,
        "scope": denied.scope,
        "scope_id": denied.scope_id,
        "decision_id": denied.decision_id,
        "error": vendor.error_object(denied.code, denied.message, 429),
    }
    return json_response(429, body, vendor.refusal_headers())
