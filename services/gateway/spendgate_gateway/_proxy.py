"""The proxy route ``/{vendor}/{path}``: estimate, reserve, forward only after a grant, settle.

Order of checks, each refusing before anything leaves the gateway: known vendor, vendor
configured, safe path, vault key shape, bounded body, cost estimate, ledger grant. Only a
``Granted`` result is forwarded; the upstream's answer is returned unchanged and the
reservation is settled in the background by the vendor's rule (free -> release,
spent -> commit, unknown -> keep the hold until it expires).

A streamed answer (``text/event-stream``) that the vendor meters is relayed to the
caller chunk by chunk as it arrives, through the vendor's stream meter, and settled
once it ends: completely, broken off upstream (a read timeout or a cut connection: the
caller gets the vendor's own mid-stream error event) or abandoned by the caller (the
upstream stream is closed at once). A broken stream is settled from what the meter saw,
conservatively (docs/vendors.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta

import httpx
import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from spendgate_common.errors import InvalidRequestError, LedgerUnavailableError, SpendgateError
from spendgate_common.ledger_v1 import (
    ApprovalPending,
    Commit,
    Degrade,
    Denied,
    Failed,
    Granted,
    MarkUnknown,
    Release,
    Reserve,
)
from spendgate_common.vault_keys import VaultKey, parse_vault_key
from spendgate_gateway import _contract_decisions as contract_decisions
from spendgate_gateway._failures import exception_status_code_message, failed_status
from spendgate_gateway._ledger_client import LedgerClient
from spendgate_gateway._responses import error_response, json_response, read_body
from spendgate_gateway._settings import GatewaySettings
from spendgate_gateway._upstream_client import UpstreamClient
from spendgate_gateway._views import denial
from spendgate_gateway.vendors import VENDORS, Call, Estimate, Outcome, StreamMeter, Vendor
from spendgate_gateway.vendors._degrade import model_of
from spendgate_gateway.vendors._pricer import Pricer

_log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1: connection-specific headers are never forwarded.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded upstream: our credential, the routing we decide ourselves, lengths that
# httpx recomputes, and headers that could steer the upstream host or our view of it.
_REQUEST_HEADERS_DROPPED = HOP_BY_HOP_HEADERS | {
    b"authorization",
    b"host",
    b"content-length",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
    b"x-api-key",
    # The gateway reads answers (usage, streamed events), so it negotiates the upstream
    # encoding itself (httpx offers only what it decodes) and answers uncompressed.
    b"accept-encoding",
}
_RESPONSE_HEADERS_DROPPED = HOP_BY_HOP_HEADERS | {
    b"content-length",
    b"content-encoding",
    b"server",
    b"date",
}
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
        clients: dict[str, UpstreamClient],
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._clients = clients
        # The headers that carry each configured vendor's real key, encoded once.
        self._auth_headers = {
            name: [
                (header.encode("latin-1"), value.encode("latin-1"))
                for header, value in VENDORS[name].upstream_auth_headers(vendor.api_key).items()
            ]
            for name, vendor in settings.vendors.items()
            if vendor.api_key is not None
        }
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
        # The query as received (Starlette's request.url would parse the whole URL).
        query = request.scope["query_string"].decode("latin-1")
        agent_call = Call(request.method, path, query, request.headers, body)
        estimate = self._pricer.estimate(vendor, agent_call)
        reserve = Reserve(
            tenant=key.tenant,
            key_id=key.key_id,
            secret_sha256=key.secret_sha256,
            amount_micros=estimate.amount_micros,
            vendor=vendor.name,
            operation=estimate.operation,
            idempotency_key=_idempotency_key(vendor, request),
            pricing_version=estimate.pricing_version,
            claim=True,
            model=model_of(estimate),
        )
        result = await self._ledger.execute(reserve)
        degraded_header = ""
        if isinstance(result, Degrade):
            # A contract degrades the call: rewrite it, estimate and reserve it again.
            degraded = await contract_decisions.reserve_degraded(
                self._ledger, self._pricer, vendor, agent_call, reserve, result
            )
            estimate, body, result = degraded.estimate, degraded.body, degraded.result
            degraded_header = degraded.header
        call = _Call(vendor, key, estimate)
        if isinstance(result, ApprovalPending):
            return contract_decisions.approval_response(vendor, result)
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
        response = await self._forward(request, call, result, path, body)
        if degraded_header:
            response.headers[contract_decisions.DEGRADED_HEADER] = degraded_header
        return response

    async def _forward(
        self, request: Request, call: _Call, grant: Granted, path: str, body: bytes
    ) -> Response:
        vendor = call.vendor
        client = self._clients[vendor.name]
        estimate = call.estimate
        meter: StreamMeter | None = None
        try:
            upstream = await client.forward(
                request.method,
                estimate.upstream_path or path,
                request.scope["query_string"],
                _forwarded_headers(request.scope["headers"], self._auth_headers[vendor.name]),
                body if estimate.upstream_body is None else estimate.upstream_body,
            )
            if _is_event_stream(upstream):
                meter = vendor.stream_meter(upstream.status_code, estimate)
            if meter is None:
                try:
                    content = b"".join([chunk async for chunk in upstream.aiter_bytes()])
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
        if meter is not None:
            relay = _StreamRelay(
                vendor.name,
                upstream,
                meter,
                settle=lambda outcome, actual, reason: self._settle_later(
                    call, grant, outcome, actual, reason
                ),
                in_background=self._in_background,
            )
            return _RelayedResponse(relay, upstream.status_code, _response_headers(upstream))
        settlement = vendor.settle(upstream.status_code, content, call.estimate)
        self._settle_later(
            call,
            grant,
            settlement.outcome,
            settlement.actual_micros,
            f"upstream_status_{upstream.status_code}",
        )
        response = Response(content=content, status_code=upstream.status_code)
        response.raw_headers.extend(_response_headers(upstream))
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
                # Nobody waits for a settle: it rides along with the partition's next
                # command (or leaves after the client's linger).
                result = await self._ledger.execute(command, linger=True)
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

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        """Run ``work`` as a task that shutdown waits for (like a settle)."""
        task = asyncio.create_task(work)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def wait_settled(self, deadline: timedelta) -> None:
        """Wait (bounded) for background settles, used on shutdown."""
        if self._settling:
            await asyncio.wait(list(self._settling), timeout=deadline.total_seconds())


# ------------------------------------------------------------------------ streaming


class _StreamRelay:
    """One metered upstream stream: relayed as it arrives, then settled exactly once.

    :meth:`close` is synchronous (it only schedules the settle and the upstream close),
    so it also works while the caller's disconnect is cancelling the response.
    """

    def __init__(
        self,
        vendor_name: str,
        upstream: httpx.Response,
        meter: StreamMeter,
        *,
        settle: Callable[[Outcome, int, str], None],
        in_background: Callable[[Coroutine[object, object, None]], None],
    ) -> None:
        self._vendor_name = vendor_name
        self._upstream = upstream
        self._meter = meter
        self._settle = settle
        self._in_background = in_background
        self._ended = ""  # "complete", "upstream_timeout" or "upstream_error" once known
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.aiter_bytes():
                relayed = self._meter.feed(chunk)
                if relayed:
                    yield relayed
            self._ended = "complete"
        except httpx.HTTPError as error:
            timeout = isinstance(error, httpx.TimeoutException)
            self._ended = "upstream_timeout" if timeout else "upstream_error"
            _log.warning(
                "%s stream broke off (%s); settled conservatively",
                self._vendor_name,
                type(error).__name__,
            )
            yield self._meter.interruption(
                self._ended,
                f"{self._vendor_name} stopped streaming mid-answer "
                f"({'read timeout' if timeout else 'broken connection'}); Spendgate settled "
                "the call conservatively",
            )
        finally:
            self.close()

    def close(self) -> None:
        """Settle from what the meter saw and close the upstream stream; once."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            _log.info(
                "%s stream abandoned by the caller; settled conservatively", self._vendor_name
            )
        settlement = self._meter.finish(self._ended == "complete")
        self._settle(
            settlement.outcome, settlement.actual_micros, f"stream_{self._ended or 'abandoned'}"
        )
        # Closing an unfinished stream drops its connection: the vendor stops generating.
        self._in_background(self._upstream.aclose())


class _RelayedResponse(StreamingResponse):
    """Streams a relay and closes it however the response ends, even before it began."""

    def __init__(
        self, relay: _StreamRelay, status_code: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(relay.chunks(), status_code=status_code)
        self.raw_headers.extend(headers)
        self._relay = relay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._relay.close()


def _is_event_stream(upstream: httpx.Response) -> bool:
    content_type: str = upstream.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _response_headers(upstream: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in upstream.headers.raw
        if name.lower() not in _RESPONSE_HEADERS_DROPPED
    ]


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


def _forwarded_headers(
    received: list[tuple[bytes, bytes]], auth: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """The agent's headers (ASGI's: lowercase names) that go upstream, then ``auth``."""
    dropped = _REQUEST_HEADERS_DROPPED
    for name, value in received:
        if name == b"connection":
            # Header names listed in Connection are hop-by-hop too (RFC 9110 7.6.1).
            dropped = dropped | {listed.strip().lower() for listed in value.split(b",")}
    forwarded = [(name, value) for name, value in received if name not in dropped]
    forwarded.extend(auth)
    return forwarded


def _denied_response(vendor: Vendor, denied: Denied) -> Response:
    """The control plane's denial body (``_views.denial``) plus the vendor-shaped error."""
    status = contract_decisions.denial_status(denied.code)
    body = msgspec.structs.asdict(denial(denied))
    body["error"] = vendor.error_object(denied.code, denied.message, status)
    return json_response(status, body, vendor.refusal_headers())
