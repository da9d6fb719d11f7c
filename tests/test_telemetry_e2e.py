"""Traces, metrics and logs of real gateway, ledger and auditor processes.

The services export to a real OTLP/HTTP receiver in the test process
(:mod:`tests.otlp_receiver`) through the standard ``OTEL_*`` variables, and serve
``/metrics``, ``/healthz`` and ``/readyz``. The agent side sends its own ``traceparent``,
as an instrumented agent would, so each call's trace id is known in advance.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import pytest

from spendgate_common.event_messages_v2 import StreamedEvent, decode_events
from spendgate_common.subjects import (
    EVENTS_SUBJECT_WILDCARD,
    HEADER_TRACEPARENT,
    HEADER_TRACEPARENTS,
)
from tests import harness
from tests.harness import FAKE_STRIPE_API_KEY, ServiceFactory, Stack, free_port
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

# Concurrent calls of the coalescing test (one ledger request in flight per partition).
CONCURRENT_CALLS = 24


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def traced_stack(
    factory: ServiceFactory,
    nats_url: str,
    database_url: str,
    receiver: OtlpReceiver,
    env: dict[str, str] | None = None,
) -> Stack:
    return harness.build_stack(
        factory,
        nats_url=nats_url,
        database_url=database_url,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
            # A call with no ledger answering fails closed sooner.
            "SPENDGATE_GATEWAY_LEDGER_TIMEOUT_MS": "1000",
            "SPENDGATE_LEDGER_METRICS_PORT": str(free_port()),
            "SPENDGATE_AUDITOR_METRICS_PORT": str(free_port()),
            **(env or {}),
        },
    )


def agent_traceparent() -> tuple[str, str, str]:
    """A traceparent as an instrumented agent sends it: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def issue_key(stack: Stack, cap_usd: str) -> dict[str, Any]:
    response = httpx.post(
        f"{stack.gateway_url}/v1/keys",
        headers={"authorization": f"Bearer {stack.admin_token}"},
        json={"label": "run-otel", "cap_usd": cap_usd},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    return issued


def charge(
    stack: Stack, key: str, cents: int, traceparent: str = "", **extra: str
) -> httpx.Response:
    headers = {HEADER_TRACEPARENT: traceparent} if traceparent else {}
    return httpx.post(
        f"{stack.gateway_url}/stripe/v1/charges",
        auth=(key, ""),
        headers=headers,
        data={"amount": str(cents), "currency": "usd", "source": "tok_visa", **extra},
        timeout=10,
    )


def one(spans: list[ReceivedSpan], **wanted: str) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, name) == value for name, value in wanted.items())]
    assert len(found) == 1, (wanted, [(s.service, s.name) for s in spans])
    return found[0]


def call_is_traced(trace_id: str, decision: str) -> Any:
    """A predicate: the call's gateway and ledger spans and its auditor span arrived."""

    def ready(spans: list[ReceivedSpan]) -> bool:
        in_trace = [s for s in spans if s.trace_id == trace_id]
        names = {s.name for s in in_trace}
        ledger = [s for s in in_trace if s.name == "ledger.command Reserve"]
        linked_back = ledger and any(
            link[1] == ledger[0].span_id
            for s in spans
            if s.name == "auditor.event"
            for link in s.links
        )
        decided = any(s.attributes.get("spendgate.decision") == decision for s in ledger)
        return {"POST /{vendor}/{path:path}", "ledger.request Reserve"} <= names and bool(
            decided and linked_back
        )

    return ready


def check_call_trace(
    spans: list[ReceivedSpan], trace_id: str, agent_span_id: str, decision: str
) -> tuple[ReceivedSpan, ReceivedSpan]:
    """The call's trace: agent -> gateway server -> gateway client -> ledger command,
    linked to its ledger batch, and the auditor's event span linked back."""
    in_trace = [s for s in spans if s.trace_id == trace_id]
    assert {"spendgate-gateway", "spendgate-ledger"} <= {s.service for s in in_trace}
    server = one(in_trace, name="POST /{vendor}/{path:path}")
    assert (server.service, server.kind, server.parent_span_id) == (
        "spendgate-gateway",
        "SERVER",
        agent_span_id,
    )
    client = one(in_trace, name="ledger.request Reserve")
    assert (client.kind, client.parent_span_id) == ("CLIENT", server.span_id)
    command = one(in_trace, name="ledger.command Reserve")
    assert (command.service, command.kind) == ("spendgate-ledger", "SERVER")
    assert command.parent_span_id == client.span_id
    for span in (server, command):
        attributes = span.attributes
        assert attributes["spendgate.decision"] == decision
        assert attributes["spendgate.vendor"] == "stripe"
        assert attributes["spendgate.amount_requested_micros"] == 600_000
        assert "spendgate.remaining_after_micros" in attributes
        assert not span.error, span
    assert isinstance(command.attributes["spendgate.partition"], int)
    # The ledger command span is linked to the batch span that appended and committed it.
    (link,) = command.links
    batch = one(spans, span_id=link[1])
    assert (batch.name, batch.service, batch.trace_id) == (
        "ledger.batch",
        "spendgate-ledger",
        link[0],
    )
    assert batch.attributes["spendgate.partition"] == command.attributes["spendgate.partition"]
    assert batch.attributes["spendgate.batch.commands"] >= 1
    assert batch.attributes["spendgate.seq.first"] <= batch.attributes["spendgate.seq.last"]
    append = one(spans, name="ledger.append", parent_span_id=batch.span_id)
    assert append.attributes["db.system.name"] == "postgresql"
    # The auditor's span for the event links back to the ledger command span.
    event = next(
        s for s in spans if s.name == "auditor.event" and (trace_id, command.span_id) in s.links
    )
    assert event.service == "spendgate-auditor"
    assert event.attributes["spendgate.audit.outcome"] == "chained"
    assert event.attributes["spendgate.partition"] == command.attributes["spendgate.partition"]
    return server, command


async def test_a_granted_and_a_denied_call_each_make_one_trace_across_the_services(
    service_factory: ServiceFactory, nats_url: str, database_url: str, receiver: OtlpReceiver
) -> None:
    stack = await asyncio.to_thread(traced_stack, service_factory, nats_url, database_url, receiver)
    issued = await asyncio.to_thread(issue_key, stack, "1.00")
    granted_header, granted_trace, granted_parent = agent_traceparent()
    denied_header, denied_trace, denied_parent = agent_traceparent()

    granted = await asyncio.to_thread(charge, stack, issued["key"], 60, granted_header)
    denied = await asyncio.to_thread(charge, stack, issued["key"], 60, denied_header)

    assert (granted.status_code, denied.status_code) == (200, 429), denied.text
    spans = await asyncio.to_thread(receiver.wait_for, call_is_traced(granted_trace, "allow"))
    spans = await asyncio.to_thread(receiver.wait_for, call_is_traced(denied_trace, "stop"))

    server, command = check_call_trace(spans, granted_trace, granted_parent, "allow")
    assert server.attributes["http.response.status_code"] == 200
    assert (
        server.attributes["spendgate.reservation_id"]
        == command.attributes["spendgate.reservation_id"]
    )
    assert server.attributes["spendgate.remaining_after_micros"] == 400_000
    assert not server.events
    upstream = one(spans, trace_id=granted_trace, name="upstream stripe")
    assert (upstream.parent_span_id, upstream.attributes["http.response.status_code"]) == (
        server.span_id,
        200,
    )

    server, command = check_call_trace(spans, denied_trace, denied_parent, "stop")
    assert server.attributes["http.response.status_code"] == 429
    for span in (server, command):
        assert span.attributes["spendgate.scope"] == "key"
        assert span.attributes["spendgate.budget_id"] == issued["key_id"]
        # Nothing was reserved: what remains is what did not fit the request.
        assert span.attributes["spendgate.remaining_after_micros"] == 400_000
        ((name, why),) = span.events
        assert name == "spendgate.stopped"
        assert why["spendgate.reason"] == "cap_exhausted"
        assert "cap exhausted" in why["message"]
    assert not [s for s in spans if s.trace_id == denied_trace and s.name.startswith("upstream")]

    # An internal failure: no ledger answers, the gateway fails closed, the spans say error.
    await asyncio.to_thread(stack.services["ledger"].kill)
    failed_header, failed_trace, _ = agent_traceparent()
    failed = await asyncio.to_thread(charge, stack, issued["key"], 10, failed_header)
    assert failed.status_code == 503, failed.text

    def failure_traced(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in spans if s.trace_id == failed_trace}
        return {"POST /{vendor}/{path:path}", "ledger.request Reserve"} <= names

    spans = await asyncio.to_thread(receiver.wait_for, failure_traced)
    server = one(spans, trace_id=failed_trace, name="POST /{vendor}/{path:path}")
    client = one(spans, trace_id=failed_trace, name="ledger.request Reserve")
    assert server.error
    assert client.error
    assert (server.attributes["spendgate.decision"], server.attributes["spendgate.reason"]) == (
        "error",
        "ledger_unavailable",
    )
    assert server.attributes["http.response.status_code"] == 503


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{label}="{wanted}"' in head for label, wanted in labels.items()):
            total, found = total + float(value), True
    assert found, f"{name} {labels} not in the exposition"
    return total


async def test_metrics_endpoints_expose_the_counters_after_traffic(
    service_factory: ServiceFactory, nats_url: str, database_url: str, receiver: OtlpReceiver
) -> None:
    # A snapshot after every batch, so that the snapshot metrics have something to show.
    snapshots = {"SPENDGATE_LEDGER_SNAPSHOT_EVERY_EVENTS": "1"}
    stack = await asyncio.to_thread(
        traced_stack, service_factory, nats_url, database_url, receiver, snapshots
    )
    issued = await asyncio.to_thread(issue_key, stack, "1.00")
    for _ in range(2):  # one granted, one denied
        await asyncio.to_thread(charge, stack, issued["key"], 60)
    ledger_url = f"http://127.0.0.1:{stack.env['SPENDGATE_LEDGER_METRICS_PORT']}"
    auditor_url = f"http://127.0.0.1:{stack.env['SPENDGATE_AUDITOR_METRICS_PORT']}"

    async with httpx.AsyncClient(timeout=10) as client:
        gateway = (await client.get(f"{stack.gateway_url}/metrics")).text
        for _ in range(100):  # the settle and the auditor follow the response
            ledger = (await client.get(f"{ledger_url}/metrics")).text
            auditor = (await client.get(f"{auditor_url}/metrics")).text
            # The key, the grant, its commit and the denial: the commit may reach the
            # auditor in an earlier message than the denial.
            chained = "spendgate_auditor_events_chained_total " in auditor and (
                metric_value(auditor, "spendgate_auditor_events_chained_total") >= 4
            )
            stored = 'spendgate_snapshot_outcome="stored"' in ledger
            if chained and stored and "spendgate_spend_committed_micros_total{" in auditor:
                break
            await asyncio.sleep(0.1)
        probes = {
            url + path: (await client.get(url + path)).status_code
            for url in (ledger_url, auditor_url)
            for path in ("/healthz", "/readyz")
        }

    allowed = {"spendgate_decision": "allow", "spendgate_vendor": "stripe"}
    assert metric_value(gateway, "spendgate_decisions_total", **allowed, spendgate_scope="all") == 1
    stopped = {"spendgate_decision": "stop", "spendgate_scope": "key"}
    assert metric_value(gateway, "spendgate_decisions_total", **stopped) == 1
    assert metric_value(gateway, "spendgate_reserve_duration_seconds_count") == 2
    assert (
        metric_value(
            gateway, "spendgate_upstream_duration_seconds_count", http_response_status_code="200"
        )
        == 1
    )
    assert metric_value(ledger, "spendgate_ledger_events_appended_total") >= 4
    assert metric_value(ledger, "spendgate_ledger_batch_commands_count") >= 3
    assert metric_value(ledger, "spendgate_ledger_append_duration_seconds_count") >= 3
    assert metric_value(ledger, "spendgate_ledger_partitions_owned") == 8
    assert (
        metric_value(
            ledger, "spendgate_ledger_lease_changes_total", spendgate_lease_change="acquired"
        )
        == 8
    )
    assert "spendgate_ledger_relay_backlog" in ledger
    # The one reservation that was granted was settled (the auditor chained the commit,
    # so the ledger had applied it; read again, as the loop read the ledger first).
    async with httpx.AsyncClient(timeout=10) as client:
        ledger_now = (await client.get(f"{ledger_url}/metrics")).text
    remembered = {
        kind: metric_value(ledger_now, "spendgate_ledger_state_records", spendgate_record=kind)
        for kind in ("settled_id", "hold")
    }
    assert remembered == {"settled_id": 1, "hold": 0}
    assert (
        metric_value(
            ledger, "spendgate_ledger_snapshots_total", spendgate_snapshot_outcome="stored"
        )
        >= 1
    )
    assert metric_value(ledger, "spendgate_ledger_snapshot_duration_seconds_count") >= 1
    spend = metric_value(
        auditor, "spendgate_spend_committed_micros_total", spendgate_vendor="stripe"
    )
    assert spend == 600_000
    assert metric_value(auditor, "spendgate_auditor_events_chained_total") >= 4
    assert "spendgate_auditor_lag_events" in auditor
    assert "process_cpu_seconds_total" in gateway
    assert set(probes.values()) == {200}, probes
    # The same metrics are pushed by OTLP.
    pushed = await asyncio.to_thread(lambda: wait_metric_names(receiver))
    assert ("spendgate-gateway", "spendgate.decisions") in pushed
    assert ("spendgate-ledger", "spendgate.ledger.batch.commands") in pushed


def wait_metric_names(receiver: OtlpReceiver, timeout_s: float = 20) -> set[tuple[str, str]]:
    import time

    give_up_at = time.monotonic() + timeout_s
    while True:
        names = receiver.metric_names()
        if ("spendgate-ledger", "spendgate.ledger.batch.commands") in names and (
            "spendgate-gateway",
            "spendgate.decisions",
        ) in names:
            return names
        if time.monotonic() > give_up_at:
            return names
        time.sleep(0.1)


async def test_no_secret_and_no_body_in_any_log_line_or_exported_span(
    service_factory: ServiceFactory, nats_url: str, database_url: str, receiver: OtlpReceiver
) -> None:
    stack = await asyncio.to_thread(traced_stack, service_factory, nats_url, database_url, receiver)
    admin = {"authorization": f"Bearer {stack.admin_token}"}
    issued = await asyncio.to_thread(issue_key, stack, "1.00")
    vault_key: str = issued["key"]
    marker = f"body-marker-{secrets.token_hex(8)}"
    header, trace_id, _ = agent_traceparent()

    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as client:
        budget = {"budget_id": "fleet-otel", "scope": "fleet", "match": "run-", "cap_usd": "5"}
        assert (await client.post("/v1/budgets", json=budget, headers=admin)).status_code == 201
        assert (await client.get(f"/v1/keys/{issued['key_id']}", headers=admin)).status_code == 200
        assert (
            await client.get("/v1/keys/nope", headers={"authorization": "Bearer wrong"})
        ).status_code == 401
    granted = await asyncio.to_thread(charge, stack, vault_key, 60, header, description=marker)
    denied = await asyncio.to_thread(charge, stack, vault_key, 60, "", description=marker)
    wrong_secret = vault_key[:-4] + "AAAA"
    refused = await asyncio.to_thread(charge, stack, wrong_secret, 60, "", description=marker)
    assert (granted.status_code, denied.status_code, refused.status_code) == (200, 429, 401)
    # A call whose vendor cannot be reached: the gateway logs it inside the call's span.
    await asyncio.to_thread(stack.fake.kill)
    unreachable_header, unreachable_trace, _ = agent_traceparent()
    unreachable = await asyncio.to_thread(
        charge, stack, vault_key, 10, unreachable_header, description=marker
    )
    assert unreachable.status_code == 502, unreachable.text
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=10) as client:
        revoke = await client.post(f"/v1/keys/{issued['key_id']}/revoke", json={}, headers=admin)
        assert revoke.status_code == 200, revoke.text
    await asyncio.to_thread(receiver.wait_for, call_is_traced(trace_id, "allow"))
    # Stop everything: the services flush their last spans and write their last lines.
    await asyncio.to_thread(harness.stop_processes)

    gateway_log = next(path for path in service_factory.log_dir.glob("*-gateway.log"))
    lines = [json.loads(line) for line in gateway_log.read_text("utf-8").splitlines()]
    failed = [line for line in lines if "upstream failed" in line["message"]]
    assert failed, "the unreachable vendor was not logged"
    assert failed[0]["trace_id"] == unreachable_trace
    assert len(failed[0]["span_id"]) == 16

    secret_part = vault_key.rsplit("_", 1)[1]
    secrets_used = {
        "vault key": vault_key,
        "vault key secret": secret_part,
        "wrong vault key": wrong_secret,
        "admin token": stack.admin_token,
        "vendor key": FAKE_STRIPE_API_KEY,
        "request body": marker,
    }
    logs = sorted(service_factory.log_dir.glob("*.log"))
    assert {"ledger", "gateway", "auditor"} <= {path.stem.split("-", 1)[1] for path in logs}
    exported = receiver.bodies
    assert len(exported) >= 2
    for what, secret in secrets_used.items():
        needle = secret.encode()
        for path in logs:
            assert needle not in path.read_bytes(), f"{what} in {path.name}"
        for number, body in enumerate(exported):
            assert needle not in body, f"{what} in exported request {number}"
        for span in receiver.spans():
            assert secret not in repr(span), f"{what} in span {span.name}"


async def test_with_tracing_off_requests_and_events_carry_no_trace_headers(
    service_factory: ServiceFactory, nats_url: str, database_url: str
) -> None:
    stack = await asyncio.to_thread(
        harness.build_stack, service_factory, nats_url=nats_url, database_url=database_url
    )
    watcher = await nats.connect(nats_url)
    seen: list[dict[str, str] | None] = []

    async def record(msg: Any) -> None:
        seen.append(msg.headers)

    await watcher.subscribe("spendgate.v1.ledger.*.cmd", cb=record)
    await watcher.flush()
    try:
        issued = await asyncio.to_thread(issue_key, stack, "1.00")
        header, _, _ = agent_traceparent()
        response = await asyncio.to_thread(charge, stack, issued["key"], 60, header)
        assert response.status_code == 200
        events = await watcher.jetstream().pull_subscribe(EVENTS_SUBJECT_WILDCARD, durable=None)
        published: list[StreamedEvent] = []
        while len(published) < 3:  # the key, the grant and the commit
            for message in await events.fetch(3, timeout=10):
                assert HEADER_TRACEPARENT not in (message.headers or {})
                published += decode_events(message.data)
    finally:
        await watcher.close()
    assert seen, "no ledger request observed"
    for headers in seen:
        assert not headers or not {HEADER_TRACEPARENT, HEADER_TRACEPARENTS} & set(headers)
    assert [event.traceparent for event in published] == [None] * len(published)
    # Metrics stay on without a collector: /metrics answers with the decision counters.
    exposition = httpx.get(f"{stack.gateway_url}/metrics", timeout=10).text
    assert "spendgate_decisions_total{" in exposition


async def test_coalesced_commands_keep_each_callers_trace(
    service_factory: ServiceFactory, nats_url: str, database_url: str, receiver: OtlpReceiver
) -> None:
    """With one ledger request in flight per partition, concurrent calls share requests
    and batches; still every ledger command span is the child of its own caller's span."""
    stack = await asyncio.to_thread(
        harness.build_stack,
        service_factory,
        nats_url=nats_url,
        database_url=database_url,
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SPENDGATE_GATEWAY_LEDGER_INFLIGHT_MAX": "1",
        },
    )
    issued = await asyncio.to_thread(issue_key, stack, "100.00")
    calls = [agent_traceparent() for _ in range(CONCURRENT_CALLS)]
    async with httpx.AsyncClient(timeout=30) as client:
        responses = await asyncio.gather(
            *(
                client.post(
                    f"{stack.gateway_url}/stripe/v1/charges",
                    auth=(issued["key"], ""),
                    headers={HEADER_TRACEPARENT: header},
                    data={"amount": "10", "currency": "usd", "source": "tok_visa"},
                )
                for header, _, _ in calls
            )
        )
    assert {response.status_code for response in responses} == {200}

    def all_arrived(spans: list[ReceivedSpan]) -> bool:
        names = {"POST /{vendor}/{path:path}", "ledger.request Reserve", "ledger.command Reserve"}
        seen = {(s.trace_id, s.name) for s in spans}
        return all((trace_id, name) in seen for _, trace_id, _ in calls for name in names)

    spans = await asyncio.to_thread(receiver.wait_for, all_arrived)
    batches: set[str] = set()
    for _, trace_id, agent_span_id in calls:
        in_trace = [s for s in spans if s.trace_id == trace_id]
        server = one(in_trace, name="POST /{vendor}/{path:path}")
        assert server.parent_span_id == agent_span_id
        client_span = one(in_trace, name="ledger.request Reserve")
        command = one(in_trace, name="ledger.command Reserve")
        assert client_span.parent_span_id == server.span_id
        assert command.parent_span_id == client_span.span_id
        assert command.attributes["spendgate.decision"] == "allow"
        assert (
            command.attributes["spendgate.reservation_id"]
            == server.attributes["spendgate.reservation_id"]
        )
        batches.update(span_id for _, span_id in command.links)
    batch_sizes = [s.attributes["spendgate.batch.commands"] for s in spans if s.span_id in batches]
    assert len(batch_sizes) == len(batches)
    assert max(batch_sizes) > 1, "no batch carried several commands: nothing was coalesced"
