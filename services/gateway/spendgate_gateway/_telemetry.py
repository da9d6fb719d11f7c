"""The gateway's traces and metrics (docs/operations.md).

Trace shape of one call::

    POST /{vendor}/{path}            SERVER  (ServerSpans; the agent's traceparent is its parent)
    ├── ledger.request Reserve       CLIENT  (LedgerObserver; its traceparent goes to the ledger)
    ├── upstream stripe              CLIENT  (UpstreamObserver; until the response headers)
    └── ledger.request Commit        CLIENT  (the settle, after the response)

The decision attributes (``spendgate.*``) are set on the server span and on the reserve's
client span; a stop or refusal adds a span event saying why. With tracing off nothing
here builds a span or formats a header; with metrics off too, the ledger client and the
upstream clients are not observed at all (``GatewayTelemetry.active`` is False).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import Histogram
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode, Tracer
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spendgate_common.errors import LedgerUnavailableError
from spendgate_common.ledger_v1 import AnyCommand, AnyResult, Failed, Reserve
from spendgate_common.subjects import HEADER_TRACEPARENT
from spendgate_common.telemetry import (
    COMMAND,
    DECISION,
    ERROR,
    INTERNAL_CODES,
    LATENCY_BUCKETS_S,
    REASON,
    SCOPE,
    SCOPE_NONE,
    VENDOR,
    Counts,
    Telemetry,
    decision_of,
    parse_traceparent,
    reserve_attributes,
    scope_and_reason,
    traceparent_of,
    why_event,
)

# Requests that are not calls: probes and scrapes get no span.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_TRACEPARENT_HEADER = HEADER_TRACEPARENT.encode()

Send_ = Callable[[AnyCommand, str], Awaitable[AnyResult]]


class GatewayTelemetry:
    """The gateway's instruments, built once from the process's :class:`Telemetry`."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        meter = telemetry.meter
        self.decisions: Counts | None = None
        self.reserve_duration: Histogram | None = None
        self.upstream_duration: Histogram | None = None
        if meter is not None:
            self.decisions = Counts((DECISION, VENDOR, SCOPE, REASON))
            self.decisions.register(
                meter,
                "spendgate.decisions",
                unit="{decision}",
                description="Reserve decisions of proxied calls by outcome, vendor, scope, reason",
            )
            self.reserve_duration = meter.create_histogram(
                "spendgate.reserve.duration",
                unit="s",
                description="Time from asking the ledger for a reservation to its answer",
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
            )
            self.upstream_duration = meter.create_histogram(
                "spendgate.upstream.duration",
                unit="s",
                description="Time from sending a call to the vendor to its response headers",
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
            )

    @property
    def active(self) -> bool:
        return self.telemetry.active

    def ledger_observer(self) -> LedgerObserver | None:
        return LedgerObserver(self) if self.active else None

    def upstream_observer(self, vendor: str) -> UpstreamObserver | None:
        """What times and traces ``vendor``'s exchanges; None when telemetry is off."""
        return UpstreamObserver(self, vendor) if self.active else None

    async def metrics_response(self) -> Response:
        body, content_type = await asyncio.to_thread(self.telemetry.exposition)
        return Response(body, media_type=content_type)


class LedgerObserver:
    """Wraps every ledger command of the gateway: a client span whose ``traceparent`` the
    ledger client sends along, and for a reserve the decision metrics and attributes."""

    def __init__(self, telemetry: GatewayTelemetry) -> None:
        self._tracer = telemetry.tracer
        self.traces = telemetry.tracer is not None
        self._decisions = telemetry.decisions
        self._duration = telemetry.reserve_duration

    async def execute(self, command: AnyCommand, send: Send_) -> AnyResult:
        """``send(command, traceparent)`` inside the command's client span."""
        span: Span | None = None
        traceparent = ""
        if self._tracer is not None:
            name = type(command).__name__
            span = self._tracer.start_span(
                f"ledger.request {name}",
                kind=SpanKind.CLIENT,
                attributes={COMMAND: name, "messaging.system": "nats"},
            )
            traceparent = traceparent_of(span.get_span_context())
        started = time.perf_counter()
        try:
            result = await send(command, traceparent)
        except LedgerUnavailableError as error:
            self._failed(command, error, span, time.perf_counter() - started)
            raise
        except BaseException:
            if span is not None:
                span.end()
            raise
        if isinstance(command, Reserve):
            self._decided(command, result, span, time.perf_counter() - started)
        elif span is not None:
            if isinstance(result, Failed):
                _mark(span, result)
            span.end()
        return result

    def _decided(
        self, command: Reserve, result: AnyResult, span: Span | None, seconds: float
    ) -> None:
        decision = decision_of(result)
        if self._decisions is not None and self._duration is not None:
            scope, reason = scope_and_reason(result)
            self._decisions.add((decision, command.vendor, scope, reason))
            self._duration.record(seconds, {DECISION: decision, VENDOR: command.vendor})
        if span is not None:
            attributes = reserve_attributes(command, result)
            server = trace.get_current_span()
            for target in (span, server):
                target.set_attributes(attributes)
                _mark(target, result)
            span.end()

    def _failed(
        self, command: AnyCommand, error: LedgerUnavailableError, span: Span | None, seconds: float
    ) -> None:
        if isinstance(command, Reserve):
            if self._decisions is not None and self._duration is not None:
                self._decisions.add((ERROR, command.vendor, SCOPE_NONE, error.code))
                self._duration.record(seconds, {DECISION: ERROR, VENDOR: command.vendor})
            trace.get_current_span().set_attributes({DECISION: ERROR, REASON: error.code})
        if span is not None:
            span.set_attributes({REASON: error.code, "error.type": type(error).__name__})
            span.set_status(Status(StatusCode.ERROR, error.code))
            span.end()


def _mark(span: Span, result: AnyResult) -> None:
    """The span event saying why a call was stopped or refused; an error status only for
    the ledger's own failures (a stop or a bad key is not a failure of Spendgate)."""
    event = why_event(result)
    if event is not None:
        span.add_event(*event)
    if isinstance(result, Failed) and result.code in INTERNAL_CODES:
        span.set_status(Status(StatusCode.ERROR, result.code))


class ServerSpans:
    """ASGI middleware: one SERVER span per HTTP request (not for probes and scrapes),
    child of the caller's ``traceparent`` when it sent a valid one, current while the
    request is handled (so the ledger's client spans and log lines belong to it).

    Recorded: method, route template, status. Never the path's values, the query, a
    header or the body: they may carry keys and customer data.
    """

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self._app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self._app(scope, receive, send)
            return
        method = str(scope["method"])
        parent = None
        for name, value in scope["headers"]:
            if name == _TRACEPARENT_HEADER:
                remote = parse_traceparent(value.decode("latin-1"))
                if remote is not None:
                    parent = trace.set_span_in_context(NonRecordingSpan(remote))
                break
        span = self._tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER, attributes={"http.request.method": method}
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_status)
        except BaseException as error:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            if status:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(Status(StatusCode.ERROR))
            span.end()
            otel_context.detach(token)


class UpstreamObserver:
    """A vendor's exchanges, timed to the response headers (streams are read later), with
    a CLIENT span when tracing is on. The vendor's key is in the request's headers, which
    are never recorded, nor is the path or the query."""

    def __init__(self, telemetry: GatewayTelemetry, vendor: str) -> None:
        self.vendor = vendor
        self.tracer = telemetry.tracer
        self.duration = telemetry.upstream_duration

    def start(self, method: bytes, host: str) -> _UpstreamExchange:
        span: Span | None = None
        if self.tracer is not None:
            span = self.tracer.start_span(
                f"upstream {self.vendor}",
                kind=SpanKind.CLIENT,
                attributes={
                    VENDOR: self.vendor,
                    "http.request.method": method.decode("ascii"),
                    "server.address": host,
                },
            )
        return _UpstreamExchange(self, span)


class _UpstreamExchange:
    __slots__ = ("_observer", "_span", "_started")

    def __init__(self, observer: UpstreamObserver, span: Span | None) -> None:
        self._observer = observer
        self._span = span
        self._started = time.perf_counter()

    def answered(self, status_code: int) -> None:
        self._measure({"http.response.status_code": status_code})
        if self._span is not None:
            if status_code >= 500:
                self._span.set_status(Status(StatusCode.ERROR))
            self._span.end()

    def failed(self, error: BaseException) -> None:
        self._measure({"error.type": type(error).__name__})
        if self._span is not None:
            self._span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            self._span.end()

    def _measure(self, outcome: dict[str, str | int]) -> None:
        observer = self._observer
        if observer.duration is not None:
            seconds = time.perf_counter() - self._started
            observer.duration.record(seconds, {VENDOR: observer.vendor, **outcome})
        if self._span is not None:
            self._span.set_attributes(outcome)
