"""OpenTelemetry for every service: traces, metrics, and trace ids in the JSON logs.

Configuration is the standard ``OTEL_*`` environment variables (docs/operations.md):

* ``OTEL_SDK_DISABLED=true`` turns everything off: no tracer, no meter, nothing on the
  hot path but a ``None`` check (``/metrics`` then carries only the process's own CPU,
  memory and GC figures).
* Traces are exported only when there is somewhere to send them: ``OTEL_TRACES_EXPORTER``
  (``otlp``, ``console`` or ``none``), or, when it is unset, an OTLP endpoint
  (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Without
  either, tracing is off and costs nothing: no span objects, no header encoding.
* Metrics are always on (``/metrics`` in Prometheus format) and are also pushed by OTLP
  when an endpoint is configured; ``OTEL_METRICS_EXPORTER`` (``prometheus``, ``otlp``,
  ``none``, comma-separated) overrides that choice.
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` pick the sampler (default
  ``parentbased_always_on``). ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, the
  ``OTEL_EXPORTER_OTLP_*`` details (headers, timeouts, certificates, compression) and the
  ``OTEL_BSP_*`` / ``OTEL_METRIC_EXPORT_*`` batching knobs are read by the SDK itself,
  as the specification says.

Also here: the W3C ``traceparent`` encoding used in NATS headers (written by hand: the
propagator API would cost a carrier dict and a regex per command), and the one naming
scheme of Spendgate's span and metric attributes (``spendgate.*``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import SpanContext, TraceFlags, Tracer
from opentelemetry.util.types import AttributeValue
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from spendgate_common.errors import ConfigurationError
from spendgate_common.ledger_v1 import (
    AnyResult,
    ApprovalPending,
    Degrade,
    Denied,
    Failed,
    Granted,
    Reserve,
)
from spendgate_common.settings import Env

INSTRUMENTATION_SCOPE = "spendgate"
TRACES_EXPORTERS = frozenset({"otlp", "console", "none"})
METRICS_EXPORTERS = frozenset({"otlp", "prometheus", "none"})
SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
# Histogram bucket bounds (seconds) for every latency Spendgate measures: a reserve is a
# millisecond or two, an upstream call up to the read timeout.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """What the ``OTEL_*`` variables ask for, parsed once at start (fails fast by name)."""

    sdk_disabled: bool = False
    # Where spans go: "otlp", "console" or "none" (tracing off).
    traces_exporter: str = "none"
    # Where metrics go: any of "prometheus" (the /metrics endpoint) and "otlp" (push).
    metrics_exporters: frozenset[str] = field(default_factory=lambda: frozenset({"prometheus"}))
    sampler: str = "parentbased_always_on"
    # The ratio of the *traceidratio samplers, 0..1.
    sampler_ratio: float = 1.0

    @property
    def tracing(self) -> bool:
        return not self.sdk_disabled and self.traces_exporter != "none"

    @property
    def metrics(self) -> bool:
        return not self.sdk_disabled and bool(self.metrics_exporters)

    @classmethod
    def from_env(cls, env: Env) -> TelemetrySettings:
        disabled = _boolean(env, "OTEL_SDK_DISABLED")
        endpoint = env.standard("OTEL_EXPORTER_OTLP_ENDPOINT")
        traces_endpoint = endpoint or env.standard("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        metrics_endpoint = endpoint or env.standard("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        traces = _choices(env, "OTEL_TRACES_EXPORTER", TRACES_EXPORTERS)
        if traces is None:
            traces_exporter = "otlp" if traces_endpoint else "none"
        elif len(traces) != 1:
            raise ConfigurationError("OTEL_TRACES_EXPORTER", "name one exporter")
        else:
            (traces_exporter,) = traces
        metrics = _choices(env, "OTEL_METRICS_EXPORTER", METRICS_EXPORTERS)
        if metrics is None:
            metrics = frozenset({"prometheus", "otlp"} if metrics_endpoint else {"prometheus"})
        sampler = (env.standard("OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
        if sampler not in SAMPLERS:
            raise ConfigurationError("OTEL_TRACES_SAMPLER", f"must be one of {sorted(SAMPLERS)}")
        return cls(
            sdk_disabled=disabled,
            traces_exporter=traces_exporter,
            metrics_exporters=metrics - {"none"},
            sampler=sampler,
            sampler_ratio=_ratio(env) if sampler.endswith("traceidratio") else 1.0,
        )


def _boolean(env: Env, name: str) -> bool:
    value = (env.standard(name) or "false").lower()
    if value not in ("true", "false"):
        raise ConfigurationError(name, f"must be true or false, got {value!r}")
    return value == "true"


def _choices(env: Env, name: str, allowed: frozenset[str]) -> frozenset[str] | None:
    value = env.standard(name)
    if value is None:
        return None
    chosen = frozenset(part.strip().lower() for part in value.split(",") if part.strip())
    if not chosen or not chosen <= allowed:
        raise ConfigurationError(name, f"must be among {sorted(allowed)}, got {value!r}")
    return chosen


def _ratio(env: Env) -> float:
    value = env.standard("OTEL_TRACES_SAMPLER_ARG")
    if value is None:
        return 1.0
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigurationError("OTEL_TRACES_SAMPLER_ARG", f"must be 0..1, got {value!r}")
    return ratio


def _sampler(settings: TelemetrySettings) -> sampling.Sampler:
    root: sampling.Sampler
    name = settings.sampler.removeprefix("parentbased_")
    if name == "always_on":
        root = sampling.ALWAYS_ON
    elif name == "always_off":
        root = sampling.ALWAYS_OFF
    else:
        root = sampling.TraceIdRatioBased(settings.sampler_ratio)
    return sampling.ParentBased(root) if settings.sampler.startswith("parentbased_") else root


class Telemetry:
    """One process's telemetry. ``tracer`` is None when tracing is off and ``meter`` is
    None when metrics are off: callers test for None and do nothing else."""

    def __init__(
        self,
        tracer: Tracer | None = None,
        meter: Meter | None = None,
        *,
        registry: CollectorRegistry | None = None,
        providers: tuple[TracerProvider | MeterProvider, ...] = (),
    ) -> None:
        self.tracer = tracer
        self.meter = meter
        self._registry = registry
        self._providers = providers

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls()

    @property
    def active(self) -> bool:
        return self.tracer is not None or self.meter is not None

    @classmethod
    def start(cls, settings: TelemetrySettings, service: str) -> Telemetry:
        """Build the SDK's providers for ``service`` (``gateway``, ``ledger``, ``auditor``).

        Nothing is made global: the tracer and meter are passed to whoever needs them.
        """
        registry = CollectorRegistry(auto_describe=True)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        if settings.sdk_disabled:
            return cls(registry=registry)
        resource = Resource.create({"service.namespace": "spendgate"})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named the service.
            resource = resource.merge(Resource({"service.name": f"spendgate-{service}"}))
        providers: list[TracerProvider | MeterProvider] = []
        tracer: Tracer | None = None
        if settings.tracing:
            tracer_provider = TracerProvider(
                sampler=_sampler(settings), resource=resource, shutdown_on_exit=False
            )
            tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(settings)))
            tracer = tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
            providers.append(tracer_provider)
        meter: Meter | None = None
        if settings.metrics:
            readers: list[MetricReader] = []
            if "prometheus" in settings.metrics_exporters:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader

                readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))
            if "otlp" in settings.metrics_exporters:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            meter_provider = MeterProvider(
                metric_readers=readers, resource=resource, shutdown_on_exit=False
            )
            meter = meter_provider.get_meter(INSTRUMENTATION_SCOPE)
            providers.append(meter_provider)
        return cls(tracer, meter, registry=registry, providers=tuple(providers))

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type.

        Synchronous and a few milliseconds: callers run it in a worker thread.
        """
        if self._registry is None:
            return b"", CONTENT_TYPE_LATEST
        return generate_latest(self._registry), CONTENT_TYPE_LATEST

    def shutdown(self, deadline: timedelta) -> None:
        """Flush what is buffered (spans, a last metrics push) and stop, within ``deadline``.

        Runs in a daemon thread joined with the deadline: an unreachable collector must
        not hold a stopping process past its grace period.
        """
        providers, self._providers = self._providers, ()
        if not providers:
            return
        deadline_ms = int(deadline.total_seconds() * 1000)

        def flush_and_stop() -> None:
            for provider in providers:
                provider.force_flush(deadline_ms)
                provider.shutdown()

        worker = threading.Thread(target=flush_and_stop, name="telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(deadline.total_seconds())


def _span_exporter(settings: TelemetrySettings) -> SpanExporter:
    if settings.traces_exporter == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


# --------------------------------------------------------------------- trace context

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def traceparent_of(context: SpanContext) -> str:
    """The W3C ``traceparent`` value of ``context`` (version 00)."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def parse_traceparent(value: str) -> SpanContext | None:
    """The remote span context a ``traceparent`` value names; None when it is malformed
    (W3C Trace Context: version 00, lowercase hex, trace and span ids not all zeros)."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = int(match.group(1), 16), int(match.group(2), 16)
    if trace_id == 0 or span_id == 0:
        return None
    flags = TraceFlags(int(match.group(3), 16) & TraceFlags.SAMPLED)
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span current in this context, if there is one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# ------------------------------------------------------------------------ attributes
# One naming scheme for span and metric attributes. Amounts are integer micro-USD.

DECISION = "spendgate.decision"  # allow | stop | require_approval | degrade | refused | error
# The scope that decided: key | fleet | vendor | tenant for a stop, contract for an
# approval or a degrade, all for an allow (every scope had room), none for the rest.
SCOPE = "spendgate.scope"
BUDGET_ID = "spendgate.budget_id"  # that scope's id (the key id for the key scope)
AMOUNT_REQUESTED = "spendgate.amount_requested_micros"
ACTUAL = "spendgate.actual_micros"  # the actual cost a commit settled at
REMAINING_AFTER = "spendgate.remaining_after_micros"
VENDOR = "spendgate.vendor"
OPERATION = "spendgate.operation"
RESERVATION_ID = "spendgate.reservation_id"
APPROVAL_ID = "spendgate.approval_id"
CONTRACT = "spendgate.contract"  # the contract that asked for an approval or a degrade
DECISION_ID = "spendgate.decision_id"
KEY_ID = "spendgate.key_id"
REASON = "spendgate.reason"  # the stable code of a stop, refusal or error
REPLAYED = "spendgate.replayed"
COMMAND = "spendgate.command"
PARTITION = "spendgate.partition"
BATCH_COMMANDS = "spendgate.batch.commands"  # the batch size
BATCH_REQUESTS = "spendgate.batch.requests"
BATCH_EVENTS = "spendgate.batch.events"
BATCH_MESSAGES = "spendgate.batch.messages"  # messages an auditor batch fetched
BATCH_CHAINED = "spendgate.batch.chained"  # of which chained (not duplicates, not held)
SEQ = "spendgate.seq"
SEQ_FIRST = "spendgate.seq.first"
SEQ_LAST = "spendgate.seq.last"
APPEND_DURATION_MS = "spendgate.append.duration_ms"
EVENT_TYPE = "spendgate.event.type"
AUDIT_OUTCOME = "spendgate.audit.outcome"  # chained | duplicate | held
LEASE_CHANGE = "spendgate.lease.change"  # acquired | released | lost
SNAPSHOT_OUTCOME = "spendgate.snapshot.outcome"  # stored | failed
RECORD = "spendgate.record"  # settled_id | answer | hold: what a ledger replica remembers
SETTLEMENT = "spendgate.settlement"  # committed | expired: how a hold counted as spent

# Span events.
EVENT_STOPPED = "spendgate.stopped"  # a stop: why (reason, scope, budget, the message)
EVENT_REFUSED = "spendgate.refused"  # a refusal: its code and message
EVENT_CONTRACT = "spendgate.contract"  # a contract asked for an approval or a degrade

# Decisions (DESIGN.md) and the two outcomes that are not decisions (the values of DECISION).
ALLOW, STOP, REQUIRE_APPROVAL, DEGRADE = "allow", "stop", "require_approval", "degrade"
REFUSED, ERROR = "refused", "error"
# SCOPE of an allow (every scope had room) and of a refusal or error (none decided).
SCOPE_ALL, SCOPE_NONE = "all", "none"

# Refusals that are the ledger's own trouble, not the caller's: an error on a span.
INTERNAL_CODES = frozenset({"store_unavailable", "not_owner", "overloaded", "ledger_unavailable"})

Attributes = dict[str, AttributeValue]


def decision_of(result: AnyResult) -> str:
    if isinstance(result, Granted):
        return ALLOW
    if isinstance(result, Denied):
        return STOP
    if isinstance(result, ApprovalPending):
        return REQUIRE_APPROVAL
    if isinstance(result, Degrade):
        return DEGRADE
    return REFUSED


def scope_and_reason(result: AnyResult) -> tuple[str, str]:
    """The scope that decided and the reason code (``none`` for an allow)."""
    if isinstance(result, Granted):
        return SCOPE_ALL, "none"
    if isinstance(result, Denied):
        return result.scope, result.code
    if isinstance(result, Failed):
        return SCOPE_NONE, result.code
    if isinstance(result, ApprovalPending | Degrade):
        return "contract", "none"
    return SCOPE_NONE, "none"


def reserve_attributes(command: Reserve, result: AnyResult) -> Attributes:
    """What a reserve asked and what was decided, for a span. No secret, no body."""
    attributes: Attributes = {
        DECISION: decision_of(result),
        VENDOR: command.vendor,
        OPERATION: command.operation,
        KEY_ID: command.key_id,
        AMOUNT_REQUESTED: command.amount_micros,
    }
    if isinstance(result, Granted):
        attributes[SCOPE] = SCOPE_ALL
        attributes[RESERVATION_ID] = result.reservation_id
        # The key's own remaining after the hold (every other scope had room too).
        attributes[REMAINING_AFTER] = max(
            0, result.cap_micros - result.committed_micros - result.reserved_micros
        )
        attributes[REPLAYED] = result.replayed
    elif isinstance(result, Denied):
        attributes[SCOPE] = result.scope
        attributes[BUDGET_ID] = result.scope_id
        attributes[DECISION_ID] = result.decision_id
        attributes[REASON] = result.code
        attributes[REMAINING_AFTER] = max(
            0, result.cap_micros - result.committed_micros - result.reserved_micros
        )
        attributes[REPLAYED] = result.replayed
    elif isinstance(result, ApprovalPending):
        attributes[SCOPE] = "contract"
        attributes[CONTRACT] = result.contract
        attributes[APPROVAL_ID] = result.approval_id
        attributes[REPLAYED] = result.replayed
    elif isinstance(result, Degrade):
        attributes[SCOPE] = "contract"
        attributes[CONTRACT] = result.contract
        attributes[REMAINING_AFTER] = result.remaining_micros
    elif isinstance(result, Failed):
        attributes[SCOPE] = SCOPE_NONE
        attributes[REASON] = result.code
    return attributes


def why_event(result: AnyResult) -> tuple[str, Attributes] | None:
    """The span event that says why a call was stopped or refused (None for the rest)."""
    if isinstance(result, Denied):
        return EVENT_STOPPED, {
            REASON: result.code,
            SCOPE: result.scope,
            BUDGET_ID: result.scope_id,
            "message": result.message,
        }
    if isinstance(result, Failed):
        return EVENT_REFUSED, {REASON: result.code, "message": result.message}
    if isinstance(result, ApprovalPending | Degrade):
        return EVENT_CONTRACT, {CONTRACT: result.contract, "message": result.message}
    return None


# ---------------------------------------------------------------------------- metrics


# Most label sets one counter keeps; later new ones are counted under OVERFLOW_LABEL.
LABEL_SETS_MAX = 2_000
OVERFLOW_LABEL = "_overflow"


class Counts:
    """Monotonic counts by a tuple of label values, reported by an observable counter.

    On a hot path a dict increment (about 0.1 us) replaces the SDK's synchronous
    ``Counter.add`` (several microseconds: attribute hashing, a lock, exemplars); the SDK
    reads the totals when it collects. Collection runs in another thread: copying the
    items with ``list()`` is one C-level step under the GIL, so it never sees the dict
    change size. Label values must come from bounded sets.
    """

    def __init__(self, label_names: tuple[str, ...]) -> None:
        self._label_names = label_names
        self._totals: dict[tuple[str, ...], int] = {}
        self._overflow = (OVERFLOW_LABEL,) * len(label_names)

    def add(self, labels: tuple[str, ...], amount: int = 1) -> None:
        totals = self._totals
        if labels not in totals and len(totals) >= LABEL_SETS_MAX:
            # A bound on memory and on the scrape (as the SDK's cardinality limit).
            labels = self._overflow
        totals[labels] = totals.get(labels, 0) + amount

    def observe(self, _: CallbackOptions) -> list[Observation]:
        names = self._label_names
        return [
            Observation(total, dict(zip(names, labels, strict=True)))
            for labels, total in list(self._totals.items())
        ]

    def register(self, meter: Meter, name: str, *, unit: str, description: str) -> None:
        meter.create_observable_counter(name, [self.observe], unit=unit, description=description)
