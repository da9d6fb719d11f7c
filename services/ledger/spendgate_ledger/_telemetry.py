"""The ledger's traces and metrics (docs/operations.md).

Trace shape: the gateway sends one ``traceparent`` per command (a request carries many,
see spendgate_common.subjects). For a batch in which at least one command is traced::

    ledger.batch                 INTERNAL  child of the first traced command's caller
    └── ledger.append            CLIENT    the one Postgres transaction of the batch
    ledger.command Reserve       SERVER    child of its caller's client span, linked to
                                           the ledger.batch that appended and committed it

The batch span is the child of a caller's context (not a root) so that it is sampled
exactly when that caller's trace is: under any parent-based sampler the link of every
traced command of the batch points at a span that was kept. Each event a traced command
produced is published with that command span's ``traceparent`` (the relay adds the
header), so the auditor's span for the event links back to it.

Nothing here runs when tracing is off (``tracer`` is None: no contexts are parsed, no
span is built) except the per-batch metrics, and those only when metrics are on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
)

from spendgate_common.ledger_v1 import (
    AnyCommand,
    AnyResult,
    Commit,
    Failed,
    MarkUnknown,
    Release,
    Reserve,
    Settled,
)
from spendgate_common.subjects import HEADER_TRACEPARENT, HEADER_TRACEPARENTS
from spendgate_common.telemetry import (
    ACTUAL,
    APPEND_DURATION_MS,
    BATCH_COMMANDS,
    BATCH_EVENTS,
    BATCH_REQUESTS,
    COMMAND,
    INTERNAL_CODES,
    LATENCY_BUCKETS_S,
    LEASE_CHANGE,
    PARTITION,
    REASON,
    RECORD,
    RESERVATION_ID,
    SEQ_FIRST,
    SEQ_LAST,
    SNAPSHOT_OUTCOME,
    Attributes,
    Counts,
    Telemetry,
    parse_traceparent,
    reserve_attributes,
    traceparent_of,
    why_event,
)
from spendgate_ledger._state import Sweep
from spendgate_ledger._store import EventRow

# Bucket bounds of the batch size histogram, in commands (up to the largest batch).
BATCH_COMMANDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 65536)
# A snapshot takes from milliseconds (a small state) to minutes (the child gets no idle
# CPU; it is killed after 5).
SNAPSHOT_DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """A request's trace context: its callers' span contexts, one per command (None for
    an untraced or unsampled one), and when it arrived (the command spans start there)."""

    parents: list[SpanContext | None]
    received_ns: int


@dataclass(slots=True)
class BatchTrace:
    """The spans of one batch, started before it is applied (so the events can carry the
    command spans' context), ended after its replies."""

    span: Span
    requests: int
    # Per command of the batch, in order: its span and traceparent (None, b"" untraced).
    commands: list[tuple[Span, bytes] | None]

    def event_traceparents(self, rows: Sequence[EventRow], ends: Sequence[int]) -> dict[int, bytes]:
        """seq -> traceparent of the command span that produced it, for the relay.

        ``ends[i]`` is the number of rows after command ``i`` was applied.
        """
        found: dict[int, bytes] = {}
        start = 0
        for traced, end in zip(self.commands, ends, strict=True):
            if traced is not None:
                for row in rows[start:end]:
                    found[row.seq] = traced[1]
            start = end
        return found


class LedgerTelemetry:
    """The ledger's instruments, built once from the process's :class:`Telemetry`."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.tracer = telemetry.tracer
        self.meter = telemetry.meter
        self.events_appended = Counts(())
        self.lease_changes = Counts((LEASE_CHANGE,))
        self.refusals = Counts((REASON,))
        self.snapshots = Counts((SNAPSHOT_OUTCOME,))
        self._batch_commands: Histogram | None = None
        self._append_duration: Histogram | None = None
        self._snapshot_duration: Histogram | None = None
        meter = self.meter
        if meter is None:
            return
        self._batch_commands = meter.create_histogram(
            "spendgate.ledger.batch.commands",
            unit="{command}",
            description="Commands applied and appended together in one group commit",
            explicit_bucket_boundaries_advisory=BATCH_COMMANDS_BUCKETS,
        )
        self._append_duration = meter.create_histogram(
            "spendgate.ledger.append.duration",
            unit="s",
            description="Time of a batch's append (one Postgres transaction, fenced)",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.events_appended.register(
            meter,
            "spendgate.ledger.events.appended",
            unit="{event}",
            description="Events appended to the log (committed)",
        )
        self.lease_changes.register(
            meter,
            "spendgate.ledger.lease.changes",
            unit="{partition}",
            description="Partition leases acquired, released (handed over) and lost",
        )
        self.refusals.register(
            meter,
            "spendgate.ledger.requests.refused",
            unit="{request}",
            description="Requests refused before the partition loop: not_owner, overloaded",
        )
        self.snapshots.register(
            meter,
            "spendgate.ledger.snapshots",
            unit="{snapshot}",
            description="Partition snapshots stored or failed (recovery replays from the last one)",
        )
        self._snapshot_duration = meter.create_histogram(
            "spendgate.ledger.snapshot.duration",
            unit="s",
            description="Time from a snapshot's fork to its child's exit (encoded and stored)",
            explicit_bucket_boundaries_advisory=SNAPSHOT_DURATION_BUCKETS_S,
        )

    @property
    def active(self) -> bool:
        return self.telemetry.active

    @property
    def tracing(self) -> bool:
        return self.tracer is not None

    def watch(
        self,
        partitions_owned: Callable[[], int],
        relay_backlogs: Callable[[], Mapping[int, int]],
        queued_requests: Callable[[], int],
        remembered: Callable[[], Mapping[str, int]],
    ) -> None:
        """Gauges read when metrics are collected (in the collecting thread)."""
        meter = self.meter
        if meter is None:
            return

        def owned(_: CallbackOptions) -> list[Observation]:
            return [Observation(partitions_owned())]

        def backlogs(_: CallbackOptions) -> list[Observation]:
            return [Observation(n, {PARTITION: p}) for p, n in relay_backlogs().items()]

        def queued(_: CallbackOptions) -> list[Observation]:
            return [Observation(queued_requests())]

        def records(_: CallbackOptions) -> list[Observation]:
            return [Observation(n, {RECORD: kind}) for kind, n in remembered().items()]

        meter.create_observable_gauge(
            "spendgate.ledger.partitions.owned",
            [owned],
            unit="{partition}",
            description="Partitions this replica owns",
        )
        meter.create_observable_gauge(
            "spendgate.ledger.relay.backlog",
            [backlogs],
            unit="{event}",
            description="Committed events not yet acknowledged by JetStream, per partition",
        )
        meter.create_observable_gauge(
            "spendgate.ledger.queue.requests",
            [queued],
            unit="{request}",
            description="Requests waiting for the partition loops of this replica",
        )
        meter.create_observable_gauge(
            "spendgate.ledger.state.records",
            [records],
            unit="{record}",
            description="What the partitions this replica owns remember: settled reservation"
            " ids, idempotency answers, open holds (its memory grows with them)",
        )

    # ---------------------------------------------------------------------- tracing

    def request_trace(self, headers: Mapping[str, str] | None, count: int) -> RequestTrace | None:
        """The trace context of a request of ``count`` commands, if it carries one."""
        if not headers:
            return None
        listed = headers.get(HEADER_TRACEPARENTS)
        if listed is not None:
            values = listed.split(",", count)
            if len(values) != count:
                return None
        elif count == 1 and HEADER_TRACEPARENT in headers:
            values = [headers[HEADER_TRACEPARENT]]
        else:
            return None
        parents = [_sampled(value) for value in values]
        if not any(parents):
            return None
        return RequestTrace(parents, time.time_ns())

    def begin_batch(
        self,
        partition: int,
        traces: Sequence[RequestTrace | None],
        counts: Sequence[int],
        joining: BatchTrace | None = None,
        before: tuple[int, int] = (0, 0),
    ) -> BatchTrace | None:
        """Start the spans of a batch whose requests carry ``traces`` (``counts``: their
        numbers of commands); None when no command is traced.

        A batch grows while the append before it is in flight: ``joining`` is its trace
        so far (the new requests' spans join it), or None with ``before`` = (requests,
        commands) already in the batch, untraced, when these are its first traced ones.
        """
        tracer = self.tracer
        if tracer is None or not any(traces):
            if joining is not None:
                joining.requests += len(traces)
                joining.commands.extend([None] * sum(counts))
            return joining
        batch_trace = joining
        if batch_trace is None:
            first = next(p for t in traces if t is not None for p in t.parents if p is not None)
            batch_span = tracer.start_span(
                "ledger.batch",
                context=trace.set_span_in_context(NonRecordingSpan(first)),
                attributes={PARTITION: partition},
                start_time=time.time_ns(),
            )
            batch_trace = BatchTrace(batch_span, before[0], [None] * before[1])
        link = [Link(batch_trace.span.get_span_context())]
        commands = batch_trace.commands
        for request_trace, count in zip(traces, counts, strict=True):
            if request_trace is None:
                commands.extend([None] * count)
                continue
            for parent in request_trace.parents:
                if parent is None:
                    commands.append(None)
                    continue
                span = tracer.start_span(
                    "ledger.command",
                    context=trace.set_span_in_context(NonRecordingSpan(parent)),
                    kind=SpanKind.SERVER,
                    attributes={PARTITION: partition},
                    links=link,
                    start_time=request_trace.received_ns,
                )
                commands.append((span, traceparent_of(span.get_span_context()).encode()))
        batch_trace.requests += len(traces)
        return batch_trace

    def snapshot_done(self, stored: bool, duration_s: float) -> None:
        """Record a snapshot child's end: stored, or failed (killed, or an error)."""
        self.snapshots.add(("stored" if stored else "failed",))
        if self._snapshot_duration is not None:
            self._snapshot_duration.record(duration_s)

    def end_batch(
        self,
        batch_trace: BatchTrace | None,
        commands: Sequence[Sequence[AnyCommand | Sweep]],
        replies: Sequence[Sequence[AnyResult]],
        rows: Sequence[EventRow],
        append_ns: tuple[int, int],
        failure: Failed | None,
    ) -> None:
        """Record a processed batch (after its replies): metrics, and end its spans.

        ``commands`` and ``replies`` are the batch's, per request; ``append_ns`` is when
        its append started and ended.
        """
        count = sum(len(request) for request in commands)
        if self._batch_commands is not None and self._append_duration is not None:
            self._batch_commands.record(count)
            if rows and failure is None:
                self._append_duration.record((append_ns[1] - append_ns[0]) / 1e9)
                self.events_appended.add((), len(rows))
        if batch_trace is None:
            return
        ended_ns = time.time_ns()
        flat = zip(
            batch_trace.commands,
            (command for request in commands for command in request),
            (result for results in replies for result in results),
            strict=True,
        )
        for traced, command, result in flat:
            if traced is not None:
                _end_command(traced[0], command, result, ended_ns)
        self._end_batch_span(batch_trace, count, rows, append_ns, failure, ended_ns)

    def _end_batch_span(
        self,
        batch_trace: BatchTrace,
        command_count: int,
        rows: Sequence[EventRow],
        append_ns: tuple[int, int],
        failure: Failed | None,
        ended_ns: int,
    ) -> None:
        span = batch_trace.span
        attributes: Attributes = {
            BATCH_COMMANDS: command_count,
            BATCH_EVENTS: len(rows),
            BATCH_REQUESTS: batch_trace.requests,
        }
        if rows:
            attributes[SEQ_FIRST] = rows[0].seq
            attributes[SEQ_LAST] = rows[-1].seq
            attributes[APPEND_DURATION_MS] = (append_ns[1] - append_ns[0]) / 1e6
            assert self.tracer is not None
            append = self.tracer.start_span(
                "ledger.append",
                context=trace.set_span_in_context(span),
                kind=SpanKind.CLIENT,
                attributes={"db.system.name": "postgresql", BATCH_EVENTS: len(rows)},
                start_time=append_ns[0],
            )
            if failure is not None:
                append.set_status(Status(StatusCode.ERROR, failure.code))
            append.end(end_time=append_ns[1])
        span.set_attributes(attributes)
        if failure is not None:
            span.set_attribute(REASON, failure.code)
            span.set_status(Status(StatusCode.ERROR, failure.code))
        span.end(end_time=ended_ns)


def _sampled(value: str) -> SpanContext | None:
    context = parse_traceparent(value) if value else None
    return context if context is not None and context.trace_flags.sampled else None


def _end_command(span: Span, command: AnyCommand | Sweep, result: AnyResult, ended_ns: int) -> None:
    name = type(command).__name__
    span.update_name(f"ledger.command {name}")
    span.set_attribute(COMMAND, name)
    if isinstance(command, Reserve):
        span.set_attributes(reserve_attributes(command, result))
    elif isinstance(command, Commit | Release | MarkUnknown):
        span.set_attribute(RESERVATION_ID, command.reservation_id)
    if isinstance(result, Settled):
        span.set_attribute(ACTUAL, result.actual_micros)
    event = why_event(result)
    if event is not None:
        span.add_event(*event, timestamp=ended_ns)
    if isinstance(result, Failed):
        span.set_attribute(REASON, result.code)
        if result.code in INTERNAL_CODES:
            span.set_status(Status(StatusCode.ERROR, result.code))
    span.end(end_time=ended_ns)
