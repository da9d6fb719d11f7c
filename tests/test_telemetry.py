"""Telemetry without processes: OTEL_* settings, the traceparent codec, trace ids in log
lines, the operations listener (real HTTP on loopback), bounded counters, and how the
ledger reads and the gateway writes per-command trace context."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags

from spendgate_common.errors import ConfigurationError
from spendgate_common.ledger_v1 import AnyResult, Failed, QueryKey
from spendgate_common.ops_http import Check, OpsServer
from spendgate_common.runtime import JsonLineFormatter
from spendgate_common.settings import Env
from spendgate_common.subjects import HEADER_TRACEPARENT, HEADER_TRACEPARENTS
from spendgate_common.telemetry import (
    BATCH_COMMANDS,
    BATCH_REQUESTS,
    LABEL_SETS_MAX,
    OVERFLOW_LABEL,
    Counts,
    Telemetry,
    TelemetrySettings,
    parse_traceparent,
    traceparent_of,
)
from spendgate_gateway._ledger_client import _trace_headers
from spendgate_ledger._store import EventRow
from spendgate_ledger._telemetry import LedgerTelemetry, RequestTrace

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def settings(**environ: str) -> TelemetrySettings:
    return TelemetrySettings.from_env(Env(environ))


def test_tracing_is_off_without_an_exporter_and_metrics_stay_on() -> None:
    plain = settings()
    assert (plain.tracing, plain.metrics, plain.metrics_exporters) == (
        False,
        True,
        frozenset({"prometheus"}),
    )


def test_an_otlp_endpoint_turns_tracing_and_metric_pushes_on() -> None:
    configured = settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318")
    assert configured.traces_exporter == "otlp"
    assert configured.metrics_exporters == {"prometheus", "otlp"}
    traces_only = settings(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://c:4318/v1/traces")
    assert (traces_only.tracing, traces_only.metrics_exporters) == (True, {"prometheus"})


def test_explicit_exporters_and_the_sdk_switch_win() -> None:
    assert not settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://c", OTEL_TRACES_EXPORTER="none").tracing
    assert settings(OTEL_TRACES_EXPORTER="console").tracing
    assert not settings(OTEL_METRICS_EXPORTER="none").metrics
    disabled = settings(OTEL_SDK_DISABLED="TRUE", OTEL_EXPORTER_OTLP_ENDPOINT="http://c")
    assert (disabled.tracing, disabled.metrics) == (False, False)
    ratio = settings(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25")
    assert (ratio.sampler, ratio.sampler_ratio) == ("parentbased_traceidratio", 0.25)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_SDK_DISABLED", "yes"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
        ("OTEL_TRACES_EXPORTER", "otlp,console"),
        ("OTEL_METRICS_EXPORTER", "statsd"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
    ],
)
def test_a_malformed_variable_fails_naming_it(variable: str, value: str) -> None:
    environ = {variable: value}
    if variable == "OTEL_TRACES_SAMPLER_ARG":
        environ["OTEL_TRACES_SAMPLER"] = "traceidratio"
    with pytest.raises(ConfigurationError) as raised:
        settings(**environ)
    assert raised.value.variable == variable


def test_disabled_telemetry_builds_no_tracer_and_no_meter() -> None:
    telemetry = Telemetry.start(settings(OTEL_SDK_DISABLED="true"), "gateway")
    assert (telemetry.tracer, telemetry.meter, telemetry.active) == (None, None, False)
    body, content_type = telemetry.exposition()
    assert content_type.startswith("text/plain")
    assert b"spendgate_" not in body


def test_traceparent_round_trip_and_refusals() -> None:
    context = parse_traceparent(TRACEPARENT)
    assert context is not None
    assert (context.trace_id, context.span_id) == (
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
    )
    assert context.trace_flags.sampled
    assert context.is_remote
    assert traceparent_of(context) == TRACEPARENT
    for malformed in (
        "",
        TRACEPARENT.upper(),
        TRACEPARENT[:-1],
        "01" + TRACEPARENT[2:],
        "00-" + "0" * 32 + TRACEPARENT[35:],
        TRACEPARENT[:36] + "0" * 16 + "-01",
        TRACEPARENT.replace("-", "_"),
        TRACEPARENT[:3] + "0x" + TRACEPARENT[5:],
    ):
        assert parse_traceparent(malformed) is None, malformed


def test_log_lines_carry_the_trace_and_span_id_inside_a_span() -> None:
    formatter = JsonLineFormatter("gateway")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "upstream failed", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("call") as span:
        line = json.loads(formatter.format(record))
    context = span.get_span_context()
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"


def test_counts_are_bounded() -> None:
    counts = Counts(("spendgate.vendor",))
    for number in range(LABEL_SETS_MAX + 10):
        counts.add((f"vendor-{number}",))
    counts.add(("vendor-0",), 4)
    observed = {tuple(o.attributes.values()): o.value for o in counts.observe(None)}  # type: ignore[arg-type]
    assert len(observed) == LABEL_SETS_MAX + 1
    assert observed[(OVERFLOW_LABEL,)] == 10
    assert observed[("vendor-0",)] == 5


async def test_the_operations_listener_serves_metrics_and_probes() -> None:
    telemetry = Telemetry.start(settings(), "ledger")
    assert telemetry.meter is not None
    telemetry.meter.create_counter("spendgate.test.things").add(3)
    ready = Check(False, {"reason": "starting"})
    server = OpsServer("127.0.0.1", 0, telemetry, live=lambda: Check(True), ready=lambda: ready)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            metrics = await client.get("/metrics")
            live = await client.get("/healthz")
            not_ready = await client.get("/readyz?verbose=1")
            ready = Check(True)
            now_ready = await client.get("/readyz")
            missing = await client.get("/nothing")
            posted = await client.post("/metrics")
        # A request that never finishes its head is closed, not served forever.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n" + b"x: y\r\n" * 100)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        await server.stop()
    assert metrics.status_code == 200
    assert "spendgate_test_things_total 3.0" in metrics.text
    assert "process_cpu_seconds_total" in metrics.text
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert (not_ready.status_code, not_ready.json()["reason"]) == (503, "starting")
    assert now_ready.status_code == 200
    assert (missing.status_code, posted.status_code) == (404, 405)


def test_the_gateway_sends_one_traceparent_per_command_in_order() -> None:
    first, second = TRACEPARENT, TRACEPARENT[:-2] + "00"
    waiters: list[Any] = [(None, None, first), (None, None, ""), (None, None, second)]
    assert _trace_headers(waiters) == {
        HEADER_TRACEPARENT: first,
        HEADER_TRACEPARENTS: f"{first},,{second}",
    }
    assert _trace_headers([(None, None, second)]) == {HEADER_TRACEPARENT: second}
    assert _trace_headers([(None, None, ""), (None, None, "")]) is None


def test_the_ledger_reads_the_sampled_contexts_of_a_request() -> None:
    ledger = LedgerTelemetry(Telemetry.disabled())
    unsampled = TRACEPARENT[:-2] + "00"
    listed = {HEADER_TRACEPARENTS: f"{TRACEPARENT},,{unsampled},garbage"}
    trace = ledger.request_trace(listed, 4)
    assert trace is not None
    assert [p is not None for p in trace.parents] == [True, False, False, False]
    parent = trace.parents[0]
    assert isinstance(parent, SpanContext)
    assert parent.trace_flags == TraceFlags(TraceFlags.SAMPLED)
    # One command: the standard header alone is enough.
    assert ledger.request_trace({HEADER_TRACEPARENT: TRACEPARENT}, 1) is not None
    # A list that does not match the command count, or only unsampled contexts: none.
    assert ledger.request_trace(listed, 3) is None
    assert ledger.request_trace({HEADER_TRACEPARENT: TRACEPARENT}, 2) is None
    assert ledger.request_trace({HEADER_TRACEPARENTS: f"{unsampled},"}, 2) is None
    assert ledger.request_trace(None, 1) is None


def test_a_batch_trace_joined_by_later_requests_covers_every_command_in_order() -> None:
    """A batch gathers while the append before it is in flight: untraced requests first,
    then a traced one, then another untraced one. Every command keeps its place, only the
    traced command's events carry its span's context, and the batch counts everything."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ledger = LedgerTelemetry(Telemetry(provider.get_tracer("test")))
    parent = parse_traceparent(TRACEPARENT)
    assert parent is not None

    batch = ledger.begin_batch(0, [None, None], [1, 2])
    assert batch is None  # nothing traced yet
    traced = RequestTrace([None, parent], 1)
    batch = ledger.begin_batch(0, [traced], [2], batch, (2, 3))
    assert batch is not None
    assert ledger.begin_batch(0, [None], [1], batch, (3, 5)) is batch
    assert (batch.requests, len(batch.commands)) == (4, 6)
    assert [entry is not None for entry in batch.commands] == [False] * 4 + [True, False]

    counts = [1, 2, 2, 1]
    commands = [[QueryKey(tenant="acme", key_id=f"k{n}")] * count for n, count in enumerate(counts)]
    # One event per command: the fifth command's event is seq 5.
    rows = [EventRow(seq, "KeyIssued", b"{}") for seq in range(1, 7)]
    traceparents = batch.event_traceparents(rows, [1, 2, 3, 4, 5, 6])
    assert list(traceparents) == [5]
    replies: list[list[AnyResult]] = [[Failed("x", "y")] * count for count in counts]
    ledger.end_batch(batch, commands, replies, rows, (1, 2), None)

    spans = {span.name: span for span in exporter.get_finished_spans()}
    command = spans["ledger.command QueryKey"]
    assert command.parent is not None
    assert command.parent.span_id == parent.span_id
    assert traceparents[5].decode() == traceparent_of(command.get_span_context())
    attributes = spans["ledger.batch"].attributes or {}
    assert (attributes[BATCH_REQUESTS], attributes[BATCH_COMMANDS]) == (4, 6)


# --------------------------------------------------------------- docs and deploy files

ROOT = Path(__file__).resolve().parent.parent
TELEMETRY_MODULES = [
    ROOT / "services" / service / f"spendgate_{service}" / "_telemetry.py"
    for service in ("gateway", "ledger", "auditor")
]


def test_every_metric_in_the_code_is_in_the_operations_table_and_back() -> None:
    # In the services' telemetry modules every "spendgate.*" literal is an instrument
    # name (attribute names live in spendgate_common.telemetry).
    in_code = {
        name
        for path in TELEMETRY_MODULES
        for name in re.findall(r'"(spendgate\.[a-z0-9_.]+)"', path.read_text("utf-8"))
    }
    operations = (ROOT / "docs" / "operations.md").read_text("utf-8")
    in_docs = set(re.findall(r"^\| `spendgate_[a-z0-9_]+` \| `(spendgate\.[a-z0-9_.]+)` \|",
                             operations, re.MULTILINE))  # fmt: skip
    assert len(in_code) > 20
    assert in_code == in_docs, in_code ^ in_docs


# (file, text, replacement, words of the problem it must cause)
OBSERVABILITY_MUTATIONS = [
    ("observability/alerts.yaml", "spendgate_ledger_relay_backlog)", "spendgate_relay_backlog)",
     "unknown metric spendgate_relay_backlog"),
    ("observability/alerts.yaml", "severity: info", "severity: page", "severity"),
    ("observability/alerts.yaml", "alert: SpendgateManyStops", "alert: SpendgateStops",
     "not both in the rules and in docs"),
    ("observability/alerts.yaml", "> 0.05\n", ") > 0.05\n", "unbalanced"),
    ("observability/grafana-dashboard.json", '"spendgate_ledger_partitions_owned"',
     '"spendgate_ledger_partition_owned"', "unknown metric spendgate_ledger_partition_owned"),
    ("observability/grafana-dashboard.json", '"uid": "spendgate-overview",', "",
     "grafana-dashboard.json: uid"),
    ("k8s/components/observability/prometheus-rules.yaml", "latency above 50 ms",
     "latency above 60 ms", "differs from deploy/observability/alerts.yaml"),
    ("k8s/base/ledger.yaml", "path: /readyz", "path: /ready", "readinessProbe should GET /readyz"),
    ("k8s/base/auditor.yaml", "- name: metrics\n", "- name: operations\n",
     "auditor: livenessProbe should GET /healthz on a declared port"),
    ("k8s/components/observability/otel-env.yaml", "name: OTEL_TRACES_SAMPLER\n",
     "name: OTEL_TRACE_SAMPLER\n", "OTEL_TRACE_SAMPLER, which is not in"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "text", "replacement", "expected"), OBSERVABILITY_MUTATIONS)
def test_deploy_check_refuses_broken_observability_files(
    tmp_path: Path, path: str, text: str, replacement: str, expected: str
) -> None:
    from deploy import check

    shutil.copytree(ROOT / "deploy" / "k8s", tmp_path / "k8s")
    shutil.copytree(ROOT / "deploy" / "observability", tmp_path / "observability")
    target = tmp_path / path
    original = target.read_text("utf-8")
    assert original.count(text) == 1, f"the mutation's text is not unique in {path}"
    target.write_text(original.replace(text, replacement), "utf-8")

    report = check.check_all(tmp_path / "k8s", tmp_path / "observability")

    assert any(expected in problem for problem in report.problems), report.problems
