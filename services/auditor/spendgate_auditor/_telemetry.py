"""The auditor's traces and metrics (docs/operations.md).

Trace shape: the relay publishes each traced event with the ``traceparent`` of the ledger
span of the command that produced it. For a batch (the events chained in one transaction)
in which at least one event carries a sampled one::

    auditor.batch           INTERNAL  child of the first traced event's producer
    └── auditor.event       CONSUMER  one per traced event, linked to its producer (the
                                      ledger.command span): partition, seq, type, outcome

The batch span is a child (not a root) for the same reason as the ledger's batch span:
it is sampled exactly when that producer's trace is.

Metrics are read from the service's counters when they are collected (observable
instruments: nothing is recorded on the chaining path), plus the spend counter, fed from
the batch's finance rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanKind, Status, StatusCode

from spendgate_auditor._plan import BatchPlan, Delivery
from spendgate_auditor._rollup import FinanceRow
from spendgate_common import audit_v1, finance_v1
from spendgate_common.telemetry import (
    AUDIT_OUTCOME,
    BATCH_CHAINED,
    BATCH_MESSAGES,
    EVENT_TYPE,
    PARTITION,
    REASON,
    SEQ,
    SETTLEMENT,
    VENDOR,
    Counts,
    Telemetry,
    parse_traceparent,
)


class _EventType(msgspec.Struct):
    type: str = ""


class _SettledData(msgspec.Struct):
    vendor: str = ""
    outcome: str = ""
    spent_micros: int = 0


class _FinanceEvent(msgspec.Struct):
    type: str = ""
    data: _SettledData | None = None


_event_type = msgspec.json.Decoder(_EventType)
_finance_event = msgspec.json.Decoder(_FinanceEvent)


@dataclass(slots=True)
class AuditBatchTrace:
    span: Span
    # Per delivery (in the order given to begin_batch): its span, None when not traced.
    events: list[Span | None]
    # (message token, seq) of each delivery, in the same order.
    identities: list[tuple[int, int]]


class AuditorTelemetry:
    """The auditor's instruments, built once from the process's :class:`Telemetry`."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.spend = Counts((VENDOR, SETTLEMENT))
        if telemetry.meter is not None:
            self.spend.register(
                telemetry.meter,
                "spendgate.spend.committed_micros",
                unit="",
                description="Spend that settled (commits at their actual cost, expired holds "
                "at the held amount), in micro-USD, by vendor, as the auditor chained it",
            )

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    def watch(self, status: Callable[[], audit_v1.AuditorStatus]) -> None:
        """The auditor's counters and gauges (docs/audit.md), read at collection."""
        meter = self.telemetry.meter
        if meter is None:
            return

        def reading(
            read: Callable[[audit_v1.AuditorStatus], float],
        ) -> Callable[[CallbackOptions], list[Observation]]:
            return lambda _: [Observation(read(status()))]

        gauges: list[tuple[str, str, str, Callable[[audit_v1.AuditorStatus], float]]] = [
            ("spendgate.auditor.lag.events", "{event}",
             "Events in the stream not yet delivered to the auditor, after its last batch",
             lambda s: s.lag_events),
            ("spendgate.auditor.lag.duration", "s",
             "Age of the last chained event when its batch committed",
             lambda s: s.lag_ms / 1000),
            ("spendgate.auditor.finance.pending", "{event}",
             "Finance events committed but not yet acknowledged by JetStream",
             lambda s: s.finance_pending),
            ("spendgate.auditor.partitions.stalled", "{partition}",
             "Partitions whose chain is stopped behind a gap open past the alarm time",
             lambda s: len(s.stalled_partitions)),
        ]  # fmt: skip
        counters: list[tuple[str, str, str, Callable[[audit_v1.AuditorStatus], float]]] = [
            ("spendgate.auditor.events.chained", "{event}", "Events chained",
             lambda s: s.events_chained),
            ("spendgate.auditor.batches", "{batch}", "Batches committed", lambda s: s.batches),
            ("spendgate.auditor.duplicates", "{event}", "Redeliveries recognised",
             lambda s: s.duplicates),
            ("spendgate.auditor.checkpoints.signed", "{checkpoint}", "Checkpoints signed",
             lambda s: s.checkpoints_signed),
            ("spendgate.auditor.finance.published", "{event}",
             "Finance events acknowledged by JetStream", lambda s: s.finance_published),
            ("spendgate.auditor.gaps", "{gap}", "Gaps met in the event stream",
             lambda s: s.gaps_seen),
            ("spendgate.auditor.gap.alarms", "{alarm}", "Gaps open past the alarm time",
             lambda s: s.gap_alarms),
            ("spendgate.auditor.rollup.skipped", "{event}",
             "Chained events the rollups could not use", lambda s: s.rollup_skipped_events),
        ]  # fmt: skip
        for name, unit, description, read in gauges:
            meter.create_observable_gauge(name, [reading(read)], unit=unit, description=description)
        for name, unit, description, read in counters:
            meter.create_observable_counter(
                name, [reading(read)], unit=unit, description=description
            )

    def settled(self, finance: Sequence[FinanceRow]) -> None:
        """Count the spend of a committed batch's settlements (its finance rows)."""
        if self.telemetry.meter is None:
            return
        for row in finance:
            event = _finance_event.decode(row.body)
            data = event.data
            if event.type == finance_v1.SETTLED_TYPE and data is not None and data.spent_micros:
                self.spend.add((data.vendor, data.outcome), data.spent_micros)

    # ---------------------------------------------------------------------- tracing

    def begin_batch(self, deliveries: Sequence[Delivery], messages: int) -> AuditBatchTrace | None:
        """Start the spans of a batch of ``deliveries`` (from ``messages`` messages); None
        when no event is traced."""
        tracer = self.tracer
        if tracer is None:
            return None
        producers = [_producer(delivery.traceparent) for delivery in deliveries]
        first = next((producer for producer in producers if producer is not None), None)
        if first is None:
            return None
        batch_span = tracer.start_span(
            "auditor.batch",
            context=trace.set_span_in_context(NonRecordingSpan(first)),
            attributes={BATCH_MESSAGES: messages},
        )
        parent = trace.set_span_in_context(batch_span)
        events: list[Span | None] = []
        for delivery, producer in zip(deliveries, producers, strict=True):
            if producer is None:
                events.append(None)
                continue
            events.append(
                tracer.start_span(
                    "auditor.event",
                    context=parent,
                    kind=SpanKind.CONSUMER,
                    links=[Link(producer)],
                    attributes={
                        PARTITION: delivery.partition,
                        SEQ: delivery.seq,
                        EVENT_TYPE: _type_of(delivery.body),
                        "messaging.system": "nats",
                    },
                )
            )
        identities = [(delivery.token, delivery.seq) for delivery in deliveries]
        return AuditBatchTrace(batch_span, events, identities)

    def end_batch(
        self, batch_trace: AuditBatchTrace | None, plan: BatchPlan | None, error: str = ""
    ) -> None:
        """End a batch's spans with each event's outcome (chained, duplicate, held; none
        when the batch failed with ``error`` or held only malformed messages)."""
        if batch_trace is None:
            return
        outcomes: dict[tuple[int, int], str] = {}
        if plan is not None:
            for name, deliveries in (
                ("chained", plan.chained),
                ("duplicate", plan.duplicates),
                ("held", plan.held),
            ):
                outcomes.update(((d.token, d.seq), name) for d in deliveries)
        ended_ns = time.time_ns()
        for identity, span in zip(batch_trace.identities, batch_trace.events, strict=True):
            if span is None:
                continue
            if identity in outcomes:
                span.set_attribute(AUDIT_OUTCOME, outcomes[identity])
            if error:
                span.set_status(Status(StatusCode.ERROR, error))
            span.end(end_time=ended_ns)
        batch = batch_trace.span
        batch.set_attribute(BATCH_CHAINED, sum(o == "chained" for o in outcomes.values()))
        if error:
            batch.set_attribute(REASON, error)
            batch.set_status(Status(StatusCode.ERROR, error))
        batch.end(end_time=ended_ns)


def _producer(value: str | None) -> trace.SpanContext | None:
    context = parse_traceparent(value) if value else None
    return context if context is not None and context.trace_flags.sampled else None


def _type_of(body: bytes) -> str:
    try:
        return _event_type.decode(body).type
    except msgspec.DecodeError:
        return ""
